"""One benchmark run: make the files, measure the machine, time every (model, row) in its own process
(round-robin, so a burst of outside load on shared cores hits every row alike), then compute rooflines
and the ratios against llama.cpp measured in the same run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import measure
from .files import DEFAULT_CACHE, ModelFiles, NotAvailable, speed_checkpoint
from .report import TARGET_ROOFLINE, decode_target
from .rows import ROWS


@dataclass
class BenchOptions:
    model: str                       # quality model (HF folder): perplexity and speed
    eval_text: str                   # path
    calib_text: str | None           # path, or None for --no-calib
    rows: list[str]
    speed_model: str | None = "tinyllama-1.1b"
    threads: int = 2
    prefill: int = 128
    decode: int = 64
    reps: int = 2
    rounds: int = 2
    ppl_windows: int = 8
    ppl_ctx: int = 512
    cache_dir: str = str(DEFAULT_CACHE)
    rebuild: bool = False
    device: str | None = None
    subset_note: str = ""
    self_calib: bool = False         # ours on text the model samples itself, llama.cpp without imatrix
    extra: dict = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bytes_per_token(path: Path, kv_bytes: int, ctx_pos: float) -> float:
    """Bytes one decode step reads: every tensor but the embedding table (one row of it), the output head
    (the embedding table again when tied), and the K and V caches up to the mean decode position."""
    from wqedge.runtime.gguf_check import open_reader
    r = open_reader(path)
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    emb = sizes["token_embd.weight"]
    n_vocab = next(int(t.shape[-1]) for t in r.tensors if t.name == "token_embd.weight")
    weights = sum(sizes.values()) - emb + emb // n_vocab + (0 if "output.weight" in sizes else emb)
    return weights + kv_bytes * ctx_pos


def _kv_bytes_per_position(spec, backend: str, gguf_path=None) -> int:
    """K and V of every layer for one position: f16 in llama.cpp, f32 in the ONNX graph, and in our runtime what the
    file's KV cache setting stores (float32 without one; wqedge.kv_format row bytes)."""
    if backend == "wqedge" and gguf_path is not None:
        from ..runtime.gguf_reader import WqGGUF
        row = WqGGUF(gguf_path).kv_cache.row_bytes(spec.head_dim)
        return 2 * sum(spec.kv_heads(i) for i in range(spec.n_layers)) * row
    return 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * (4 if backend == "ort" else 2)


