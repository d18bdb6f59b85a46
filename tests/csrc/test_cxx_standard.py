"""csrc/ must build as C++17 as well as C++20.

torch 2.14 (this machine, CI) compiles extensions as C++20; torch 2.11 (the lent GPU machines)
as C++17. A C++20-only construct therefore builds here and fails there, as std::bit_cast in
csrc/dwconv_gelu_gate.cpp once did on an H100. The ATen headers of torch 2.14 refuse C++17, so
the torch-free headers are compiled with -std=c++17 on their own, and every source file is
scanned for the C++20-only features a kernel file is likely to reach for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"})

#: C++20-only features: what to look for, and what to use instead in C++17.
CXX20_ONLY = {
    r"std::bit_cast\b": "gelu_math::bit_cast17 (a memcpy)",
    r"#include\s*<(bit|span|numbers|concepts|ranges|format|source_location|compare)>": "a C++17 header",
    r"std::(span|ranges|format|numbers|source_location)\b": "a C++17 equivalent",
    r"\b(consteval|constinit|co_await|co_yield|co_return)\b": "constexpr / plain code",
    r"\brequires\s*[({]": "std::enable_if",
    r"<=>": "the comparison operators you need",
    r"\[\[(likely|unlikely)\]\]": "__builtin_expect",
    r"\bstd::(starts_with|ends_with)\b|\.(starts_with|ends_with)\(": "compare / rfind",
}


def _code(path: Path) -> str:
    """The file without comments and string literals (a comment may name std::bit_cast)."""
    text = path.read_text()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"gelu_math.h", "dwconv_gelu_gate.cpp", "dwconv_gelu_gate.cu", "module.cpp"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_no_cxx20_only_features(path):
    code = _code(path)
    found = [
        f"{m.group(0)!r} (line {code.count(chr(10), 0, m.start()) + 1}; use {instead})"
        for pattern, instead in CXX20_ONLY.items()
        for m in re.finditer(pattern, code)
    ]
    assert not found, f"{path.name} uses C++20-only features (torch 2.11 builds as C++17): {found}"


def test_the_scan_catches_what_broke_the_h100_build(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text(
        "#include <bit>\nfloat f(unsigned u) { return std::bit_cast<float>(u); }  // fine: std::bit_cast\n"
    )
    with pytest.raises(AssertionError, match="bit_cast"):
        test_no_cxx20_only_features(bad)


def _torch_free_headers() -> list[Path]:
    return [
        p
        for p in SOURCES
        if p.suffix == ".h"
        and not re.search(r"#include\s*[<\"](ATen|torch|c10)/", p.read_text())
        and '#include "' not in p.read_text()
    ]


def test_torch_free_headers_exist():
    assert CSRC / "gelu_math.h" in _torch_free_headers()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("path", _torch_free_headers(), ids=lambda p: p.name)
def test_torch_free_header_compiles_as_cxx17(path, tmp_path):
    unit = tmp_path / "unit.cpp"  # a translation unit that includes the header, as the kernels do
    unit.write_text(f'#include "{path.name}"\nint main() {{ return 0; }}\n')
    run = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{path.parent}", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
