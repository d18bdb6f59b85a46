"""``moceir bench``: the suite gets the unknown arguments; ``--builtin`` times every backend."""

from __future__ import annotations

import pytest

from moceir.cli import main


def test_unknown_arguments_go_to_the_benchmark_suite(monkeypatch):
    suite = pytest.importorskip("benchmarks.run")
    got = []
    monkeypatch.setattr(suite, "main", lambda argv: got.append(argv) or 0)
    assert main(["bench", "--quick", "--suite", "ops"]) == 0
    assert got == [["--quick", "--suite", "ops"]]


def test_other_commands_reject_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_builtin_bench_times_each_usable_backend(capsys):
    assert main(["bench", "--builtin", "--size", "16", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "ms per batch" in out
    assert "triton     unavailable" in out  # never timed through the CPU interpreter