def _run_worker(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "wqedge.bench.worker", json.dumps(job)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tokens(model_dir: str, text: str, n_tokens: int, out: Path) -> int:
    """Tokenize the evaluation text (HF tokenizer, leading BOS) into out (.npy); returns the BOS id."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    chars = 6 * n_tokens
    while True:
        ids = tok(text[:chars])["input_ids"]
        if len(ids) >= n_tokens or chars >= len(text):
            break
        chars *= 2
    np.save(out, np.asarray(ids, np.int32))
    return int(tok.bos_token_id if tok.bos_token_id is not None else ids[0])


def self_calibration(model_dir: str, cache: Path, device, say: Callable[[str], None]) -> str:
    """The text `wqedge convert` calibrates on when given none (calib_source.self_generated_text: seeded samples of
    the model itself), cached beside the bench's files so reruns plan on the same text."""
    from ..calib_source import self_generated_text
    from ..checkpoint import LlamaCheckpoint
    ckpt = LlamaCheckpoint.open(model_dir)
    path = cache / f"{ckpt.fingerprint()[:16]}-selfcalib-v1.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = self_generated_text(ckpt, progress=say, device=device)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def run_bench(o: BenchOptions, say: Callable[[str], None] = _say) -> dict:
    """Everything of one `wqedge bench`: returns the report dict (info, rows, comparisons)."""
    t_start = time.time()
    # Workers run in other folders (cwd="/"): every path they are handed must be absolute.
    o = replace(o, model=str(Path(o.model).resolve()), eval_text=str(Path(o.eval_text).resolve()),
                calib_text=str(Path(o.calib_text).resolve()) if o.calib_text else None,
                cache_dir=str(Path(o.cache_dir).expanduser().resolve()))
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": measure.machine_info(o.threads),
            "options": {k: v for k, v in asdict(o).items() if k != "extra"}, "subset_note": o.subset_note}
    eval_text = Path(o.eval_text).read_text(encoding="utf-8")
    calib_text = Path(o.calib_text).read_text(encoding="utf-8") if o.calib_text else None
    cache = Path(o.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------- files
    t0 = time.time()
    models: list[tuple[str, ModelFiles, bool]] = []   # (name, files, quality)
    if o.self_calib:
        if calib_text is not None:
            raise ValueError("--self-calib replaces the calibration text: give --no-calib's setting, no --calib-text")
        calib_text = self_calibration(o.model, cache, o.device, say)
        info["self_calib_chars"] = len(calib_text)
    qual = ModelFiles(o.model, cache, calib_text, say, device=o.device, rebuild=o.rebuild, imatrix=not o.self_calib)
    models.append((Path(o.model).name, qual, True))
    if o.speed_model:
        sp = ModelFiles(speed_checkpoint(o.speed_model, cache, say), cache, None, say, plan_source=qual,
                        device=o.device, rebuild=o.rebuild, speed_only=True)
        models.append((o.speed_model, sp, False))
    jobs, rows = [], []
    for name, mf, quality in models:
        for key in o.rows:
            row = ROWS[key]
            base = {"model": name, "quality_model": quality, "row": key, "backend": row.backend}
            if not quality and not row.speed:
                continue
            try:
                path = mf.file(key)
            except NotAvailable as e:
                rows.append({**base, "status": f"not available: {e}"})
                say(f"{name} {key}: not available: {e}")
                continue
            except Exception as e:  # noqa: BLE001 — one broken row must not lose the others' figures
                rows.append({**base, "status": f"failed to build: {type(e).__name__}: {e}"})
                say(f"{name} {key}: FAILED to build: {type(e).__name__}: {e}")
                continue
            jobs.append((base, mf, path))
    info["build_s"] = time.time() - t0

    # -------------------------------------------------------- machine
    def bandwidth(when: str) -> None:
        """Memory bandwidth, measured before, between the rounds and after the timing: outside load only lowers it,
        so the best counts.
        The roof is the runtime's own read bandwidth (wqe_read_bandwidth: the same threads streaming contiguous
        parts, as a decode step reads its weights); the numpy triad (read + write) is kept for reference."""
        say(f"measuring memory bandwidth (read and numpy triad, {when})…")
        dram = measure.triad_bandwidth(o.threads)                     # 3 x 64 MiB: DRAM
        llc = measure.triad_bandwidth(o.threads, 2.5, reps=10)       # 3 x 2.5 MiB: last-level cache
        read, read_llc = measure.read_bandwidth(o.threads)
        info.setdefault("triad_samples", []).append({"when": when, "dram_GBps": dram, "llc_GBps": llc,
                                                     "read_GBps": read, "read_llc_GBps": read_llc})
        info["triad_GBps"] = max(dram, info.get("triad_GBps", 0.0))
        info["triad_llc_GBps"] = max(llc, info.get("triad_llc_GBps", 0.0))
        # the roofline's bandwidth: read where the runtime library is there, else the triad
        info["roof_kind"] = "read" if read else "triad"
        info["roof_GBps"] = max(read or dram, info.get("roof_GBps", 0.0))
        info["roof_llc_GBps"] = max(read_llc or llc, info.get("roof_llc_GBps", 0.0))

    bandwidth("before")

    # -------------------------------------------------------- timing
    tmp = tempfile.TemporaryDirectory(prefix="wqedge-bench-")
    tok_path = Path(tmp.name) / "tokens.npy"
    bos = _tokens(o.model, eval_text, o.ppl_windows * o.ppl_ctx + 1, tok_path) if o.ppl_windows else 1
    ppl = {"tokens": str(tok_path), "bos": bos, "ctx": o.ppl_ctx, "windows": o.ppl_windows} if o.ppl_windows else None
    results: dict[tuple[str, str], dict] = {}
    errors: dict[tuple[str, str], str] = {}
    info["loadavg_before"] = os.getloadavg()
    for rnd in range(o.rounds):
        for base, mf, path in jobs:
            k = (base["model"], base["row"])
            # ONNX Runtime's fp32 path is ~10x slower than the others on a 1B model: one pass there is enough
            slow = base["backend"] == "ort" and not base["quality_model"]
            if k in errors or (slow and rnd > 0):
                continue
            job = {"backend": base["backend"], "model": str(path), "threads": o.threads, "prefill": o.prefill,
                   "decode": o.decode, "reps": 1 if slow else o.reps, "n_vocab": mf.spec.vocab_size,
                   "ppl": ppl if rnd == 0 and base["quality_model"] else None}
            if ROWS[base["row"]].act != "f32":
                job["act"] = ROWS[base["row"]].act   # int8 prefill too: its perplexity is its own, measured
            say(f"round {rnd + 1}/{o.rounds}: {base['model']} {base['row']}…")
            try:
                res = _run_worker(job, timeout=3600)
            except Exception as e:  # noqa: BLE001
                msg = str(e)
                status = f"not available: {msg}" if ("NotImplementedError" in msg or "ImportError" in msg
                                                      or "ModuleNotFoundError" in msg) else f"failed: {msg}"
                say(f"{base['model']} {base['row']}: {status}")
                if k not in results:   # a later round's failure keeps the earlier samples
                    errors[k] = status
                continue
            if k not in results:
                results[k] = res
            else:
                results[k]["prefill"] += res["prefill"]
                results[k]["decode"] += res["decode"]
                results[k]["peak_mib"] = max(results[k]["peak_mib"], res["peak_mib"])
        if rnd + 1 < o.rounds:
            # between rounds too: on a shared machine the bandwidth moves by ~15% over minutes (26.9-32.4 GB/s at 2
            # threads on one 2-core VM, bench/results/issue12_pool.md), and the roof is the best reading
            bandwidth(f"after round {rnd + 1}")
    info["loadavg_after"] = os.getloadavg()
    tmp.cleanup()
    bandwidth("after")

    # -------------------------------------------------------- rows
    ctx_pos = o.prefill + o.decode / 2

    def recipe(mf, row: str) -> str:   # an -a8 row's file is its float row's: so is its recipe
        return mf.notes.get(row) or mf.notes.get(ROWS[row].file_key, "")
    for base, mf, path in jobs:
        k = (base["model"], base["row"])
        if k in errors:
            rows.append({**base, "status": errors[k], "recipe": recipe(mf, base["row"])})
            continue
        r = results[k]
        gguf_path = path if base["backend"] != "ort" else mf.file("wq-q4")
        if base["backend"] == "llamacpp":
            from ..runtime.llamacpp_eval import measured_linear_bits
            bits = measured_linear_bits(gguf_path)
        else:
            from ..runtime.gguf_reader import WqGGUF
            bits = WqGGUF(gguf_path).measured_bits()
        size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
        kv_pos = _kv_bytes_per_position(mf.spec, base["backend"], gguf_path)
        bpt = bytes_per_token(gguf_path, kv_pos, ctx_pos)
        dec, pre = max(r["decode"]), max(r["prefill"])
        roof, roof_llc = info["roof_GBps"] * 1e9 / bpt, info["roof_llc_GBps"] * 1e9 / bpt
        rows.append({**base, "status": "ok", "recipe": recipe(mf, base["row"]), "file": str(path),
                     "file_mib": size / 2**20, "bits": bits, **r,
                     "decode_tok_s": dec, "prefill_tok_s": pre,
                     "decode_median": statistics.median(r["decode"]), "prefill_median": statistics.median(r["prefill"]),
                     "weights_mb": (bpt - kv_pos * ctx_pos) / 1e6,
                     "bytes_per_token": bpt, "roofline_tok_s": roof, "roofline_fraction": dec / roof,
                     "roofline_llc_tok_s": roof_llc, "roofline_llc_fraction": dec / roof_llc})
        say(f"{base['model']:>16s} {base['row']:14s} decode {dec:8.1f} tok/s  prefill {pre:8.1f} tok/s  peak "
            f"{r['peak_mib']:6.0f} MiB  bits {bits:.3f}  ppl {r['perplexity']}")
    order = {k: i for i, k in enumerate(ROWS)}
    names = [m[0] for m in models]
    rows.sort(key=lambda x: (names.index(x["model"]), order[x["row"]]))
    info["total_s"] = time.time() - t_start
    return {"info": info, "rows": rows, "comparisons": comparisons(rows)}


# The llama.cpp rows issue 12's decode targets name for each of our files.
ISSUE12_PAIRS = {"wq-q4": ("lcp-Q4_0",), "wq-3.25": ("lcp-Q3_K_M",), "wq-2.5": ("lcp-Q2_K", "lcp-IQ2_XXS")}


def comparisons(rows: list[dict]) -> list[dict]:
    """Each of our rows against llama.cpp in the same run and on the same model: the projection of the same
    plan (same bits), and the llama.cpp row with the most bits not above ours (ties: the fastest) — 'at
    equal or lower effective bits'. Also ONNX Runtime rows against our runtime on the same file."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    for ours in (r for r in ok if r["backend"] == "wqedge"):
        same = [r for r in ok if r["model"] == ours["model"] and r["backend"] == "llamacpp"]
        picks = []
        matched = ROWS[ours["row"]].matched
        proj = f"lcp-{matched}" if matched else ROWS[ours["row"]].file_key.replace("wq-", "lcp-plan-")
        picks += [("same bits" if matched else "same plan", r) for r in same if r["row"] == proj]
        lower = [r for r in same if r["bits"] <= ours["bits"] + 1e-3]
        if lower:
            best = max(lower, key=lambda r: (round(r["bits"], 3), r["decode_tok_s"]))
            if best["row"] != proj:
                picks.append(("nearest ≤ bits", best))
        # issue 12's named pairs (q4 against Q4_0; the plans against llama.cpp's types of equal or more bits)
        named = ISSUE12_PAIRS.get(ROWS[ours["row"]].file_key, ())
        picks += [("issue 12", r) for r in same if r["row"] in named and all(r is not p[1] for p in picks)]
        for how, th in picks:
            out.append(_compare(ours, th, how))
    for o_row in (r for r in ok if r["backend"] == "ort"):
        ref = next((r for r in ok if r["model"] == o_row["model"] and r["row"] == "wq-q4"), None)
        if ref:
            out.append(_compare(o_row, ref, "same file"))
    return out


def _ppl_change(a: dict, b: dict) -> list[float] | None:
    """[relative change of a's perplexity against b's in %, its paired standard error in %] over the windows both
    scored (wqedge.perplexity.paired_change), or None (no perplexity, or fewer than 2 windows)."""
    wa, wb = a.get("window_nll"), b.get("window_nll")
    if not wa or not wb or len(wa) != len(wb) or len(wa) < 2:
        return None
    from ..perplexity import paired_change
    return list(paired_change(wa, wb))


def _compare(a: dict, b: dict, how: str) -> dict:
    pa, pb = a.get("perplexity"), b.get("perplexity")
    c = {"model": a["model"], "row": a["row"], "vs": b["row"], "match": how, "bits": a["bits"], "vs_bits": b["bits"],
         "decode_ratio": a["decode_tok_s"] / b["decode_tok_s"], "prefill_ratio": a["prefill_tok_s"] / b["prefill_tok_s"],
         "peak_ratio": a["peak_mib"] / b["peak_mib"], "roofline_fraction": a["roofline_fraction"],
         "ppl": pa, "vs_ppl": pb, "ppl_change": _ppl_change(a, b)}
    if a["backend"] == "wqedge":
        c["decode_target"] = decode_target(a["row"])
        c["targets"] = {"decode": c["decode_ratio"] >= c["decode_target"],
                        "roofline": a["roofline_fraction"] >= TARGET_ROOFLINE,
                        "ppl_lower": None if pa is None or pb is None else pa <= pb}
    return c
