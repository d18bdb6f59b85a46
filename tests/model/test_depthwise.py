"""The trunk's DepthwiseConv2d: nn.Conv2d's parameters and keys, and with a fast backend the
same function through grouped_dwconv (plain, bf16 and under autocast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moce_kernels._backend import is_available
from moceir.layers.conv import DepthwiseConv2d

pytestmark = pytest.mark.skipif(not is_available("cpu"), reason="moce_kernels._C is not built")


def _pair(channels: int, k: int, bias: bool) -> tuple[DepthwiseConv2d, DepthwiseConv2d]:
    torch.manual_seed(0)
    ref = DepthwiseConv2d(channels, k, bias)
    ref.backend = "reference"
    fast = DepthwiseConv2d(channels, k, bias)
    fast.load_state_dict(ref.state_dict())
    fast.backend = "cpu"
    return ref, fast


def test_same_parameters_and_keys_as_conv2d():
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
    ours = DepthwiseConv2d(6, 3, bias=True)
    assert list(ours.state_dict()) == list(conv.state_dict())
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in conv.state_dict().values()]


@pytest.mark.parametrize(("k", "bias"), [(3, True), (7, True), (3, False)])
def test_fast_backend_matches_conv2d_with_gradients(k, bias):
    ref, fast = _pair(5, k, bias)
    x = torch.randn(3, 5, 9, 13, requires_grad=True)
    g = torch.randn(3, 5, 9, 13)
    want = ref(x)
    grads_want = torch.autograd.grad(want, [x, *ref.parameters()], g)
    got = fast(x)
    grads_got = torch.autograd.grad(got, [x, *fast.parameters()], g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    """Under autocast the kernel sees bf16 input and parameters, as nn.Conv2d would, and the
    float32 parameters get float32 gradients."""
    ref, fast = _pair(6, 3, True)
    x = torch.randn(2, 6, 8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x)
        got = fast(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert fast.weight.grad is not None and fast.weight.grad.dtype == torch.float32


def test_wrong_channel_count_gets_conv2d_error():
    _, fast = _pair(5, 3, True)
    with pytest.raises(RuntimeError, match="to have 5 channels"):
        fast(torch.randn(2, 4, 8, 8))
