"""Run a Python module with SIGINT and SIGTERM raising KeyboardInterrupt.

    python -m benchmarks.interruptible MODULE [ARGS...]     # e.g. pytest -m gpu

A command that a non-interactive shell starts in the background inherits SIGINT as ignored,
and Python leaves it ignored: ``timeout -s INT`` could then not stop pytest or the benchmarks
gracefully (on KeyboardInterrupt they still write their reports). This restores the handler
and runs MODULE as ``python -m MODULE ARGS...`` would.
"""

from __future__ import annotations

import runpy
import signal
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m benchmarks.interruptible MODULE [ARGS...]")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
