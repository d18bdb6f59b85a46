"""benchmarks/traffic.py: bytes per inference per backend, with and without the trunk's fusions."""

from __future__ import annotations

import re

import pytest

from benchmarks import traffic
from moce_kernels._backend import is_available
from tests.conftest import needs_triton_on_cpu


def test_reference_traffic_is_counted_and_printed(capsys):
    assert traffic.main(["--backends", "reference", "--batch", "1", "--size", "8", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch 1 at 8 x 8, float32" in out
    (moved,) = re.findall(r"reference:\s+([0-9.]+) MiB in \d+ op calls", out)
    assert float(moved) > 0
    assert len(re.findall(r"MiB  \w+::\w+", out)) == 2


@needs_triton_on_cpu
def test_trunk_fusion_moves_fewer_bytes_in_fewer_calls():
    args = ("triton", "float32", 1, 8, "sync_free")
    fused = traffic.traffic(*args, fused_trunk=True, device="cpu")
    unfused = traffic.traffic(*args, fused_trunk=False, device="cpu")
    assert fused["bytes"] < unfused["bytes"] and fused["calls"] < unfused["calls"]
    assert any(row["op"] == "moce_triton::fused_pointwise_fwd" for row in fused["top"])


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        traffic.main(["--batch", "0"])


def test_composed_pairs_are_counted(capsys):
    args = ("reference", "float32", 1, 8, "sync_free", True, "cpu")
    separate = traffic.traffic(*args)
    composed = traffic.traffic(*args, composed_pairs=True)
    # Each pair: one dense convolution and its weight's product for two convolutions, and the
    # border correction's launches.
    assert composed["calls"] > separate["calls"] and composed["bytes"] != separate["bytes"]
    assert traffic.main(["--backends", "reference", "--batch", "1", "--size", "8", "--composed-pairs"]) == 0
    assert "attention pairs composed" in capsys.readouterr().out


@pytest.mark.skipif(not is_available("cpu"), reason="the C++ kernels are not built")
def test_the_warm_forward_reuses_what_eval_keeps(capsys):
    # The second forward reuses the packed experts and the autocast casts of the parameters.
    args = ("cpu", "bf16-autocast", 1, 8, "sync_free", True, "cpu")
    cold, warm = traffic.traffic(*args, cold=True), traffic.traffic(*args)
    assert warm["calls"] < cold["calls"] and warm["bytes"] < cold["bytes"]
    assert traffic.main(["--backends", "reference", "--batch", "1", "--size", "8", "--cold"]) == 0
    assert "first (cold) forward" in capsys.readouterr().out
