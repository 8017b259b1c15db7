"""Joint pruning + bit allocation vs quantization only vs prune-then-quantize, at equal bytes (issue 16).

    python bench/pruning.py                                   # llama-s, budgets 3.25, 2.5, 2.25, 2.0
    python bench/pruning.py --budgets 2.25,2.0 --max-prune 0.2 --seq-fraction 0.1

Rows per budget B (effective bits over the *unpruned* model's decoder weights, i.e. the same bytes):
  quant-only   greedy knapsack on the loss-aware damage table (wqedge.alloc.greedy)
  joint        wqedge.alloc.joint: the amount pruned searched from 0 to --max-prune in --step steps, structures
               (FFN groups of 32, query heads, KV groups) chosen by structure damage, the table rebuilt for the
               pruned shapes; every candidate converted (error feedback on 16 calibration windows) and measured on
               the 16 held-out calibration windows, as `wqedge plan --prune` does: a pruned candidate wins only if
               it measures lower than quantization only by more than one paired standard error; candidates
               whose calibrated prediction is > 25% above quantization only's measured loss are not converted
               (--check-all: every candidate is; --no-check: least predicted damage wins, the search before the check)
  sequential   prune --seq-fraction of the weights by structure damage first, then the greedy knapsack
All three are converted the same way (error feedback, wqedge.quant.feedback, --fb-seqs calibration windows) and
scored by perplexity (llama.cpp's definition, first --windows windows of 512 of eval.txt) on the fake-quantized
model, pruned structures zeroed (the same function as the pruned file: tests/test_pruned_shapes.py).
With --distill STEPS each row is also scored after light distillation (wqedge.quant.distill: codes frozen, scales,
offsets and norms trained against the unpruned fp model's layer outputs on the same calibration windows; a pruned
plan's kept rows and columns expanded with zeros, as `convert --distill` does): the recovery after pruning.
Writes a markdown table (stdout and --out.md) and the figures as --out.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    from wqedge.bench.report import add_fixture_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="3.25,2.5,2.25,2.0")
    ap.add_argument("--max-prune", type=float, default=0.3)
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--seq-fraction", type=float, default=0.1)
    ap.add_argument("--kinds", default="ffn,heads")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--fb-seqs", type=int, default=128)
    ap.add_argument("--n-seqs", type=int, default=32, help="calibration windows of 512 for the damage tables")
    ap.add_argument("--device", default=None)
    ap.add_argument("--distill", type=int, default=0, metavar="STEPS",
                    help="also score every row after light distillation (steps per decoder layer; 0: no)")
    ap.add_argument("--no-check", action="store_true", help="joint: choose by predicted damage, not measured loss")
    ap.add_argument("--check-all", action="store_true",
                    help="joint: convert and measure every candidate (default: those the calibrated prediction "
                         "does not rule out, as `wqedge plan --prune`)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pruning"))
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from wqedge.alloc.greedy import greedy_allocate
    from wqedge.alloc.joint import joint_allocate, pruned_allocation
    from wqedge.alloc.measure import ConvertedPlanLoss
    from wqedge.alloc.planner import DEFAULTS, PRUNE_CHECK_HELDOUT, plan_from_choice, prepare
    from wqedge.alloc.prune import select_pruning
    from wqedge.calib import calibration_tokens, default_device, tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.perplexity import perplexity
    from wqedge.quant.distill import distill_model, student_model
    from wqedge.quant.feedback import quantize_model
    from wqedge.structure_damage import structure_damage

    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    dev = default_device(a.device)
    kinds = tuple(a.kinds.split(","))
    ckpt = LlamaCheckpoint.open(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ckpt.spec.bos_token_id or 1
    eval_tokens = tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)
    calib_text = Path(a.calib).read_text(encoding="utf-8")
    fb = calibration_tokens(tok, calib_text, a.fb_seqs, 512, 0, bos_id=bos, seed=0).train

    model = ckpt.load_hf_model(torch.float32).to(dev)
    w0 = {lin.hf_name: model.get_parameter(lin.hf_name).detach().clone() for lin in ckpt.spec.linears()}

    @torch.no_grad()
    def ppl(m=None):
        m = model if m is None else m

        def fn(win):
            return m(torch.as_tensor(win, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        return perplexity(fn, eval_tokens, bos, 512, a.windows, batch_size=8).perplexity

    def restore():
        for n, w in w0.items():
            model.get_parameter(n).data.copy_(w)

    def score(plan):
        """(perplexity after error feedback, after --distill or None, distillation seconds)"""
        restore()
        chunks = quantize_model(model, plan, fb, device=dev)
        p = ppl()
        if not a.distill:
            return p, None, 0.0
        restore()                                     # the fp model is the teacher
        unprune = plan.unprune_weight if plan.pruning is not None else None
        res = distill_model(model, chunks, fb, None, a.distill, 0, dev, unprune=unprune)
        student = student_model(model, res.chunks, res.norms, dev, unprune=unprune)
        pd = ppl(student)
        del student
        return p, pd, res.seconds

    t0 = time.time()
    fp = ppl()
    log(f"fp16 perplexity {fp:.4f}")
    table, ctx = prepare(ckpt, 128, calib_text, 0, dev, progress=log, n_seqs=a.n_seqs, n_grad_seqs=a.n_seqs,
                         n_heldout=PRUNE_CHECK_HELDOUT, full_xtx=True)   # joint pruning re-slices XᵀX
    check = None
    if not a.no_check:
        conv = ConvertedPlanLoss(model, ctx.calib.train[: DEFAULTS["prune_check_fb_seqs"]], ctx.calib.heldout, dev)

        def check(pr, t, choice):
            return conv(plan_from_choice(ckpt, t, choice, b, "greedy", pruning=pr))
    sd = structure_damage(ctx.model, ctx.calib.train[: ctx.opts["n_grad_seqs"]], 32, device=dev, batch_size=2)
    log(f"preparation + structure damage: {time.time() - t0:.1f} s")
    rows = []
    for b in [float(x) for x in a.budgets.split(",")]:
        plans = {"quant-only": plan_from_choice(ckpt, table, greedy_allocate(table, b), b, "greedy")}
        restore()                                     # the check converts from the fp weights
        res = joint_allocate(ckpt, table, ctx, b, sd, kinds, a.max_prune, a.step, say=log, measure=check,
                             **({"screen_margin": None} if a.check_all else {}))
        plans["joint"] = plan_from_choice(ckpt, res.table, res.choice, b, "greedy", pruning=res.pruning,
                                          meta={"search": res.trials})
        pr = select_pruning(ckpt.spec, sd, a.seq_fraction, kinds)
        t, ch, _, _ = pruned_allocation(ckpt, table, ctx, b, sd, pr)
        plans["sequential"] = plan_from_choice(ckpt, t, ch, b, "greedy", pruning=pr)
        scored = {}                                   # a joint plan equal to quantization only is scored once
        for name, plan in plans.items():
            t1 = time.time()
            key = json.dumps({k: v for k, v in plan.to_dict().items() if k != "meta"}, sort_keys=True)
            if key not in scored:
                scored[key] = score(plan)
            p, pd, dist_s = scored[key]
            gone = plan.n_weights() - sum(tp.n_weights for tp in plan.tensors)
            row = {"budget": b, "method": name, "ppl": p, "effective_bits": plan.effective_bits(),
                   "pruned_fraction": gone / plan.n_weights(), "seconds": round(time.time() - t1, 1)}
            if pd is not None:
                row.update(ppl_distill=pd, distill_seconds=round(dist_s, 1))
            if name == "joint":
                row["search"] = res.trials
            rows.append(row)
            log(f"{b} {name}: ppl {p:.4f}" + ("" if pd is None else f" ({pd:.4f} after distillation)")
                + f", {plan.effective_bits():.4f} bits, pruned {100 * row['pruned_fraction']:.1f}%")
    md = ["| budget (bits) | quant-only | joint | sequential |", "|---|---|---|---|"]

    def cell_text(r):
        t = f"{r['ppl']:.3f}"
        if "ppl_distill" in r:
            t += f" → {r['ppl_distill']:.3f} distilled"
        return t + f" ({100 * r['pruned_fraction']:.0f}% pruned)"
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        cell = {r["method"]: r for r in rows if r["budget"] == b}
        md.append(f"| {b:g} | " + " | ".join(cell_text(cell[m]) if m in cell else "—"
                                               for m in ("quant-only", "joint", "sequential")) + " |")
    for r in rows:
        if r["method"] == "joint":
            md.append(f"\njoint search at {r['budget']:g} b (pruned fraction: predicted nats"
                      + (", measured nats on held-out calibration windows" if "measured" in r["search"][0] else "")
                      + "): " + "; ".join(f"{100 * t['fraction']:.0f}%: {t['predicted']:.4f}"
                                          + (f" / {t['measured']:.4f}" if "measured" in t else
                                             f" / not converted (calibrated {t['calibrated']:.4f})"
                                             if "calibrated" in t else "")
                                          + (" (kept)" if "chosen" in t else "") for t in r["search"]))
    md.append(f"\nfp16 {fp:.3f}; total {time.time() - t0:.0f} s. Command: python bench/pruning.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    text = "\n".join(md)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".md").write_text(text + "\n")
    Path(a.out + ".json").write_text(json.dumps({"fp16": fp, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
