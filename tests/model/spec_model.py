"""A second, independent implementation of MoCE-IR, written from ../shared/spec/architecture.md.

Functional, one image at a time, straight from a state dict: plain F.conv2d calls, F.layer_norm
on permuted tensors, explicit patch loops for the FFT product, and the official release's
routing semantics (SparseDispatcher-style gating in training). The tests compare our model with
it in train and eval mode: outputs, auxiliary loss and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def conv(p, name, x, padding=0, groups=1):
    return F.conv2d(x, p[name + ".weight"], p.get(name + ".bias"), padding=padding, groups=groups)


def dwconv(p, name, x):
    w = p[name + ".weight"]
    return conv(p, name, x, padding=w.shape[-1] // 2, groups=w.shape[0])


def layer_norm(p, name, x):
    c = x.shape[1]
    y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), p[name + ".body.weight"], p[name + ".body.bias"], 1e-5)
    return y.permute(0, 3, 1, 2)


def transposed_attention(q, k, v, temperature):
    b, c, h, w = q.shape
    heads = temperature.shape[0]
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attn = torch.softmax(q @ k.transpose(-2, -1) * temperature, dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def attention(p, n, x):
    q, k, v = dwconv(p, n + ".qkv_dwconv", conv(p, n + ".qkv", x)).chunk(3, 1)
    return conv(p, n + ".project_out", transposed_attention(q, k, v, p[n + ".temperature"]))


def cross_attention(p, n, x, y):
    q = dwconv(p, n + ".q_dwconv", conv(p, n + ".q", x))
    k, v = dwconv(p, n + ".kv_dwconv", conv(p, n + ".kv", y)).chunk(2, 1)
    return conv(p, n + ".project_out", transposed_attention(q, k, v, p[n + ".temperature"]))


def ffn(p, n, x):
    x1, x2 = dwconv(p, n + ".dwconv", conv(p, n + ".project_in", x)).chunk(2, 1)
    return conv(p, n + ".project_out", F.gelu(x1) * x2)


def encoder_block(p, n, x):
    x = x + attention(p, n + ".mixer", layer_norm(p, n + ".norms.0", x))
    return x + ffn(p, n + ".ffn", layer_norm(p, n + ".norms.1", x))


def fft_product(q, k, patch):
    """Circular convolution of q and k inside each patch, one patch at a time."""
    _, _, h, w = q.shape
    hp, wp = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    q = F.pad(q.float(), (0, wp - w, 0, hp - h))
    k = F.pad(k.float(), (0, wp - w, 0, hp - h))
    out = torch.zeros_like(q)
    for i in range(0, hp, patch):
        for j in range(0, wp, patch):
            qp, kp = q[..., i : i + patch, j : j + patch], k[..., i : i + patch, j : j + patch]
            prod = torch.fft.rfft2(qp) * torch.fft.rfft2(kp)
            out[..., i : i + patch, j : j + patch] = torch.fft.irfft2(prod, s=(patch, patch))
    return out[..., :h, :w]


def expert(p, n, x, shared, patch):
    h = conv(p, n + ".proj.0", x)
    q = dwconv(p, n + ".body.q_dwconv", conv(p, n + ".body.q", h))
    k, v = dwconv(p, n + ".body.kv_dwconv", conv(p, n + ".body.kv", h)).chunk(2, 1)
    body = conv(p, n + ".body.proj_out", layer_norm(p, n + ".body.norm", fft_product(q, k, patch)) * v)
    return conv(p, n + ".proj.2", body * F.silu(conv(p, n + ".proj.1", shared))) + x


def normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def adapter(p, n, x, freq_emb, shared, k, noise_std, training, complexity_bias, noise):
    """Returns (output, aux loss). ``noise`` is [B, E] (already scaled) or None."""
    logits = (
        x.mean((2, 3)) @ p[n + ".routing.gate.2.weight"].T + freq_emb @ p[n + ".routing.freq_gate.weight"].T
    )
    noisy = logits if noise is None else logits + noise
    scores = noisy.softmax(-1)
    top_vals, top_idx = scores.topk(k, dim=-1)
    num_experts = logits.shape[1]
    patches = [2 ** (i + 2) for i in range(num_experts)]
    rows = []
    for b in range(x.shape[0]):  # each image on its own experts
        acc = 0
        for j in range(k):
            e = int(top_idx[b, j])
            y = expert(p, f"{n}.experts.{e}.0", x[b : b + 1], shared[b : b + 1], patches[e])
            acc = acc + top_vals[b, j] * y
        rows.append(acc)
    out = conv(p, n + ".proj_out", torch.cat(rows, 0))
    if not training:
        return out, torch.zeros(())
    importance = logits.softmax(-1).sum(0)
    if complexity_bias:
        importance = importance * p[n + ".routing.complexity"]
    loss_imp = (importance.std() / (importance.mean() + 1e-8)) ** 2
    kth = noisy.topk(k, dim=-1).indices[:, -1]
    threshold = noisy[torch.arange(noisy.shape[0]), kth].unsqueeze(1)
    p_win = 1 - normal_cdf((threshold - logits) / noise_std)
    load = p_win.mean(0)
    loss_load = (load.std() / (load.mean() + 1e-8)) ** 2
    return out, 0.5 * loss_imp + 0.5 * loss_load


def spec_forward(p, x, cfg, training=False, noise_fn=None):
    """MoCE-IR on x ([B, 3, H, W], H and W multiples of 8). ``noise_fn(logits)`` draws the
    routing noise (scaled) for one adapter, or None for no noise. Returns (out, total_loss)."""
    levels = len(cfg.num_blocks)
    noise_std = cfg.noise_std or 1.0 / cfg.num_experts
    feats = conv(p, "patch_embed.proj", x, padding=1)
    skips = []
    for i in range(levels - 1):
        for j in range(cfg.num_blocks[i]):
            feats = encoder_block(p, f"enc.{i}.0.layers.{j}", feats)
        skips.append(feats)
        feats = F.pixel_unshuffle(conv(p, f"enc.{i}.1.body.0", feats, padding=1), 2)
    for j in range(cfg.num_blocks[-1]):
        feats = encoder_block(p, f"latent.layers.{j}", feats)
    hp = dwconv(p, "freq_embed.high_conv.0.conv", feats)
    emb = F.gelu(hp).mean((2, 3))
    emb = F.linear(
        F.gelu(F.linear(emb, p["freq_embed.mlp.0.weight"], p["freq_embed.mlp.0.bias"])),
        p["freq_embed.mlp.2.weight"],
        p["freq_embed.mlp.2.bias"],
    )
    losses = []
    for i in range(levels - 1):
        up = F.pixel_shuffle(conv(p, f"dec.{i}.0.body.0", feats, padding=1), 2)
        feats = conv(p, f"dec.{i}.1", torch.cat([up, skips.pop()], 1))
        for j in range(cfg.num_dec_blocks[i]):
            n = f"dec.{i}.2.layers.{j}"
            s = feats
            h = layer_norm(p, n + ".norms.0", feats)
            xs = attention(p, n + ".shared", conv(p, n + ".proj.0", h))
            xa_in = conv(p, n + ".proj.1", h)
            logits_like = xa_in.new_zeros(xa_in.shape[0], cfg.num_experts)
            noise = None if noise_fn is None else noise_fn(logits_like)
            xa, loss = adapter(
                p, n + ".adapter", xa_in, emb, xs, cfg.top_k, noise_std, training, cfg.complexity_bias, noise
            )
            losses.append(loss)
            feats = cross_attention(p, n + ".mixer", xa, xs) + s
            feats = feats + ffn(p, n + ".ffn", layer_norm(p, n + ".norms.1", feats))
    for j in range(cfg.num_refinement_blocks):
        feats = encoder_block(p, f"refinement.layers.{j}", feats)
    out = conv(p, "output", feats, padding=1) + x
    return out, sum(losses) / len(losses)
