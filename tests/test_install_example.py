"""Packaging of the C++ runtime for applications (issue 7), on the host (x86-64):
`cmake --install` into a temporary prefix (shared and static library, header, find_package config
with exported targets, pkg-config file), then examples/generate.c is built against that prefix four
ways (find_package shared / static, pkg-config shared / static) and generates text from a tiny GGUF.
The AArch64 build of the same example (find_package, under qemu) is in tests/test_aarch64.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ROOT, mixed_action, write_llama_s  # noqa: E402

PROMPT = "the model layer weight"
N_NEW = 12


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    if not shutil.which("cmake") or not shutil.which("cc"):
        pytest.skip("cmake or a C compiler not available")
    tmp = tmp_path_factory.mktemp("install")
    build, prefix = tmp / "build", tmp / "prefix"
    _run(["cmake", "-S", ROOT / "cpp", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DWQEDGE_BUILD_TESTS=OFF",
          "-DWQEDGE_BUILD_TOOLS=OFF", f"-DCMAKE_INSTALL_PREFIX={prefix}"])
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)])
    _run(["cmake", "--install", build])
    return prefix


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ex_gguf") / "tiny.gguf"
    return write_llama_s(out, tiny_model_factory(), mixed_action, lambda n, c, g: 2 if c % 3 == 0 else 0, G=64)


def test_installed_layout(prefix):
    libdir = next(d for d in (prefix / "lib", prefix / "lib64") if d.is_dir())
    for rel in ("libwqedge.so", "libwqedge.a", "cmake/wqedge/wqedgeConfig.cmake", "cmake/wqedge/wqedgeConfigVersion.cmake",
                "cmake/wqedge/wqedgeTargets.cmake", "pkgconfig/wqedge.pc"):
        assert (libdir / rel).is_file(), rel
    assert (prefix / "include" / "wqedge.h").is_file()
    targets = (libdir / "cmake/wqedge/wqedgeTargets.cmake").read_text()
    assert "wqedge::wqedge " in targets and "wqedge::wqedge_static " in targets


def _check_generate(exe: Path, gguf: Path, env=None):
    p = _run([exe, gguf, PROMPT, N_NEW], env=env)
    assert p.stdout.startswith(PROMPT), p.stdout
    assert f"generated {N_NEW} tokens" in p.stderr
    return p.stdout


def test_example_find_package(prefix, tiny_gguf, tmp_path):
    texts = []
    for static in ("OFF", "ON"):
        b = tmp_path / f"ex-{static}"
        _run(["cmake", "-S", ROOT / "examples", "-B", b, f"-DCMAKE_PREFIX_PATH={prefix}", f"-DWQEDGE_EXAMPLE_STATIC={static}"])
        _run(["cmake", "--build", b])
        exe = b / "generate"
        deps = _run(["ldd", exe]).stdout if shutil.which("ldd") else ""
        if deps:
            assert ("libwqedge.so" in deps) == (static == "OFF"), deps
        texts.append(_check_generate(exe, tiny_gguf))
    assert texts[0] == texts[1]


def test_example_pkg_config(prefix, tiny_gguf, tmp_path):
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config not available")
    libdir = next(d for d in (prefix / "lib", prefix / "lib64") if d.is_dir())
    env = dict(os.environ, PKG_CONFIG_PATH=str(libdir / "pkgconfig"))
    flags = _run(["pkg-config", "--cflags", "--libs", "wqedge"], env=env).stdout.split()
    src = ROOT / "examples" / "generate.c"
    # shared: -lwqedge finds libwqedge.so; run with LD_LIBRARY_PATH
    _run(["cc", src, *flags, "-o", tmp_path / "gen_shared"])
    a = _check_generate(tmp_path / "gen_shared", tiny_gguf, env=dict(os.environ, LD_LIBRARY_PATH=str(libdir)))
    # static: the archive plus Libs.private (C++ runtime, libm, pthread)
    static_libs = _run(["pkg-config", "--libs", "--static", "wqedge"], env=env).stdout.split()
    static_libs = [f for f in static_libs if f != "-lwqedge"]
    _run(["cc", src, *_run(["pkg-config", "--cflags", "wqedge"], env=env).stdout.split(), libdir / "libwqedge.a",
          *static_libs, "-o", tmp_path / "gen_static"])
    b = _check_generate(tmp_path / "gen_static", tiny_gguf)
    assert a == b
