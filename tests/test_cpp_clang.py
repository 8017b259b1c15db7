"""The C++ runtime builds and passes with clang++ as well as g++ (issue 11: AppleClang on Intel Macs,
the Android NDK's x86_64 target and `CXX=clang++ pip install .` are all clang), and the AVX2 kernels
stay confined to their functions so the library runs on any x86-64 CPU.

The clang build goes to cpp/build-clang (kept between runs, so a rerun only rebuilds what changed):
library, tools, the ONNX Runtime custom-op library and the C++ tests, then ctest (kernels against the
scalar reference, GGUF reader, tokenizer).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ROOT  # noqa: E402

CLANG_BUILD = ROOT / "cpp" / "build-clang"
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def clang_build() -> Path:
    cxx = shutil.which("clang++")
    if not cxx:
        pytest.skip("clang++ is not installed (Debian: apt-get install clang)")
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed")
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(CLANG_BUILD), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_CXX_COMPILER={cxx}", "-DWQEDGE_BUILD_TESTS=ON"], check=True, capture_output=True)
    r = subprocess.run(["cmake", "--build", str(CLANG_BUILD), "-j", str(os.cpu_count() or 2)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    warnings = [l for l in (r.stdout + r.stderr).splitlines() if "warning:" in l]
    assert not warnings, "\n".join(warnings[:20])  # e.g. "unknown pragma ignored" was the symptom
    return CLANG_BUILD


def test_clang_build_passes_ctest(clang_build):
    for target in ("libwqedge.so", "libwqedge.a", "wqedge-run", "wqedge-bench", "wqedge-perplexity", "test_kernels"):
        assert (clang_build / target).is_file(), target
    if (ROOT / "cpp" / "third_party" / "onnxruntime" / "include" / "onnxruntime_c_api.h").is_file():
        assert (clang_build / "libwqedge_ort.so").is_file()
    r = subprocess.run(["ctest", "--test-dir", str(clang_build), "--output-on-failure"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "100% tests passed" in r.stdout and re.search(r"tokenizer \.+\s+Passed", r.stdout), r.stdout
    kern = subprocess.run([str(clang_build / "test_kernels")], capture_output=True, text=True, timeout=600)
    assert kern.returncode == 0 and " 0 failed" in kern.stdout
    if X86 and "avx2+fma+f16c=1" in kern.stdout:  # the SIMD kernels really ran against the scalar reference
        assert "simd kernels under test: avx2" in kern.stdout, kern.stdout[:500]


def _has_symtab(lib: Path) -> bool:
    out = subprocess.run(["objdump", "-h", str(lib)], capture_output=True, text=True, check=True).stdout
    return " .symtab " in out or subprocess.run(["objdump", "-t", str(lib)], capture_output=True,
                                                  text=True).stdout.count("\n") > 10


def _vex_outside_avx2(lib: Path) -> list[str]:
    """Functions outside wqe::avx2 that contain VEX-encoded (AVX) instructions."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    bad, fn = set(), ""
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].startswith("v") and "avx2::" not in fn:
            bad.add(fn)
    return sorted(bad)




@pytest.mark.skipif(not X86 or not shutil.which("objdump"), reason="x86-64 with objdump only")
def test_no_avx_outside_the_avx2_kernels(clang_build):
    """Code that runs before the CPUID check (or on a CPU without AVX2) must be baseline x86-64: only
    functions in wqe::avx2 may hold AVX instructions — for the clang build and the library the Python
    package uses (g++ via pip or cpp/build)."""
    from wqedge.runtime import _native
    libs = [clang_build / "libwqedge.so", clang_build / "libwqedge_ort.so"]
    try:
        libs.append(_native.library_path())
    except Exception:  # no library built or installed: the clang build is still checked
        pass
    checked = 0
    for lib in libs:
        # A stripped library (pip's install strips .symtab) names only its exported functions, so objdump
        # would file the hidden wqe::avx2 kernels under the exported symbol before them: check only
        # libraries whose full symbol table is there.
        if Path(lib).is_file() and _has_symtab(Path(lib)):
            assert _vex_outside_avx2(Path(lib)) == [], lib
            checked += 1
    assert checked >= 1
