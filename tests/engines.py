"""Is a third-party engine usable on this machine? One probe per engine and session, in a child process.

A llama.cpp built for the wrong CPU features (a native build with AMX on some Intel hosts) crashes on its
first matrix product. The probe runs a tiny Q4_0/Q8_0 model through llama.cpp (prompt and one decode step)
in a child process; when that child dies by a signal, llama.cpp is broken here, not our code, and the tests
that need it are skipped with the reason (and `wqedge bench` rows report the crash as their failure).
The verdict is passed to child pytest processes through the environment, so the probe runs once.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile

_ENV = "WQEDGE_TEST_LLAMACPP_PROBE"   # "ok" or the reason llama.cpp cannot be used here

_PROBE = r"""
import sys, tempfile
from pathlib import Path
from wqedge.tinymodel import build_tiny_model
from wqedge.converters.llamacpp import export_llamacpp, available_types
import llama_cpp
d = Path(tempfile.mkdtemp(prefix="wqedge-llamacpp-probe-"))
m = build_tiny_model(d / "m", hidden=128, n_layers=1, intermediate=256)
t = [x for x in ("Q4_0", "Q8_0") if x in available_types(("Q4_0", "Q8_0"))][0]
export_llamacpp(m, d / "m.gguf", tensor_types=lambda name, n, k: t)
llm = llama_cpp.Llama(str(d / "m.gguf"), n_ctx=64, n_batch=32, n_threads=2, verbose=False)
llm.eval(list(range(1, 17)))
llm.eval([5])
print("probe ok", t)
"""


def signal_name(returncode: int) -> str:
    """The signal that ended a child (returncode < 0), by name where Python knows it."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


def llamacpp_problem() -> str | None:
    """None when llama.cpp is installed and runs a tiny quantized model here; else why not."""
    cached = os.environ.get(_ENV)
    if cached is None:
        cached = _probe()
        os.environ[_ENV] = cached
    return None if cached == "ok" else cached


def _probe() -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    try:
        # cwd: a scratch folder, so the checkout's wqedge/ cannot shadow the installed package
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, errors="replace",
                           timeout=300, check=False, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return "llama.cpp hung on a 1-layer model for 300 s in the probe"
    if r.returncode == 0:
        return "ok"
    if r.returncode < 0:
        return (f"llama.cpp crashes on this machine ({signal_name(r.returncode)} evaluating a 1-layer quantized "
                "model); its build does "
                "not suit this CPU: reinstall llama-cpp-python as the README says (CMAKE_ARGS=-DGGML_NATIVE=OFF). "
                "Probe output: " + (r.stdout + r.stderr)[-1500:])
    # A Python error in the probe is not a broken engine: let the tests run and show it.
    print(f"tests/engines.py: the llama.cpp probe failed in Python (not a crash): {r.stderr[-800:]}",
          file=sys.stderr)
    return "ok"
