#!/usr/bin/env python3
"""Conversion cost against model size (issue 13, "planning that scales with the model"): wall seconds per stage
and peak host memory of one whole `wqedge convert` (calibration, gradients, damage table, knapsack, error-feedback
fitting, writing), for random-weight LLaMA models of named real shapes built on the spot (no download).

    python bench/plan_scaling.py [--shapes llama-s,smollm-135m,tinyllama-1.1b] [--device cpu|cuda]
        [--calib FILE] [--bits 3.25] [--threads 2] [--modes auto,memory,stream] [--out FILE]

Each conversion runs in its own process (bench/convert_cost.py's convert_once: stage times from the CLI's own
lines, the child's peak RSS from wait4). Random weights make the quality meaningless but not the cost, which
depends on shapes only. Targets (issue 13): a 0.1 B model <= 5 min on 2 CPU cores; a 1.1B-shaped model <= 5 min on
one GPU in <= 6 GB of host memory. The projection for 7B/70B scales each stage by the work it does (see
`project`). --modes: each shape converted with the default choice of planning model (auto), the whole model in
memory (--no-stream-layers) and/or layer streaming (--stream-layers, wqedge/stream.py), to compare peak RSS. Rows
are appended to --out as they finish (a run cut short keeps what it measured). No assertions: this is a benchmark.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from convert_cost import convert_once  # noqa: E402

# name: hidden, layers, heads, kv heads, intermediate, vocab, tied (the real checkpoints' shapes)
SHAPES = {
    "llama-s": (512, 8, 8, 4, 1408, 8192, False),            # the fixture's shape
    "smollm-135m": (576, 30, 9, 3, 1536, 49152, True),       # hidden not a multiple of 128, GQA, tied
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, False),
    "tinyllama-4l": (2048, 4, 32, 4, 5632, 32000, False),    # TinyLlama's layers, 4 of them: memory comparisons
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, False),   # projection only (not built here)
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, False),
    "llama-3-70b": (8192, 80, 64, 8, 28672, 128256, False),
}


def linears(shape) -> list[tuple[int, int]]:
    """(N out, K in) of every decoder linear."""
    hidden, layers, heads, kv, inter, _, _ = shape
    hd = hidden // heads
    one = [(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden), (hidden, heads * hd),
           (inter, hidden), (inter, hidden), (hidden, inter)]
    return one * layers


def linear_weights(shape) -> int:
    return sum(n * k for n, k in linears(shape))


def chunks(shape, group: int = 128) -> int:
    return sum(math.ceil(k / group) for _, k in linears(shape))


def gptq_work(shape) -> int:
    """Σ N·K² + K³: GPTQ's column updates and the Cholesky factorisation of each linear."""
    return sum(n * k * k + k ** 3 for n, k in linears(shape))


def column_steps(shape) -> int:
    """Σ K over error feedback's column loops (on a GPU each step is a fixed number of kernel launches): one loop per
    input group since q/k/v and gate/up share one (wqedge.quant.gptq.gptq_linears), i.e. 4 loops per layer."""
    hidden, layers, heads, _, inter, _, _ = shape
    return layers * (hidden + heads * (hidden // heads) + hidden + inter)


def build(name: str, where: Path) -> Path:
    from wqedge.tinymodel import build_tiny_model
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[name]
    return build_tiny_model(where / name, hidden=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                            intermediate=inter, vocab_size=vocab, tie_embeddings=tied, dtype="float16",
                            tokenizer_vocab=min(vocab, 4000), init="normal")


PROBE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.calib import gradient_stats, layerwise_stats
from wqedge.stream import planning_model
ck = LlamaCheckpoint.open(sys.argv[1])
n, t = int(sys.argv[3]), int(sys.argv[4])
tok = torch.randint(3, ck.spec.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
tok[:, 0] = 1
t0 = time.time()
m = planning_model(ck, "cpu", sys.argv[2] == "stream")
st = layerwise_stats(m, tok, device="cpu", full_xtx=128, batch_size=2)
t1 = time.time()
gs = gradient_stats(m, tok, device="cpu", batch_size=2)
print(f"inputs {t1 - t0:.1f} gradients {time.time() - t1:.1f}")
"""


def probe_once(model: Path, mode: str, windows: int, seqlen: int, threads: int) -> dict:
    """Peak RSS (MiB) of the planner's statistics alone (input statistics with XᵀX's diagonal blocks, then the LM
    gradients) on `windows` random windows of `seqlen` tokens on the CPU, with the whole model in memory (mode
    "memory") or streamed ("stream"), in a child process: the part of planning whose memory the planning model sets,
    at a fraction of a conversion's time."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-c", PROBE, str(model), mode, str(windows), str(seqlen), str(threads)],
                             stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)        # this child's own peak RSS
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"probe failed:\n{stderr[-3000:]}")
    times = dict(zip(*[iter(stdout.split()[-4:])] * 2))
    return {"rss_mib": usage.ru_maxrss / 1024, **{k: float(v) for k, v in times.items()}}


