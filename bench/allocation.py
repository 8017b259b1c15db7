"""Allocation benchmark: perplexity against effective bits per allocator, over calibration seeds, in one run.

    python bench/allocation.py                          # llama-s, calib.txt, eval.txt, greedy and rl, seed 0
    python bench/allocation.py --device cuda --plan-device cuda --seeds 0,1,2 --budgets 3.25,2.5,2.25,2.0,1.75 \
        --allocators greedy,rl --distill-budgets 2.0,1.75 --out run_s012
    python bench/allocation.py --merge run_a.json,run_b.json --out bench_allocation   # mean ± std over runs

Rows, for each seed and budget B (effective bits per weight, every scale/zero/protected column counted):
  uniform-minmax   the most precise single action that fits B, min-max round to nearest (no data)
  uniform-neuqi    same action, NeUQI fits weighted by diag(XᵀX) (what `wqedge convert --calib` does)
  greedy           loss-aware damage table + knapsack (wqedge.alloc.make_plan allocator="greedy", the default),
                   converted with error feedback (wqedge.quant.feedback, act-order within chunks)
  rl               PPO (wqedge.alloc.ppo) on the same table, started from the knapsack plan, rewarded by the
                   measured loss on held-out calibration windows (--measure-windows, plus --confirm-windows that
                   pick among the best searched plans and the knapsack's) of plans assembled from per-chunk fits
                   (--reward-fit; rl-rtn / rl-feedback name the fit); same conversion. When it returns the
                   knapsack plan itself the greedy row's perplexity is reused (same plan, same conversion).
  greedy+distill   at --distill-budgets: the greedy row's fitted chunks after light distillation (`--distill`,
                   wqedge.quant.distill, pipeline.DISTILL_STEPS steps per decoder layer, codes frozen)
The seed is the calibration sampling (wqedge.calib.windows_from_tokens: which of the evenly spaced windows are
held out; the statistics windows are the rest), shared by both allocators, PPO's own sampling and distillation;
error feedback's windows (the pipeline's count for the device: 256 on CUDA) do not depend on it. Perplexity is llama.cpp's definition (wqedge.perplexity): eval
text with a leading BOS, 512-token windows, second half scored, first 32 windows. Rows go to --out .json as
they come; --merge turns several such files into the markdown table of means ± standard deviations.

Variants (same statistics, see bench/results/allocation.md): greedy-fb (feedback-aware damage), greedy-prot
(protected-column actions, --protect), greedy-sub (the two-level subscale kinds q4s/q3s/q2s offered beside the
one-scale ones: blocks.ACTION_NAMES), greedy-norefit (conversion without the <= 2-bit refit) and their mixes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    from wqedge.bench.report import add_fixture_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="3.25,2.5,2.25,2.0,1.75")
    ap.add_argument("--allocators", default="greedy,rl")
    ap.add_argument("--seeds", default="0", help="calibration sampling seeds, comma separated")
    ap.add_argument("--device", default=None, help="conversion and evaluation device (default cuda if available)")
    ap.add_argument("--plan-device", default="cpu", help="statistics, damage table and PPO's measured plans")
    ap.add_argument("--plan-threads", type=int, default=2)
    ap.add_argument("--ppo-time", type=float, default=480.0, help="PPO time limit per budget, seconds")
    ap.add_argument("--ppo-iterations", type=int, default=30)
    ap.add_argument("--ppo-episodes", type=int, default=8)
    ap.add_argument("--measure-windows", type=int, default=32, help="held-out windows of PPO's measured reward")
    ap.add_argument("--confirm-windows", type=int, default=32, help="further held-out windows that pick PPO's answer")
    ap.add_argument("--reward-fit", default="feedback", help="PPO reward's chunk fits: feedback (per-chunk error "
                    "feedback) or rtn (NeUQI alone)")
    ap.add_argument("--distill-budgets", default="", help="budgets whose greedy plan is also distilled (--distill)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--protect", default="1,2,4",
                    help="protected-column counts offered to the greedy-*prot allocators")
    ap.add_argument("--merge", default="", help="comma-separated .json files of earlier runs: write their table only")
    ap.add_argument("--out", default="bench_allocation")
    a = ap.parse_args(argv)
    if a.merge:
        return merge([Path(p) for p in a.merge.split(",")], Path(a.out))

    from wqedge.alloc.greedy import greedy_allocate
    from wqedge.alloc.planner import plan_from_choice, prepare
    from wqedge.alloc.ppo import PPOConfig, measurer_for, ppo_allocate
    from wqedge.alloc.uniform import uniform_plan
    from wqedge.blocks import ACTION_NAMES
    from wqedge.calib import calibration_tokens, default_device, tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.damage import build_damage_table
    from wqedge.perplexity import perplexity
    from wqedge.pipeline import DISTILL_STEPS
    from wqedge.quant import distill
    from wqedge.quant.feedback import FEEDBACK_SEQS, dequantize, feedback_windows, quantize_model
    from wqedge.quant.fit import dequantize_chunk
    from wqedge.report import write_report

    t_start = time.time()
    dev = default_device(a.device)
    budgets = [float(b) for b in a.budgets.split(",")]
    dbudgets = {float(b) for b in a.distill_budgets.split(",") if b}
    allocs = a.allocators.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    ckpt = LlamaCheckpoint.open(a.model)
    linears = ckpt.spec.linears()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ckpt.spec.bos_token_id or 1
    eval_tokens = tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)
    calib_text = Path(a.calib).read_text(encoding="utf-8")

    model = ckpt.load_hf_model(torch.float32).to(dev)
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    W0 = {lin.hf_name: state0[lin.hf_name] for lin in linears}

    def restore():
        model.load_state_dict(state0)

    @torch.no_grad()
    def ppl():
        def logits_fn(win):
            return model(torch.as_tensor(win, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        return perplexity(logits_fn, eval_tokens, bos, 512, a.windows, batch_size=8)

    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    out = Path(a.out)
    results = []
    meta = {"argv": argv if argv is not None else sys.argv[1:], "device": str(dev), "plan_device": a.plan_device,
            "plan_threads": a.plan_threads, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"results": results, **meta}, indent=1, default=str))

    fp = ppl()
    log(f"fp16: {fp.perplexity:.4f}")
    results.append({"allocator": "fp16", "budget": 16.0, "effective_bits": 16.0, "ppl": fp.perplexity,
                    "ppl_all": fp.perplexity_all, "plan_s": 0.0})
    kw = dict(model_name=ckpt.spec.name, model_fingerprint=ckpt.fingerprint())
    threads = torch.get_num_threads()
    n_ho = a.measure_windows + a.confirm_windows if any(n.startswith("rl") for n in allocs) else None

    for seed in seeds:
        # shared preparation for the loss-aware allocators, on the planning device/threads
        torch.set_num_threads(a.plan_threads)
        t = time.time()
        popts = {} if n_ho is None else {"n_heldout": n_ho}
        table, ctx = prepare(ckpt, 128, calib_text, seed, a.plan_device, progress=log,
                             full_xtx=any("-fb" in n for n in allocs), **popts)
        prep_s = time.time() - t
        torch.set_num_threads(threads)
        log(f"seed {seed}: preparation (calibration, gradients, damage table) on {a.plan_device} x{a.plan_threads}: "
            f"{prep_s:.1f} s { {k: round(v, 1) for k, v in ctx.times.items()} }")
        meta.setdefault("prep_s", {})[seed] = prep_s
        diag = {k: v.diag.float() for k, v in ctx.input_stats.items()}
        fb_cal = calibration_tokens(tok, calib_text, feedback_windows(dev), 512, 0, bos_id=bos, seed=seed).train
        ds = calibration_tokens(tok, calib_text, FEEDBACK_SEQS, 512, 4, bos_id=bos, seed=seed) if dbudgets else None
        tables = {"greedy": table}
        pcfg = PPOConfig(seed=seed, time_limit=a.ppo_time, iterations=a.ppo_iterations, episodes=a.ppo_episodes,
                         measure_windows=a.measure_windows, confirm_windows=a.confirm_windows, reward_fit=a.reward_fit)
        measurers = {}            # reward fit -> PlanMeasurer, shared by the budgets (fits computed once)

        def table_for(name):   # damage-table variants on the same statistics: -fb feedback-aware, -prot protection
            if name not in tables:
                torch.set_num_threads(a.plan_threads)
                t = time.time()
                tables[name] = build_damage_table(
                    linears, ckpt.linear_weight, 128, ctx.input_stats, ctx.grad_stats, kind="kfac",
                    device=a.plan_device, max_rows=ctx.opts["max_rows"], feedback="-fb" in name,
                    protect=tuple(int(k) for k in a.protect.split(",")) if "prot" in name else (),
                    **({"actions": ACTION_NAMES} if "-sub" in name else {}))
                tables[name].meta["build_s"] = time.time() - t
                torch.set_num_threads(threads)
                log(f"{name} table: {tables[name].meta['build_s']:.1f} s, {len(tables[name].actions)} actions")
            return tables[name]

        def apply_rtn(plan):       # per-chunk fits, as wqedge.quantize.quantize_linear does
            from wqedge.quant.fit import fit_chunk
            from wqedge.units import chunk_bounds
            restore()
            for lin in linears:
                t_, w, h = plan.tensor(lin.hf_name), W0[lin.hf_name], diag[lin.hf_name].to(dev)
                chunks = [fit_chunk(w[:, s:e], act, m, h[s:e], p or None) for (s, e), act, m, p in
                          zip(chunk_bounds(t_.in_features, plan.group_size), t_.actions, t_.methods, t_.protected)]
                model.get_parameter(lin.hf_name).data.copy_(torch.cat([dequantize_chunk(c) for c in chunks], 1).to(dev))

        fitted = {}

        def apply_feedback(plan, refit=True):
            restore()
            fitted["last"] = quantize_model(model, plan, fb_cal, device=dev, batch_size=16, refit=refit)

        def record(name, b, plan, plan_s, convert, extra=None, same_as=None):
            t = time.time()
            if same_as is None:
                convert(plan)
                conv_s = time.time() - t
                r = ppl()
                restore()
                p_, pall = r.perplexity, r.perplexity_all
            else:                  # the very plan of an earlier row: same conversion, same perplexity
                conv_s, p_, pall = 0.0, same_as["ppl"], same_as["ppl_all"]
            row = {"allocator": name, "budget": b, "seed": seed, "effective_bits": plan.effective_bits(), "ppl": p_,
                   "ppl_all": pall, "plan_s": plan_s, "convert_s": conv_s, "histogram": plan.action_histogram(),
                   **(extra or {})}
            results.append(row)
            save()
            log(f"seed {seed} B={b} {name}: eff {row['effective_bits']:.4f} ppl {p_:.4f} plan {plan_s:.1f} s "
                f"convert {conv_s:.1f} s {row['histogram']} ({time.time() - t_start:.0f} s)")
            return row

        for b in budgets:
            rows = {}
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
                    rows[name] = record(name, b, p, prep_s + alloc_s, lambda p_: apply_feedback(p_, "norefit" not in name),
                                        {"alloc_s": alloc_s, "predicted": tb.plan_damage(ch), "protected_columns": n_prot,
                                         "choice": ch.tolist()})
                    if name == "greedy":
                        gfit = fitted["last"]
                    if seed == seeds[0] and name == "greedy":
                        write_report(p, Path(f"{a.out}_greedy_{b}"))
                elif name in ("rl", "rl-rtn", "rl-feedback"):
                    fit = name.split("-")[1] if "-" in name else a.reward_fit
                    if fit not in measurers:
                        measurers[fit] = measurer_for(table, ctx, PPOConfig(**{**vars(pcfg), "reward_fit": fit}))
                    t = time.time()
                    ch, info = ppo_allocate(table, b, pcfg, progress=log, measurer=measurers[fit])
                    alloc_s = time.time() - t
                    torch.set_num_threads(threads)
                    p = plan_from_choice(ckpt, table, ch, b, "rl")
                    g = rows.get("greedy")
                    same = g if g is not None and info["chose_knapsack"] else None
                    record(name, b, p, prep_s + alloc_s, apply_feedback,
                           {"alloc_s": alloc_s, "predicted": table.plan_damage(ch),
                            "ppo_measured_episodes": info["measured_episodes"], "ppo_iterations": len(info["history"]),
                            "units_changed": info["units_changed"], "chose_knapsack": info["chose_knapsack"],
                            "noise": info.get("noise"), "knapsack_measured": info.get("knapsack_measured"),
                            "best_score": info["best_score"], "measure_s": info["measure_seconds"],
                            "fit_s": measurers[fit].fit_seconds, "reward_fit": fit}, same_as=same)
            if b in dbudgets and "greedy" in rows:      # last, so a run stopped early has its allocator rows
                restore()
                res = distill.distill_model(model, gfit, ds.train, ds.heldout, DISTILL_STEPS, 0, dev, seed=seed)
                with torch.no_grad():
                    for n_, c_ in res.chunks.items():
                        model.get_parameter(n_).copy_(dequantize(c_).to(dev))
                    for n_, w_ in res.norms.items():
                        model.get_parameter(n_).copy_(w_.to(dev))
                r = ppl()
                restore()
                results.append({"allocator": "greedy+distill", "budget": b, "seed": seed,
                                "effective_bits": rows["greedy"]["effective_bits"], "ppl": r.perplexity,
                                "ppl_all": r.perplexity_all, "distill_s": res.seconds,
                                "distill_peak_mib": res.peak_bytes / 2**20, "distill_steps": DISTILL_STEPS})
                save()
                log(f"seed {seed} B={b} greedy+distill: ppl {r.perplexity:.4f} ({res.seconds:.1f} s)")
        for m in measurers.values():
            m.close()
    log(f"total {time.time() - t_start:.1f} s")
    return merge([out.with_suffix(".json")], out)


def _ms(v):
    v = np.asarray(v, float)
    if len(v) == 0:
        return "—"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _signed(v):
    v = np.asarray(v, float)
    if len(v) == 0:
        return "—"
    return f"{v.mean():+.4f}" if len(v) == 1 else f"{v.mean():+.4f} ± {v.std(ddof=1):.4f}"


def merge(files, out: Path) -> str:
    """The markdown tables of one or more runs' .json (a later file's row replaces an earlier one's): perplexity
    per budget and allocator, mean ± sample std over seeds; PPO against the knapsack paired by seed, with what
    PPO measured (its chosen plan's loss difference to the knapsack plan's on the search and confirm windows,
    the paired standard error, and the noise next to the differences ranked); distillation's gain."""
    rows, fp, meta = [], None, {}
    for f in files:
        d = json.loads(Path(f).read_text())
        meta = {k: v for k, v in d.items() if k != "results"}
        for r in d["results"]:
            if r["allocator"] == "fp16":
                fp = r["ppl"]
            else:
                rows.append(r)
    by = {(r["allocator"], r["budget"], r.get("seed", 0)): r for r in rows}
    order = lambda n: (n != "greedy", n.startswith("greedy+"), n)     # greedy, the rest, then greedy+distill
    allocs = sorted(dict.fromkeys(k[0] for k in by), key=order)
    budgets = sorted({k[1] for k in by}, reverse=True)
    seeds = sorted({k[2] for k in by})
    lines = [f"fp16 perplexity {fp:.3f}; cells: perplexity mean ± std over seeds {','.join(map(str, seeds))} "
             f"(n in brackets); device {meta.get('gpu') or meta.get('device')}", "",
             "| bits | " + " | ".join(allocs) + " |", "|---|" + "---|" * len(allocs)]
    for b in budgets:
        cells = []
        for n in allocs:
            v = [by[(n, b, s)]["ppl"] for s in seeds if (n, b, s) in by]
            cells.append(f"{_ms(v)} ({len(v)})" if v else "—")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    rls = [n for n in allocs if n.startswith("rl")]
    if rls and "greedy" in allocs:
        lines += ["", "| bits | allocator | − greedy (paired by seed) | = knapsack plan | units changed | measured Δ "
                  "vs knapsack plan per seed: search / confirm (confirm paired SE) | noise: median paired SE vs "
                  "median |Δ| of searched plans |", "|---|---|---|---|---|---|---|"]
        for b in budgets:
            for n in rls:
                rl = [(s, by[(n, b, s)]) for s in seeds if (n, b, s) in by]
                pair = [r["ppl"] - by[("greedy", b, s)]["ppl"] for s, r in rl if ("greedy", b, s) in by]
                if not rl:
                    continue
                nz = [r.get("noise") or {} for _, r in rl]
                lines.append(
                    f"| {b} | {n} | {_signed(pair)} | {sum(r['chose_knapsack'] for _, r in rl)}/{len(rl)} | "
                    + ", ".join(str(r["units_changed"]) for _, r in rl) + " | "
                    + "; ".join(f"{x.get('chosen_search_diff', 0):+.4f} / {x.get('chosen_confirm_diff', 0):+.4f} "
                                f"({x.get('chosen_confirm_se', 0):.4f})" for x in nz) + " | "
                    + "; ".join(f"{x.get('median_paired_se') or 0:.4f} vs {x.get('median_abs_diff') or 0:.4f}"
                                for x in nz) + " |")
    d_rows = [r for r in rows if r["allocator"] == "greedy+distill"]
    if d_rows:
        lines += ["", "| bits | greedy (error feedback) | greedy + `--distill` | gain | distill s (mean) |",
                  "|---|---|---|---|---|"]
        for b in budgets:
            dv = [by[("greedy+distill", b, s)] for s in seeds if ("greedy+distill", b, s) in by]
            if not dv:
                continue
            gv = [by[("greedy", b, r["seed"])]["ppl"] for r in dv]
            gain = [r["ppl"] - g for r, g in zip(dv, gv)]
            lines.append(f"| {b} | {_ms(gv)} | {_ms([r['ppl'] for r in dv])} | {_ms(gain)} | "
                         f"{np.mean([r['distill_s'] for r in dv]):.1f} |")
    md = "\n".join(lines)
    print(md)
    out.with_suffix(".md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
