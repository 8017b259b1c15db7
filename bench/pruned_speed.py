"""Speed and memory of a pruned file against the unpruned file of the same budget (issue 16), in our runtime and in
llama.cpp, measured in one run.

    python bench/pruned_speed.py                          # llama-s, 2.5 bits, 25% pruned (FFN groups and heads)
    python bench/pruned_speed.py --budget 3.25 --fraction 0.3 --threads 1,2 --ppl 8

Two plans at the same budget (effective bits over the *unpruned* model's decoder weights, i.e. the same bytes):
  unpruned   the greedy knapsack on the loss-aware damage table (wqedge.alloc.greedy)
  pruned     the --fraction of the weights of least structure damage pruned first (wqedge.alloc.prune), then the
             knapsack on the pruned shapes at the same budget: the freed bytes go to wider codes elsewhere
Each plan is lowered twice: our GGUF (error feedback on --fb-seqs windows) and the llama.cpp GGUF (--target llamacpp,
per-layer FFN lengths and head counts; stock llama.cpp types). Every file is timed in a process of its own
(wqedge.bench.worker: prefill and decode tokens/s, best of --reps; peak RSS of that process), at every --threads, the
files alternating; with --ppl N also perplexity on the first N windows of 512 of the evaluation text. Where the time
goes: the same bytes per token either way, so decode (bound by reading the weights) should change little, while
prefill (bound by multiply-adds, which the pruned structures no longer cost) and the KV cache (pruned KV heads) shrink.
Writes Markdown (stdout and --out.md) and the figures (--out.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(job: dict, timeout: float = 1800) -> dict:
    """wqedge.bench.worker in its own process (its peak RSS is the backend's own); errors as {"error": ...}."""
    r = subprocess.run([sys.executable, "-m", "wqedge.bench.worker", json.dumps(job)], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    from wqedge.bench.report import add_fixture_args, write_markdown

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the decoder weights pruned")
    ap.add_argument("--kinds", default="ffn,heads")
    ap.add_argument("--prune-group", type=int, default=None,
                    help="FFN channels per pruned group (default: as `convert --target llamacpp --prune`, 256 where "
                         "the FFN length is a multiple of 256 so llama.cpp's k-quants still fit, else 32)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the files at each thread count")
    ap.add_argument("--ppl", type=int, default=0, help="perplexity windows of 512 (0: none)")
    ap.add_argument("--n-seqs", type=int, default=16, help="calibration windows of 512 for the damage tables")
    ap.add_argument("--fb-seqs", type=int, default=32, help="calibration windows for error feedback")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default="/tmp/wqedge-pruned-speed", help="folder for the four files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pruned_speed"))
    a = ap.parse_args(argv)

    import numpy as np
    from transformers import AutoTokenizer

    from wqedge import pipeline
    from wqedge.alloc.greedy import greedy_allocate
    from wqedge.alloc.joint import pruned_allocation
    from wqedge.alloc.planner import plan_from_choice, prepare
    from wqedge.alloc.prune import select_pruning
    from wqedge.calib import default_device, tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.cli import default_prune_group
    from wqedge.structure_damage import structure_damage

    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    dev = default_device(a.device)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = LlamaCheckpoint.open(a.model)
    calib_text = Path(a.calib).read_text(encoding="utf-8")
    table, ctx = prepare(ckpt, 128, calib_text, 0, dev, progress=log, n_seqs=a.n_seqs, n_grad_seqs=a.n_seqs,
                         full_xtx=True)   # the pruned shapes' tables re-slice XᵀX
    kinds = tuple(a.kinds.split(","))
    group = a.prune_group or default_prune_group(ckpt.spec, kinds, "llamacpp")
    sd = structure_damage(ctx.model, ctx.calib.train[: ctx.opts["n_grad_seqs"]], group, device=dev, batch_size=2)
    pr = select_pruning(ckpt.spec, sd, a.fraction, kinds)
    t, ch, _, _ = pruned_allocation(ckpt, table, ctx, a.budget, sd, pr)
    plans = {"unpruned": plan_from_choice(ckpt, table, greedy_allocate(table, a.budget), a.budget, "greedy"),
             "pruned": plan_from_choice(ckpt, t, ch, a.budget, "greedy", pruning=pr)}
    log(f"plans: {time.time() - t0:.0f} s")

    files, info = {}, {}
    for name, plan in plans.items():
        gone = plan.n_weights() - sum(tp.n_weights for tp in plan.tensors)
        info[name] = {"effective_bits": plan.effective_bits(), "pruned_fraction": gone / plan.n_weights()}
        pipeline.set_feedback_windows(plan, a.fb_seqs)
        files[("wqedge", name)] = pipeline.convert(ckpt, plan, work / f"{name}.gguf", calib_text=calib_text,
                                                   device=dev, distill=0).path
        try:
            files[("llamacpp", name)] = pipeline.convert(ckpt, plan, work / f"{name}-llamacpp.gguf",
                                                         target="llamacpp", calib_text=calib_text, device=dev).path
        except pipeline.ConvertError as e:   # e.g. a width no k-quant block divides: reported, the rest still runs
            info[name]["llamacpp_error"] = str(e)
            log(f"{name}: no llama.cpp file: {e}")
        log(f"{name}: {info[name]['effective_bits']:.4f} bits, {100 * info[name]['pruned_fraction']:.1f}% pruned")

    ppl = None
    if a.ppl:
        tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        bos = ckpt.spec.bos_token_id or 1
        np.save(work / "eval.npy", np.asarray(tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)))
        ppl = {"tokens": str(work / "eval.npy"), "bos": bos, "ctx": 512, "windows": a.ppl}

    rows = []
    for threads in [int(x) for x in a.threads.split(",")]:
        for rnd in range(a.rounds):
            for (backend, name), path in files.items():
                job = {"backend": backend, "model": str(path), "threads": threads, "prefill": a.prefill,
                       "decode": a.decode, "reps": a.reps, "act": "q8",
                       "ppl": ppl if (rnd == 0 and threads == int(a.threads.split(",")[0])) else None}
                r = _worker(job)
                r.update(backend=backend, plan=name, threads=threads, round=rnd, file_mib=path.stat().st_size / 2**20)
                rows.append(r)
                log(json.dumps({k: r.get(k) for k in ("backend", "plan", "threads", "round", "peak_mib", "error")}
                               | {"prefill": max(r.get("prefill") or [0]), "decode": max(r.get("decode") or [0])}))

    def best(backend, name, threads, key):
        v = [max(r[key]) for r in rows if (r["backend"], r["plan"], r["threads"]) == (backend, name, threads)
             and r.get(key)]
        return max(v) if v else None

    def peak(backend, name, threads):
        v = [r["peak_mib"] for r in rows if (r["backend"], r["plan"], r["threads"]) == (backend, name, threads)
             and r.get("peak_mib")]
        return min(v) if v else None

    md = [f"# Pruned vs unpruned at {a.budget:g} bits ({Path(a.model).name})", "",
          f"`python bench/pruned_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    for name in plans:
        md.append(f"- {name}: {info[name]['effective_bits']:.4f} effective bits over the unpruned decoder weights, "
                  f"{100 * info[name]['pruned_fraction']:.1f}% of them pruned")
    md += ["", "| backend | threads | file MiB (unpruned / pruned) | prefill tok/s | decode tok/s | peak RSS MiB |"
           + (" perplexity |" if ppl else ""), "|---|---|---|---|---|---|" + ("---|" if ppl else "")]
    for backend in ("wqedge", "llamacpp"):
        for threads in [int(x) for x in a.threads.split(",")]:
            def pair(f):
                u, p = f("unpruned"), f("pruned")
                if u is None or p is None:
                    return "—"
                return f"{u:.1f} / {p:.1f} ({p / u:.2f}x)"
            if not all((backend, n) in files for n in plans):
                md.append(f"| {backend} | {threads} | no file: "
                          + "; ".join(info[n].get(f"{backend}_error", "") for n in plans) + " |")
                continue
            cells = [pair(lambda n: files[(backend, n)].stat().st_size / 2**20),
                     pair(lambda n: best(backend, n, threads, "prefill")),
                     pair(lambda n: best(backend, n, threads, "decode")),
                     pair(lambda n: peak(backend, n, threads))]
            if ppl:
                pp = {n: next((r["perplexity"] for r in rows if (r["backend"], r["plan"]) == (backend, n)
                               and r.get("perplexity")), None) for n in plans}
                cells.append(" / ".join(f"{pp[n]:.3f}" if pp[n] else "—" for n in plans))
            md.append(f"| {backend} | {threads} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        md += ["", "Failed runs: " + "; ".join(f"{r['backend']} {r['plan']} t={r['threads']}: {r['error']}"
                                                for r in errors)]
    md += ["", f"Best of {a.rounds} rounds x {a.reps} repetitions (prefill {a.prefill} tokens, decode {a.decode}); "
           f"peak RSS: the smallest of the rounds' (each its own process). Our runtime with int8 activations. "
           f"Total {time.time() - t0:.0f} s."]
    write_markdown(md, a.out + ".md")
    Path(a.out + ".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