def project(row: dict, measured: str, target: str, device: str = "cpu") -> tuple[float, float]:
    """(low, high) seconds for `target`, each stage scaled from a measured row by the work it does: input
    statistics and gradients are passes over a fixed number of tokens (∝ linear weights); the damage table fits
    at most max_rows rows of every chunk x action (∝ chunks); fitting on CPU cores is between ∝ linear weights
    (NeUQI fits and forward passes over the feedback windows: low) and ∝ Σ N·K² + K³ (GPTQ's updates: high); on a
    GPU it is launch-bound, ∝ Σ K column steps (low; measured 0.73 ms a step on llama-s, 0.57 on SmolLM-135M),
    up to ∝ weights (high, once the steps become compute-bound). Same device as the measured row."""
    m, t = SHAPES[measured], SHAPES[target]
    r = linear_weights(t) / linear_weights(m)
    fixed = (row.get("inputs", 0) + row.get("gradients", 0)) * r + row.get("damage table", 0) * chunks(t) / chunks(m)
    fit = row.get("fitting", 0)
    if device == "cuda":
        return fixed + fit * column_steps(t) / column_steps(m), fixed + fit * r
    return fixed + fit * r, fixed + fit * gptq_work(t) / gptq_work(m)


FEEDBACK_GROUPS = 4   # linear groups per decoder layer that error feedback fits in parallel (q/k/v, o, gate/up, down)


