"""Fuzzing and sanitizers as part of the suite (issue 11).

- test_sanitized_cpp_tests: the C++ test programs (kernels against the scalar reference, GGUF reader,
  tokenizer) built with AddressSanitizer + UndefinedBehaviorSanitizer, any UB fatal: with clang in the
  fuzz build (cpp/build-fuzz), else with g++ (cpp/build-asan, -DWQEDGE_SANITIZE=ON).
- test_reproducers_under_sanitizers: the reproducer files of ../shared/findings through the whole-file
  harness once each (open, tokenizer, eval in float and int8 activations, generate).
- test_fuzz_harness[...]: cpp/fuzz/run.sh runs each libFuzzer harness (whole GGUF files, the header
  region over a real data section, the tokenizer on SentencePiece and BPE vocabularies) for
  WQEDGE_FUZZ_SECONDS (default 12, a smoke run; raise it to fuzz for real) from seeds written from tiny models; any finding fails the test and
  leaves its artifact under the reported folder.
Needs clang++ with libFuzzer (Debian: apt-get install clang libclang-rt-14-dev); skipped otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ROOT  # noqa: E402

FUZZ_DIR = ROOT / "cpp" / "fuzz"
FUZZ_BUILD = ROOT / "cpp" / "build-fuzz"
ASAN_BUILD = ROOT / "cpp" / "build-asan"
FINDINGS = Path(os.environ.get("WQEDGE_FIXTURES", ROOT.parent / "shared" / "fixtures")).parent / "findings"
SECONDS = int(os.environ.get("WQEDGE_FUZZ_SECONDS", "12"))
JOBS = str(os.cpu_count() or 2)


def _libfuzzer_problem() -> str | None:
    """Why clang + libFuzzer cannot be used here, or None."""
    cxx = shutil.which("clang++")
    if not cxx:
        return "clang++ is not installed (Debian: apt-get install clang libclang-rt-14-dev)"
    if not shutil.which("cmake"):
        return "cmake is not installed"
    probe = subprocess.run([cxx, "-x", "c++", "-fsanitize=fuzzer,address,undefined", "-o", os.devnull, "-"],
                           input='#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput('
                                 'const uint8_t*, size_t) { return 0; }\n',
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return ("clang++ cannot link libFuzzer (Debian: apt-get install libclang-rt-14-dev, matching "
                f"`clang++ --version`): {probe.stderr.strip()[-300:]}")
    return None


LIBFUZZER = _libfuzzer_problem()


def _build(build: Path, extra: list[str], targets: list[str]) -> None:
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                          "-DWQEDGE_BUILD_TOOLS=OFF", "-DWQEDGE_BUILD_ORT_OPS=OFF", *extra], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    r = subprocess.run(["cmake", "--build", str(build), "-j", JOBS, "--target", *targets], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


TEST_TARGETS = ["test_kernels", "test_prefill", "test_gguf", "test_rotation", "test_kvcache", "wqedge_tokenizer_test"]


@pytest.fixture(scope="module")
def fuzz_build() -> Path:
    if LIBFUZZER:
        pytest.skip(LIBFUZZER)
    _build(FUZZ_BUILD, [f"-DCMAKE_CXX_COMPILER={shutil.which('clang++')}", "-DWQEDGE_FUZZ=ON"],
           ["fuzz_gguf_file", "fuzz_gguf_header", "fuzz_tokenizer", *TEST_TARGETS])
    return FUZZ_BUILD


@pytest.fixture(scope="module")
def sanitized_build() -> Path:
    if not LIBFUZZER:
        _build(FUZZ_BUILD, [f"-DCMAKE_CXX_COMPILER={shutil.which('clang++')}", "-DWQEDGE_FUZZ=ON"], TEST_TARGETS)
        return FUZZ_BUILD
    cxx = shutil.which("g++") or shutil.which("clang++")
    if not cxx or not shutil.which("cmake"):
        pytest.skip("no C++ compiler or cmake")
    probe = subprocess.run([cxx, "-x", "c++", "-fsanitize=address,undefined", "-o", os.devnull, "-"],
                           input="int main() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} cannot build with ASan+UBSan: {probe.stderr.strip()[-300:]}")
    _build(ASAN_BUILD, [f"-DCMAKE_CXX_COMPILER={cxx}", "-DWQEDGE_SANITIZE=ON"], TEST_TARGETS)
    return ASAN_BUILD


def _sanitizer_env() -> dict:
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


def test_sanitized_cpp_tests(sanitized_build):
    r = subprocess.run(["ctest", "--test-dir", str(sanitized_build), "--output-on-failure"], capture_output=True,
                       text=True, timeout=900, env=_sanitizer_env())
    assert r.returncode == 0, r.stdout[-6000:]
    for name in ("kernels", "prefill", "gguf_malformed", "rotation", "kvcache", "tokenizer"):
        assert re.search(rf"{name} \.+\s+Passed", r.stdout), r.stdout


def test_reproducers_under_sanitizers(fuzz_build, tmp_path):
    files = sorted(FINDINGS.glob("*.gguf")) if FINDINGS.is_dir() else []
    if not files:
        pytest.skip(f"no reproducers in {FINDINGS}")
    r = subprocess.run([str(fuzz_build / "fuzz" / "fuzz_gguf_file"), *map(str, files)], capture_output=True, text=True,
                       timeout=600, env=_sanitizer_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-6000:]
    assert r.stderr.count("Executed ") == len(files), r.stderr[-3000:]


@pytest.fixture(scope="module")
def fuzz_out(tmp_path_factory, fuzz_build) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("harness", ["gguf_file", "gguf_header", "tokenizer"])
def test_fuzz_harness(fuzz_build, fuzz_out, harness):
    env = dict(os.environ, FUZZ_SECONDS=str(SECONDS), FUZZ_OUT=str(fuzz_out), FUZZ_BUILD=str(fuzz_build),
               CXX=shutil.which("clang++"))
    r = subprocess.run(["bash", str(FUZZ_DIR / "run.sh"), harness], capture_output=True, text=True, env=env,
                       timeout=SECONDS + 600)
    summary = [l for l in r.stdout.splitlines() if l.startswith(f"fuzz_{harness}:")]
    print("\n".join(summary))
    assert r.returncode == 0, f"fuzz_{harness} found something (artifacts under {fuzz_out}/artifacts):\n" + \
        r.stdout[-2000:] + r.stderr[-6000:]
    m = re.search(r": (\d+) executions, cov (\d+), ft (\d+).*findings 0$", summary[-1] if summary else "")
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, r.stdout + r.stderr[-3000:]
