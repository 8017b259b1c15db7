#!/usr/bin/env python3
"""Our C++ runtime vs llama.cpp (llama-cpp-python) on the same machine, same thread count, one run.

    python bench/llamacpp_bench.py [--threads 2] [--prefill 128] [--decode 64] [--ppl-windows 4]
                                   [--plan plan.json] [--calib] [--out bench/results/llamacpp]

Models (all from ../shared/fixtures/llama-s; embeddings and output head F16 everywhere):
  wqedge q4        our converter, uniform q4 (G = 128, NeUQI fit; weighted by calibration with --calib), our runtime
  wqedge mixed     our converter, a mixed plan (--plan, else q4 for attn_v / ffn_down / first and last
                   layer and q3 elsewhere), our runtime
  llama.cpp Q4_0, Q4_K_M-like, Q3_K_M-like, Q2_K    llama-quantize's per-tensor recipes (converters.llamacpp
                   preset_types; llama.cpp's fallbacks where K = 1408 is not a multiple of 256), quantized by
                   llama.cpp's own quantizer
  llama.cpp plan   the mixed plan projected onto one stock type per tensor at the same bit budget
                   (with --calib: importance matrix = diag(XᵀX) from calib.txt, for every llama.cpp file, and
                   the same statistics weight our NeUQI fits)
Each backend runs in its own subprocess: prefill tokens/s (one batch of --prefill tokens), decode tokens/s
(--decode single-token steps), peak RSS (VmHWM) measured before the perplexity run, then perplexity
with the shared definition (wqedge.perplexity; --ppl-windows windows of 512 of eval.txt, HF tokenization).
Roofline: memory bandwidth from a threaded numpy triad; decode tok/s as a fraction of bandwidth / bytes
read per token (all weights but the embedding table, plus an f16 KV cache at the mean decode position).
Speeds: best of --rounds round-robin passes x --reps repetitions (on shared cores outside load only slows a run
down; the JSON keeps every sample and the medians). Writes <out>.md and <out>.json. No assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = next((p for p in (ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures") if p.is_dir()),
                ROOT.parent / "shared" / "fixtures")


from _common import peak_mib as _peak_mib  # noqa: E402  (bench/ is on sys.path when run as a script)
from _common import rss_mib as _rss_mib  # noqa: E402
from _common import time_native, time_prefill_decode  # noqa: E402


# ---------------------------------------------------------------- workers (one process per backend)

def _ppl(fn, a) -> float | None:
    if not a.ppl_windows:
        return None
    from wqedge.perplexity import perplexity
    toks = np.load(a.tokens)
    return perplexity(fn, toks, a.bos, 512, a.ppl_windows).perplexity


def worker_wqedge(a) -> dict:
    from wqedge.runtime import native
    base = _rss_mib()
    model, ctx, load, pre, dec = time_native(a.model, a.prefill, a.decode, a.reps, a.threads)
    peak = _peak_mib()
    threads = ctx.n_threads
    ctx.close()
    ppl = _ppl(native.logits_fn(model, n_ctx=512, n_threads=a.threads), a)
    return {"threads": threads, "load_s": load, "prefill": pre, "decode": dec, "base_mib": base, "peak_mib": peak,
            "perplexity": ppl}


def worker_llamacpp(a) -> dict:
    import llama_cpp
    from wqedge.converters.llamacpp import LlamaCppEvaluator
    base = _rss_mib()
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.prefill + a.decode + 8, n_batch=max(a.prefill, 8),
                          n_ubatch=max(a.prefill, 8), n_threads=a.threads, n_threads_batch=a.threads,
                          logits_all=False, verbose=False)
    load = time.perf_counter() - t
    pre, dec = time_prefill_decode(llm.reset, llm.eval, llm.n_vocab(), a.prefill, a.decode, a.reps)
    peak = _peak_mib()
    llm.close()
    ev = LlamaCppEvaluator(a.model, n_ctx=512, n_threads=a.threads)
    ppl = _ppl(ev, a)
    return {"threads": a.threads, "load_s": load, "prefill": pre, "decode": dec, "base_mib": base, "peak_mib": peak,
            "perplexity": ppl, "llama_cpp_version": getattr(llama_cpp, "__version__", "?")}


# ---------------------------------------------------------------- memory bandwidth

def triad_bandwidth(threads: int, mib_per_array: float = 64, reps: int = 5) -> float:
    """GB/s of a = b + s·c over `threads` threads (numpy ufuncs release the GIL), best of `reps`. Traffic
    counted as numpy does it: a = s·c (read c, write a) then a += b (read a, read b, write a) = 5 × 8 bytes
    per element. Small arrays are swept repeatedly inside each thread so thread start-up does not count."""
    n = int(mib_per_array * 2**20) // 8
    inner = max(1, int(256 / mib_per_array))
    parts = [(np.zeros(n // threads), np.random.rand(n // threads), np.random.rand(n // threads))
             for _ in range(threads)]

    def run(p):
        a, b, c = p
        for _ in range(inner):
            np.multiply(c, 3.0, out=a)
            np.add(a, b, out=a)

    for p in parts:
        run(p)  # touch the pages
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=run, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        dt = time.perf_counter() - t
        best = max(best, inner * 5 * 8 * sum(len(p[0]) for p in parts) / dt / 1e9)
    return best


# ---------------------------------------------------------------- building the files

def _llc_mib():
    """Size of the largest cache level (MiB) from sysfs, or None."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip()
        except OSError:
            continue
        v = int(txt[:-1]) / 1024 if txt.endswith("K") else int(txt[:-1]) if txt.endswith("M") else None
        if v and (best is None or v > best):
            best = v
    return best