def project_processes(row: dict, measured: str, target: str, nproc: int, device: str = "cpu") -> tuple[float, float]:
    """(low, high) seconds for `target` planned by `nproc` processes (--distributed, one GPU or core set each),
    from a one-process row: `project`'s per-stage scaling, then the split stages divided by the processes that
    share them — input statistics, gradients and the damage table by nproc (windows and linears split), error
    feedback by min(nproc, FEEDBACK_GROUPS) (one owner per linear group of a layer) — and the rest of the run
    (tokenizing, loading, planning, writing: total minus the stages) unchanged. An ideal split: collectives and
    imbalance are not counted (measured on 2 CPU processes: 1.2-1.35x for the split stages, see plan_distributed.md)."""
    m, t = SHAPES[measured], SHAPES[target]
    r = linear_weights(t) / linear_weights(m)
    stages = sum(row.get(k, 0) for k in ("inputs", "gradients", "damage table", "fitting"))
    rest = max(row.get("total", 0) - stages, 0) * r                  # loading and writing grow with the model
    split = ((row.get("inputs", 0) + row.get("gradients", 0)) * r
             + row.get("damage table", 0) * chunks(t) / chunks(m)) / nproc
    fit = row.get("fitting", 0)
    lo_fit, hi_fit = (fit * column_steps(t) / column_steps(m), fit * r) if device == "cuda" else \
        (fit * r, fit * gptq_work(t) / gptq_work(m))
    k = min(nproc, FEEDBACK_GROUPS)
    return rest + split + lo_fit / k, rest + split + hi_fit / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-s,smollm-135m")
    ap.add_argument("--device", default=None, help="planning device (default: cuda if available, else cpu)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the fixture's calib.txt)")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the Markdown table here (rows appended as they finish)")
    ap.add_argument("--modes", default="auto", help="comma list of auto (the CLI's default planning model), memory "
                    "(--no-stream-layers: the whole model held), stream (--stream-layers: one decoder layer at a time)")
    ap.add_argument("--feedback-windows", type=int, default=None, help="passed to convert (default: its own)")
    ap.add_argument("--nproc", default="1", help="comma list of process counts: each shape also converted under "
                    "torchrun with --distributed (docs/distributed.md), --threads threads per process")
    ap.add_argument("--probe", default=None, metavar="WINDOWS,SEQLEN",
                    help="instead of converting: peak RSS of the planner's statistics and gradients alone on the CPU "
                         "(probe_once), for each of --modes memory,stream, on WINDOWS random windows of SEQLEN tokens")
    a = ap.parse_args()
    calib = a.calib or str(Path(os.environ.get("WQEDGE_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "text" / "calib.txt")
    if not Path(calib).is_file():
        raise SystemExit(f"calibration text {calib} not found (--calib FILE)")
    calib = str(Path(calib).resolve())    # each conversion runs in its output folder
    extra = ["--device", a.device] if a.device else []
    if a.feedback_windows:
        extra += ["--feedback-windows", str(a.feedback_windows)]
    mode_args = {"auto": [], "memory": ["--no-stream-layers"], "stream": ["--stream-layers"]}
    modes = a.modes.split(",")
    if any(m not in mode_args for m in modes):
        raise SystemExit(f"--modes: each of {', '.join(mode_args)}")
    nprocs = [int(n) for n in a.nproc.split(",")]
    head = (f"# bench/plan_scaling.py --shapes {a.shapes} --bits {a.bits} --device {a.device or 'default'} "
            f"--threads {a.threads} --modes {a.modes} --nproc {a.nproc}"
            + (f" --feedback-windows {a.feedback_windows}" if a.feedback_windows else "")
            + f"; host {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    if a.probe:
        n, t = (int(v) for v in a.probe.split(","))
        out = [head, "", f"Planner statistics only (--probe {a.probe}), CPU, {a.threads} threads:", "",
               "| shape | mode | parameters | inputs s | gradients s | peak RSS MiB |", "|---|---|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in a.shapes.split(","):
                path = build(name, Path(tmp))
                from wqedge.checkpoint import LlamaCheckpoint
                n_params = LlamaCheckpoint.open(path).n_params
                for mode in (m for m in modes if m != "auto"):
                    r = probe_once(path, mode, n, t, a.threads)
                    out.append(f"| {name} | {mode} | {n_params / 1e6:.0f} M | {r.get('inputs', 0):.1f} | "
                               f"{r.get('gradients', 0):.1f} | {r['rss_mib']:.0f} |")
                    print(out[-1], flush=True)
        text = "\n".join(out) + "\n"
        print(text)
        if a.out:
            Path(a.out).write_text(text)
        return
    rows = []
    cols = ("inputs", "gradients", "damage table", "plan", "fitting", "total")
    lines = [head, "", "| shape | mode | processes | linear weights | " + " | ".join(f"{c} s" for c in cols)
             + " | peak RSS MiB (per process) |", "|---" * (len(cols) + 5) + "|"]
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes.split(","):
            path = build(name, Path(tmp))
            for mode, nproc in ((m, n) for m in modes for n in nprocs):
                row = convert_once(ROOT, str(path), Path(tmp) / f"{name}.gguf", calib, a.bits, a.threads,
                                   extra=extra + mode_args[mode], nproc=nproc)
                row["name"], row["mode"], row["weights"], row["nproc"] = name, mode, linear_weights(SHAPES[name]), nproc
                rows.append(row)
                print(f"{name} ({mode}, {nproc} process{'es' if nproc > 1 else ''}): total {row['total']:.1f} s, "
                      f"peak RSS {row['rss_mib']:.0f} MiB; "
                      + ", ".join(f"{k} {row[k]:.1f}" for k in ("inputs", "gradients", "damage table", "plan",
                                                                "fitting") if k in row), flush=True)
                line = (f"| {name} | {mode} | {nproc} | {row['weights'] / 1e6:.0f} M | "
                        + " | ".join("-" if row.get(c) is None else f"{row[c]:.1f}" for c in cols)
                        + f" | {row['rss_mib']:.0f} |")
                lines.append(line)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(line + "\n")
            for shp in (path / "model.safetensors", ):
                if shp.exists():
                    shp.unlink()
    big = max(rows, key=lambda r: (r["weights"], -r["nproc"]))   # the projection scales a one-process row
    lines += ["", f"Projection from {big['name']} on the same device (`project`: statistics and gradients ∝ linear "
              "weights, damage table ∝ chunks, fitting ∝ Σ K column steps on a GPU up to ∝ weights; on CPU cores "
              "between ∝ weights and ∝ Σ N·K² + K³):", "",
              "| shape | linear weights | projected s |", "|---|---|---|"]
    for t in [n for n in SHAPES if linear_weights(SHAPES[n]) > big["weights"]]:
        lo, hi = project(big, big["name"], t, "cuda" if (a.device or "").startswith("cuda") else "cpu")
        lines.append(f"| {t} | {linear_weights(SHAPES[t]) / 1e9:.1f} B | {lo:.0f} – {hi:.0f} |")
    dev = "cuda" if (a.device or "").startswith("cuda") else "cpu"
    counts = (1, 2, 4, 8)
    lines += ["", f"Projection per process count under --distributed (`project_processes`: statistics, gradients and "
              f"damage table / N, error feedback / min(N, {FEEDBACK_GROUPS}), the rest unchanged; an ideal split):", "",
              "| shape | " + " | ".join(f"{n} process{'es' if n > 1 else ''} s" for n in counts) + " |",
              "|---" * (len(counts) + 1) + "|"]
    for t in [n for n in SHAPES if linear_weights(SHAPES[n]) >= big["weights"]]:
        cells = [project_processes(big, big["name"], t, n, dev) for n in counts]
        lines.append(f"| {t} | " + " | ".join(f"{lo:.0f} – {hi:.0f}" for lo, hi in cells) + " |")
    out = "\n".join(lines) + "\n"
    print(out)
    if a.out:
        Path(a.out).write_text(out)


if __name__ == "__main__":
    main()
