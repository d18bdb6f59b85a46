"""Checkpoint loading/saving and the model's bad-input contract."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

import moceir


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moceir.build_model("moce_ir_s", backend="reference").eval()


def test_official_lightning_checkpoint_loads_strict(model, tmp_path):
    # The official last.ckpt: Lightning's dict, tensors under state_dict with the "net." prefix,
    # hyper-parameters as an argparse.Namespace.
    ckpt = {
        "epoch": 3,
        "state_dict": {f"net.{k}": v.clone() + 1 for k, v in model.state_dict().items()},
        "hyper_parameters": argparse.Namespace(lr=2e-4, batch_size=8),
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    fresh = moceir.build_model("moce_ir_s")
    moceir.load_checkpoint(fresh, path)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][f"net.{k}"], msg=k)


def test_safetensors_round_trip_and_no_overwrite(model, tmp_path):
    path = moceir.save_checkpoint(model, tmp_path / "w.safetensors")
    fresh = moceir.load_checkpoint(moceir.build_model("moce_ir_s"), path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        moceir.save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        moceir.load_checkpoint(moceir.build_model("moce_ir_s"), path)


def test_truncated_and_mismatched_checkpoints(model, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        moceir.load_checkpoint(moceir.build_model("moce_ir_s"), truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        moceir.load_checkpoint(moceir.build_model("moce_ir_s"), bad_st)
    with pytest.raises(ValueError, match="moce_ir_s vs moce_ir"):
        moceir.load_checkpoint(moceir.build_model("moce_ir"), path)
    with pytest.raises(FileNotFoundError):
        moceir.load_checkpoint(model, tmp_path / "missing.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        moceir.load_checkpoint(model, tmp_path / "list.pt")


@pytest.mark.parametrize(
    ("make_input", "error", "match"),
    [
        pytest.param(lambda: torch.rand(3, 16, 16), ValueError, "4 dimensions", id="3d"),
        pytest.param(lambda: torch.rand(1, 1, 16, 16), ValueError, "3 channels", id="gray"),
        pytest.param(lambda: torch.randint(0, 255, (1, 3, 16, 16)), TypeError, "dtype", id="uint8"),
        pytest.param(lambda: torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN", id="nan"),
        pytest.param(lambda: [[0.0]], TypeError, "torch.Tensor", id="list"),
    ],
)
def test_bad_model_input(model, make_input, error, match):
    with pytest.raises(error, match=match):
        model(make_input())


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        moceir.build_model("moce_ir_xl")
    with pytest.raises(TypeError, match="unknown build_model arguments"):
        moceir.build_model("moce_ir_s", topk=2)
    with pytest.raises(ValueError, match="top_k"):
        moceir.build_model("moce_ir_s", top_k=5)
    with pytest.raises(ValueError, match="noise_std"):
        moceir.build_model("moce_ir_s", noise_std=0.0)
    with pytest.raises(ValueError, match="backend"):
        moceir.build_model("moce_ir_s", backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="GPU|not built|without CUDA"):
            moceir.build_model("moce_ir_s", backend="cuda")


@pytest.mark.parametrize("name", ["moce_ir_s", "moce_ir"])
def test_load_checkpoint_infers_the_configuration(name, tmp_path):
    model = moceir.build_model(name)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = moceir.load_checkpoint(path)
    assert loaded.config == model.config
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_saved_configuration_round_trips_including_routing_options(tmp_path):
    small = dict(num_blocks=(1, 1, 1, 2), num_dec_blocks=(1, 2, 1), num_refinement_blocks=1)
    model = moceir.build_model("moce_ir_s", top_k=2, eval_noise=True, noise_std=0.1, **small)
    path = moceir.save_checkpoint(model, tmp_path / "small.safetensors")
    loaded = moceir.load_checkpoint(path)
    assert loaded.config == model.config
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.eval()(x)
        torch.manual_seed(0)
        b = loaded.eval()(x)
    assert torch.equal(a, b)


def test_load_checkpoint_rejects_a_foreign_state_dict(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a MoCE-IR state dict"):
        moceir.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="nn.Module"):
        moceir.load_checkpoint("not a model", tmp_path / "other.pt")


def test_the_format_comes_from_the_content_not_the_suffix(tmp_path):
    small = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)
    model = moceir.build_model("moce_ir_s", dim=8, top_k=2, **small)
    # safetensors named .pt: loads, with the configuration saved in its metadata
    loaded = moceir.load_checkpoint(moceir.save_checkpoint(model, tmp_path / "weights.pt"))
    assert loaded.config == model.config
    # a torch file named .safetensors (torch.load alone would hand it to safetensors)
    torch.save(model.state_dict(), tmp_path / "torch.safetensors")
    loaded = moceir.load_checkpoint(tmp_path / "torch.safetensors")
    assert loaded.config.dim == 8
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_configuration_is_normalised_and_checked():
    cfg = moceir.MoCEIRConfig(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], ffn_expansion=2)
    assert cfg.num_blocks == (1, 1, 1, 1) and cfg.num_dec_blocks == (1, 1, 1)
    assert isinstance(cfg.ffn_expansion, float)
    assert cfg == moceir.MoCEIRConfig(dim=8, num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1))
    # the smallest valid widths: even, >= 2**(num_experts - 1), divisible by the heads
    for dim, num_experts in [(8, 4), (10, 4), (2, 2), (2, 1)]:
        moceir.MoCEIRConfig(dim=dim, num_experts=num_experts, patch_sizes=(4,) * num_experts)
    with pytest.raises(ValueError, match=r"^heads\[3\] = 32 must be >= 1 and divide .* = 16 \(dim = 2\)$"):
        moceir.MoCEIRConfig(dim=2, num_experts=2, heads=(1, 2, 4, 32))
    with pytest.raises(ValueError, match=r"^dim must be >= 2\*\*\(num_experts - 1\) = 4 "):
        moceir.MoCEIRConfig(dim=2, num_experts=3, heads=(1, 1, 1, 1))