def _calibration_diag(ckpt, text: str) -> dict:
    """diag(XᵀX)/T of every decoder linear's input on calibration text ({hf_name: tensor[K]})."""
    from wqedge.calib import collect_stats
    return collect_stats(ckpt, text)


def default_mixed_plan(ckpt):
    from wqedge.plan import Plan
    L = ckpt.spec.n_layers
    actions = {}
    for lin in ckpt.spec.linears():
        i = int(lin.hf_name.split(".")[2])
        hi = i in (0, L - 1) or "v_proj" in lin.hf_name or "down_proj" in lin.hf_name
        n = -(-lin.in_features // 128)
        actions[lin.hf_name] = ["q4" if hi else "q3"] * n
    p = Plan.from_actions(ckpt.spec.linears(), 128, 16.0, "bench-mixed", actions, "neuqi",
                          model_fingerprint=ckpt.fingerprint())
    p.budget_bits = round(p.effective_bits() + 1e-6, 6)
    return p


def bytes_per_token(path: Path, spec, kind: str, ctx_pos: float) -> float:
    import gguf
    r = gguf.GGUFReader(path)
    weights = sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    weights += int(emb.n_bytes) // spec.vocab_size
    kv = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 2 * ctx_pos
    return weights + kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="round-robin passes over all models (best of all kept)")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--plan", help="mixed plan JSON for llama-s (default: a q4/q3 mix, see above)")
    ap.add_argument("--calib", action="store_true",
                    help="diag(XᵀX) from calib.txt: NeUQI weights for our files, importance matrix for llama.cpp's")
    ap.add_argument("--workdir", help="keep the model files here (default: a temporary folder)")
    ap.add_argument("--out", help="report path without suffix (default bench/results/llamacpp, or llamacpp_calib)")
    ap.add_argument("--only", help="comma-separated subset of model labels")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--bos", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps((worker_wqedge if a.worker == "wqedge" else worker_llamacpp)(a)))
        return

    import torch
    from transformers import AutoTokenizer
    from wqedge.converters.llamacpp import (
        export_llamacpp,
        measured_linear_bits,
        preset_types,
    )
    from wqedge.runtime.gguf_reader import WqGGUF

    from wqedge.alloc.uniform import uniform_plan
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.plan import Plan
    from wqedge.quantize import convert_to_gguf

    torch.set_num_threads(a.threads)
    src = FIXTURES / "llama-s"
    ckpt = LlamaCheckpoint.open(src)
    spec = ckpt.spec
    tmp = None
    if a.workdir:
        wd = Path(a.workdir)
        wd.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        wd = Path(tmp.name)
    tok = AutoTokenizer.from_pretrained(str(src))
    text = (FIXTURES / "text" / "eval.txt").read_text(encoding="utf-8")[: 3000 * max(a.ppl_windows, 1)]
    ids = np.asarray(tok(text)["input_ids"], np.int32)
    np.save(wd / "tokens.npy", ids)

    t0 = time.perf_counter()
    imatrix = None
    if a.calib:
        imatrix = _calibration_diag(ckpt, (FIXTURES / "text" / "calib.txt").read_text(encoding="utf-8"))
    sfx = "-calib" if a.calib else ""
    mixed = Plan.load(a.plan, spec) if a.plan else default_mixed_plan(ckpt)
    models = []   # (label, backend, path, recipe)

    def want(label):
        return not a.only or label in a.only.split(",")

    if want("wqedge q4"):
        p = wd / f"wq-q4{sfx}.gguf"
        if not p.exists():
            convert_to_gguf(ckpt, uniform_plan(spec.linears(), 128, 4.25, model_fingerprint=ckpt.fingerprint()), p,
                            stats=imatrix)
        models.append(("wqedge q4", "wqedge", p, "uniform q4, G=128"))
    if want("wqedge mixed"):
        p = wd / f"wq-mixed{sfx}.gguf"
        if not p.exists():
            convert_to_gguf(ckpt, mixed, p, stats=imatrix)
        models.append(("wqedge mixed", "wqedge", p, f"plan {mixed.allocator}, {mixed.action_histogram()}"))
    for preset in ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        label = f"llama.cpp {preset}"
        if not want(label):
            continue
        p = wd / f"lcp-{preset}.gguf"
        res = export_llamacpp(ckpt, p, imatrix=imatrix, tensor_types=preset_types(spec, preset))
        models.append((label, "llamacpp", p, f"{preset}-like: {res.type_histogram()}"))
    if want("llama.cpp plan"):
        p = wd / "lcp-plan.gguf"
        res = export_llamacpp(ckpt, p, mixed.effective_bits(), imatrix, plan=mixed)
        models.append(("llama.cpp plan", "llamacpp", p,
                       f"mixed plan ({mixed.effective_bits():.3f} b) projected: {res.type_histogram()}"))
    build_s = time.perf_counter() - t0

    bw = triad_bandwidth(a.threads)                         # 3 x 64 MiB: DRAM
    bw_llc = triad_bandwidth(a.threads, 2.5, reps=10)       # 3 x 2.5 MiB: last-level cache
    llc_mib = _llc_mib()
    ctx_pos = a.prefill + a.decode / 2
    rows = []
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for rnd in range(a.rounds):   # round-robin over the models, so that a burst of outside load hits them all alike
        for label, backend, path, recipe in models:
            cmd = [sys.executable, __file__, "--worker", backend, "--model", str(path), "--threads", str(a.threads),
                   "--prefill", str(a.prefill), "--decode", str(a.decode), "--reps", str(a.reps),
                   "--ppl-windows", str(a.ppl_windows if rnd == 0 else 0), "--tokens", str(wd / "tokens.npy"),
                   "--bos", str(tok.bos_token_id)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{label}: failed\n{r.stderr[-3000:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            if label not in results:
                results[label] = res
            else:
                results[label]["prefill"] += res["prefill"]
                results[label]["decode"] += res["decode"]
                results[label]["peak_mib"] = max(results[label]["peak_mib"], res["peak_mib"])
    load_after = os.getloadavg()
    for label, backend, path, recipe in models:
        res = results.get(label)
        if res is None:
            continue
        res.update(prefill_tok_s=max(res["prefill"]), decode_tok_s=max(res["decode"]),
                   prefill_median=statistics.median(res["prefill"]), decode_median=statistics.median(res["decode"]))
        bits = WqGGUF(path).measured_bits() if backend == "wqedge" else measured_linear_bits(path)
        bpt = bytes_per_token(path, spec, backend, ctx_pos)
        res.update(label=label, backend=backend, recipe=recipe, file_mib=path.stat().st_size / 2**20,
                   linear_bits=bits, bytes_per_token=bpt, roofline_tok_s=bw * 1e9 / bpt,
                   roofline_fraction=res["decode_tok_s"] / (bw * 1e9 / bpt),
                   roofline_llc_tok_s=bw_llc * 1e9 / bpt, roofline_llc_fraction=res["decode_tok_s"] / (bw_llc * 1e9 / bpt))
        rows.append(res)
        print(f"{label:18s} decode {res['decode_tok_s']:8.1f} tok/s  prefill {res['prefill_tok_s']:8.1f} tok/s  "
              f"peak {res['peak_mib']:6.0f} MiB  bits {bits:.3f}  ppl {res['perplexity']}", flush=True)

    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.threads,
            "prefill": a.prefill, "decode": a.decode, "reps": a.reps, "ppl_windows": a.ppl_windows,
            "ppl_tokens_scored": 255 * a.ppl_windows, "triad_GBps": bw, "triad_llc_GBps": bw_llc, "llc_mib": llc_mib, "imatrix": bool(a.calib),
            "build_s": build_s, "rounds": a.rounds,
            "loadavg_before": load_before, "loadavg_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(a.out or ROOT / "bench" / "results" / ("llamacpp_calib" if a.calib else "llamacpp"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    md = ["# wqedge runtime vs llama.cpp on llama-s (32M, fixture)" + (", with calibration" if a.calib else ""), "",
          f"{info['date']}; {info['cpus']} CPUs visible (shared: 1-min load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after), {a.threads} threads for every backend; prefill {a.prefill} "
          f"tokens, decode {a.decode} tokens; speeds are the best of {a.rounds} round-robin rounds x {a.reps} "
          f"repetitions (medians in the JSON), since outside load on the shared cores only ever slows a run down; perplexity: shared definition "
          f"(wqedge.perplexity), {a.ppl_windows} windows of 512 of eval.txt ({255 * a.ppl_windows} tokens scored — "
          f"a few windows, so compare rows with each other, not with the 32-window reference figures); "
          f"numpy triad bandwidth ({a.threads} threads) {bw:.1f} GB/s from DRAM (3 x 64 MiB), {bw_llc:.1f} GB/s "
          f"from the last-level cache (3 x 2.5 MiB; LLC {llc_mib} MiB). This model's weights (20-25 MB) fit in "
          f"that cache, so decode is bounded by the cache, not DRAM: both roofline fractions are given. "
          f"Bits: decoder linears only, from tensor byte sizes; embeddings and head F16 in every file. "
          + ("Calibration: diag(XᵀX) of calib.txt weights our NeUQI fits and is llama.cpp's importance matrix."
             if a.calib else "No calibration: NeUQI fits unweighted, llama.cpp quantizers without importance matrix."),
          "",
          "| model | bits/w (linears) | file MiB | ppl | decode tok/s | prefill tok/s | peak RSS MiB (base) "
          "| bytes/token MB | DRAM roofline tok/s | decode / DRAM roofline | decode / LLC roofline |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] else "-"
        md.append(f"| {r['label']} | {r['linear_bits']:.3f} | {r['file_mib']:.1f} | {ppl} | {r['decode_tok_s']:.1f} | "
                  f"{r['prefill_tok_s']:.1f} | {r['peak_mib']:.0f} ({r['base_mib']:.0f}) | {r['bytes_per_token'] / 1e6:.1f} "
                  f"| {r['roofline_tok_s']:.0f} | {r['roofline_fraction']:.0%} | {r['roofline_llc_fraction']:.0%} |")
    md += ["", "Recipes:", ""] + [f"- **{r['label']}**: {r['recipe']}" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
