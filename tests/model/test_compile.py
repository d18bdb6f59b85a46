"""torch.compile over the ops and the model with a fast backend: backend selection never breaks
the graph (it resolves at trace time), and compiled results equal eager ones."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import moceir
from moce_kernels import layernorm2d
from moce_kernels._backend import is_available

TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(not is_available("cpu"), reason="moce_kernels._C is not built")
def test_layernorm2d_auto_compiles_to_one_graph():
    x, w, b = torch.randn(2, 5, 7, 9), torch.randn(5), torch.randn(5)
    fn = torch.compile(
        lambda x, w, b: layernorm2d(x, w, b, backend="auto"), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(x, w, b), layernorm2d(x, w, b, backend="auto"))


@pytest.mark.skipif(not is_available("cpu"), reason="moce_kernels._C is not built")
def test_model_compiles_without_import_graph_breaks():
    """The only graph breaks left are host reads of data (the experts' row counts, input checks
    on the CPU): none from resolving a backend (imports, file lookups)."""
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend="cpu", **TINY).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    assert reasons, "expected the documented host reads to break the graph"
    for reason in reasons:
        assert "marked as skipped" not in reason and "import_module" not in reason, reason.splitlines()[0]
        assert "item()" in reason or "Data dependent operator" in reason, reason.splitlines()[0]
