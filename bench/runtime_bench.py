#!/usr/bin/env python3
"""Prefill and decode throughput and peak memory: the C++ runtime vs the PyTorch fp32 reference.

Both run the same wqedge GGUF, each in its own subprocess (so peak RSS is per backend), in one run:

    python bench/runtime_bench.py --model model.gguf [--prefill 128] [--decode 64] [--threads 2]
    python bench/runtime_bench.py --fixture q4        # builds an RTN q4 file of ../shared/fixtures/llama-s

Prefill: one batched forward of --prefill random tokens; decode: --decode single-token steps through
the KV cache after that prompt. The median of --reps repetitions is reported. Peak RSS is the
process's maximum resident set (VmHWM), including the Python interpreter; 'base' is the RSS
before the model is loaded (interpreter + libraries), so peak - base approximates the model's cost.
No assertions: this prints numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


from wqedge.bench.measure import peak_mib as _peak_mib
from wqedge.bench.measure import rss_mib as _rss_mib
from wqedge.bench.measure import time_native, time_prefill_decode


def worker_cpp(a) -> dict:
    from wqedge.runtime import native
    if a.kernels != "auto":
        native.set_kernels(a.kernels)
    base = _rss_mib()
    model, ctx, load, pre, dec = time_native(a.model, a.prefill, a.decode, a.reps, a.threads)
    return {"backend": f"cpp ({native.get_kernels()})", "threads": ctx.n_threads, "load_s": load,
            "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "base_mib": base, "peak_mib": _peak_mib(), "library": str(native.library_path())}


def worker_torch(a) -> dict:
    import torch

    from wqedge.reference import load_reference
    torch.set_num_threads(a.threads or os.cpu_count())
    base = _rss_mib()
    t = time.perf_counter()
    model = load_reference(a.model)
    load = time.perf_counter() - t
    state = {"past": None}

    def reset():
        state["past"] = None

    def evaluate(ids):  # one forward through the transformers KV cache, like ctx.eval
        with torch.inference_mode():
            out = model(torch.tensor([ids]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values

    pre, dec = time_prefill_decode(reset, evaluate, model.config.vocab_size, a.prefill, a.decode, a.reps)
    return {"backend": "torch fp32 reference", "threads": torch.get_num_threads(), "load_s": load,
            "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "base_mib": base, "peak_mib": _peak_mib()}


def build_fixture(kind: str, out: Path) -> Path:
    """An RTN-quantized file of the trained fixture model (uniform action, or 'mixed')."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cpp_support import mixed_action, write_llama_s
    fixture = next(p for p in (ROOT.parent / "shared" / "fixtures" / "llama-s", ROOT / "shared" / "fixtures" / "llama-s")
                   if p.is_dir())
    fn = mixed_action if kind == "mixed" else (lambda n, c: kind)
    return write_llama_s(out, fixture, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="wqedge GGUF to run")
    from wqedge.blocks import ACTION_NAMES
    ap.add_argument("--fixture", choices=[*ACTION_NAMES, "mixed"],
                    help="instead of --model: RTN-quantize the fixture model llama-s with this action")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="0 = all available CPUs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernels", default="auto", choices=["auto", "scalar", "avx2"])
    ap.add_argument("--backends", default="cpp,torch")
    ap.add_argument("--json", action="store_true", help="print one JSON object per backend")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        print(json.dumps((worker_cpp if a.worker == "cpp" else worker_torch)(a)))
        return
    tmp = None
    if not a.model:
        if not a.fixture:
            ap.error("give --model or --fixture")
        tmp = tempfile.TemporaryDirectory()
        a.model = str(build_fixture(a.fixture, Path(tmp.name) / f"llama-s.{a.fixture}.gguf"))
    size = Path(a.model).stat().st_size / 2**20
    print(f"model {a.model} ({size:.1f} MiB); prefill {a.prefill} tokens, decode {a.decode} tokens, "
          f"median of {a.reps}; threads {a.threads or os.cpu_count()}")
    rows = []
    for b in a.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", b, "--model", a.model, "--prefill", str(a.prefill),
               "--decode", str(a.decode), "--threads", str(a.threads), "--reps", str(a.reps), "--kernels", a.kernels]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{b}: failed\n{r.stderr[-2000:]}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'backend':<24}{'threads':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak MiB':>10}{'base MiB':>10}"
              f"{'load s':>8}")
        for r in rows:
            print(f"{r['backend']:<24}{r['threads']:>8}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}"
                  f"{r['peak_mib']:>10.1f}{r['base_mib']:>10.1f}{r['load_s']:>8.2f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
