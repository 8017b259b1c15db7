"""Allocation benchmark: perplexity against effective bits for four allocators, measured in one run.

    python bench/allocation.py                          # llama-s, calib.txt, eval.txt, every budget
    python bench/allocation.py --device cuda --budgets 2.25,3.25 --ppo-time 120

Rows, for each budget B (effective bits per weight, every scale/zero/protected column counted):
  uniform-minmax   the most precise single action that fits B, min-max round to nearest (no data)
  uniform-neuqi    same action, NeUQI fits weighted by diag(XᵀX) (what `wqedge convert --calib` does)
  greedy           loss-aware damage table + knapsack (wqedge.alloc.make_plan allocator="greedy"),
                   converted with error feedback (wqedge.quant.feedback, act-order within chunks)
  rl               PPO (WINDQuant) on the same table, measured episodes, same conversion
Perplexity is llama.cpp's definition (wqedge.perplexity): eval text with a leading BOS, 512-token windows,
second half scored, first 32 windows. Planning runs on --plan-device with --plan-threads CPU threads (the
2-core laptop setting by default); the calibration statistics and damage table are computed once and
shared by greedy and rl (their planning time = that preparation + their own allocation time).
Writes a markdown table (stdout and --out), a JSON of every figure, and the greedy plans' heatmaps.

Variants (same statistics, see bench/results/allocation.md): greedy-fb (feedback-aware damage), greedy-prot
(protected-column actions, --protect), greedy-norefit (conversion without the <= 2-bit refit) and their mixes.

On a 2-core CPU the whole run takes well over an hour (error-feedback conversion of 10 plans, PPO); on one
GPU about 9 minutes. Measured 2026-11-24, H100, `--device cuda --plan-device cuda --ppo-time 120`:

| bits | uniform-minmax | uniform-neuqi | greedy | rl |
|---|---|---|---|---|
| 2.25 | 13.961 (2.250 b) | 8.723 (2.250 b) | 7.080 (2.250 b) | 7.094 (2.250 b) |
| 2.5  | 13.961 (2.250 b) | 8.723 (2.250 b) | 6.869 (2.499 b) | 6.875 (2.499 b) |
| 3.0  | 13.961 (2.250 b) | 8.723 (2.250 b) | 6.514 (3.000 b) | 6.519 (2.987 b) |
| 3.25 | 6.862 (3.250 b)  | 6.652 (3.250 b) | 6.426 (3.250 b) | 6.458 (3.249 b) |
| 4.25 | 6.411 (4.250 b)  | 6.375 (4.250 b) | 6.309 (4.249 b) | 6.335 (4.249 b) |

fp16: 6.263. Planning on 2 pinned CPU cores (make_plan, 2.5 bits): greedy 76 s, rl 287 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    from wqedge.bench.report import add_fixture_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="2.25,2.5,3.0,3.25,4.25")
    ap.add_argument("--allocators", default="uniform-minmax,uniform-neuqi,greedy,rl")
    ap.add_argument("--device", default=None, help="conversion and evaluation device (default cuda if available)")
    ap.add_argument("--plan-device", default="cpu")
    ap.add_argument("--plan-threads", type=int, default=2)
    ap.add_argument("--ppo-time", type=float, default=480.0, help="PPO time limit per budget, seconds")
    ap.add_argument("--ppo-iterations", type=int, default=30)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protect", default="1,2,4",
                    help="protected-column counts offered to the greedy-*prot allocators")
    ap.add_argument("--out", default="bench_allocation")
    a = ap.parse_args(argv)

    from wqedge.alloc.greedy import greedy_allocate
    from wqedge.quant.feedback import FEEDBACK_SEQS, quantize_model
    from wqedge.alloc.planner import plan_from_choice, prepare
    from wqedge.damage import build_damage_table
    from wqedge.alloc.ppo import PPOConfig, ppo_allocate
    from wqedge.alloc.uniform import uniform_plan
    from wqedge.calib import calibration_tokens, default_device, tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.perplexity import perplexity
    from wqedge.quant.fit import dequantize_chunk
    from wqedge.report import write_report

    dev = default_device(a.device)
    budgets = [float(b) for b in a.budgets.split(",")]
    allocs = a.allocators.split(",")
    ckpt = LlamaCheckpoint.open(a.model)
    linears = ckpt.spec.linears()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ckpt.spec.bos_token_id or 1
    eval_tokens = tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)
    calib_text = Path(a.calib).read_text(encoding="utf-8")

    model = ckpt.load_hf_model(torch.float32).to(dev)
    W0 = {lin.hf_name: model.get_parameter(lin.hf_name).detach().clone() for lin in linears}

    def restore():
        for n, w in W0.items():
            model.get_parameter(n).data.copy_(w)

    @torch.no_grad()
    def ppl():
        def logits_fn(win):
            return model(torch.as_tensor(win, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        return perplexity(logits_fn, eval_tokens, bos, 512, a.windows, batch_size=8)

    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    results = []
    fp = ppl()
    log(f"fp16: {fp.perplexity:.4f}")
    results.append({"allocator": "fp16", "budget": 16.0, "effective_bits": 16.0, "ppl": fp.perplexity,
                    "ppl_all": fp.perplexity_all, "plan_s": 0.0})

    # shared preparation for the loss-aware allocators, on the planning device/threads
    threads = torch.get_num_threads()
    torch.set_num_threads(a.plan_threads)
    t = time.time()
    table, ctx = prepare(ckpt, 128, calib_text, a.seed, a.plan_device, progress=log, full_xtx=True)  # -fb tables
    prep_s = time.time() - t
    torch.set_num_threads(threads)
    log(f"preparation (calibration, gradients, damage table) on {a.plan_device} x{a.plan_threads}: {prep_s:.1f} s "
        f"{ {k: round(v, 1) for k, v in ctx['times'].items()} }")
    diag = {k: v.diag.float() for k, v in ctx.input_stats.items()}
    bos_cal = calibration_tokens(tok, calib_text, FEEDBACK_SEQS, 512, 0, bos_id=bos, seed=a.seed).train
    kw = dict(model_name=ckpt.spec.name, model_fingerprint=ckpt.fingerprint())

    tables = {"greedy": table}

    def table_for(name):   # damage-table variants on the same statistics: -fb feedback-aware, -prot protection
        if name not in tables:
            torch.set_num_threads(a.plan_threads)
            t = time.time()
            tables[name] = build_damage_table(
                linears, ckpt.linear_weight, 128, ctx.input_stats, ctx.grad_stats, kind="kfac",
                device=a.plan_device, max_rows=ctx.opts["max_rows"], feedback="-fb" in name,
                protect=tuple(int(k) for k in a.protect.split(",")) if "prot" in name else ())
            tables[name].meta["build_s"] = time.time() - t
            torch.set_num_threads(threads)
            log(f"{name} table: {tables[name].meta['build_s']:.1f} s, {len(tables[name].actions)} actions")
        return tables[name]

    def apply_rtn(plan):       # per-chunk fits, as wqedge.quantize.quantize_linear does
        from wqedge.quant.fit import fit_chunk
        from wqedge.units import chunk_bounds
        restore()
        for lin in linears:
            t, w, h = plan.tensor(lin.hf_name), W0[lin.hf_name], diag[lin.hf_name].to(dev)
            chunks = [fit_chunk(w[:, s:e], act, m, h[s:e], p or None) for (s, e), act, m, p in
                      zip(chunk_bounds(t.in_features, plan.group_size), t.actions, t.methods, t.protected)]
            model.get_parameter(lin.hf_name).data.copy_(torch.cat([dequantize_chunk(c) for c in chunks], 1).to(dev))

    def apply_feedback(plan, refit=True):
        restore()
        quantize_model(model, plan, bos_cal, device=dev, batch_size=16, refit=refit)

    def record(name, b, plan, plan_s, convert, extra=None):
        t = time.time()
        convert(plan)
        conv_s = time.time() - t
        r = ppl()
        restore()
        row = {"allocator": name, "budget": b, "effective_bits": plan.effective_bits(), "ppl": r.perplexity,
               "ppl_all": r.perplexity_all, "plan_s": plan_s, "convert_s": conv_s,
               "histogram": plan.action_histogram(), **(extra or {})}
        results.append(row)
        log(f"B={b} {name}: eff {row['effective_bits']:.4f} ppl {r.perplexity:.4f} plan {plan_s:.1f} s "
            f"convert {conv_s:.1f} s {row['histogram']}")
        return row

    for b in budgets:
        for name in allocs:
            if name == "uniform-minmax":
                t = time.time()
                p = uniform_plan(linears, 128, b, "minmax", **kw)
                record(name, b, p, time.time() - t, apply_rtn)
            elif name == "uniform-neuqi":
                t = time.time()
                p = uniform_plan(linears, 128, b, "neuqi", **kw)
                record(name, b, p, time.time() - t, apply_rtn)
            elif name == "uniform-neuqi-fb":
                p = uniform_plan(linears, 128, b, "neuqi", **kw)
                record(name, b, p, 0.0, apply_feedback)
            elif name.startswith("greedy"):
                tb = table_for(name.replace("-norefit", ""))   # -norefit changes the conversion only
                torch.set_num_threads(a.plan_threads)
                t = time.time()
                ch = greedy_allocate(tb, b)
                alloc_s = time.time() - t
                torch.set_num_threads(threads)
                p = plan_from_choice(ckpt, tb, ch, b, "greedy", meta={"predicted_damage": tb.plan_damage(ch)})
                n_prot = sum(len(c) for t_ in p.tensors for c in t_.protected)
                record(name, b, p, prep_s + alloc_s, lambda p_: apply_feedback(p_, "norefit" not in name),
                       {"alloc_s": alloc_s, "predicted": tb.plan_damage(ch), "protected_columns": n_prot})
                write_report(p, Path(f"{a.out}_greedy_{b}"))
            elif name == "rl":
                torch.set_num_threads(a.plan_threads)
                t = time.time()
                cfg = PPOConfig(seed=a.seed, time_limit=a.ppo_time, iterations=a.ppo_iterations)
                ch, info = ppo_allocate(table, b, cfg, ctx={**ctx, "device": torch.device(a.plan_device)},
                                        progress=None)
                alloc_s = time.time() - t
                torch.set_num_threads(threads)
                p = plan_from_choice(ckpt, table, ch, b, "rl")
                record(name, b, p, prep_s + alloc_s, apply_feedback,
                       {"alloc_s": alloc_s, "predicted": table.plan_damage(ch),
                        "ppo_measured_episodes": info["measured_episodes"],
                        "ppo_iterations": len(info["history"])})

    # table
    lines = ["| bits | " + " | ".join(allocs) + " |", "|---|" + "---|" * len(allocs)]
    for b in budgets:
        cells = []
        for name in allocs:
            r = next((r for r in results if r["allocator"] == name and r["budget"] == b), None)
            cells.append("—" if r is None else f"{r['ppl']:.3f} ({r['effective_bits']:.3f} b, {r['plan_s']:.1f} s)")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    md = (f"fp16 perplexity {fp.perplexity:.3f}; cells: perplexity (effective bits, planning seconds on "
          f"{a.plan_device} x{a.plan_threads}); conversion/eval on {dev}\n\n" + "\n".join(lines))
    print(md)
    Path(f"{a.out}.md").write_text(md + "\n")
    Path(f"{a.out}.json").write_text(json.dumps({"results": results, "prep_s": prep_s,
                                                 "prep_times": ctx.times, "device": str(dev),
                                                 "plan_device": a.plan_device, "plan_threads": a.plan_threads},
                                                indent=1))


if __name__ == "__main__":
    main()
