"""Light distillation benchmark (issue 17): perplexity without and with NeUQI light distillation, one run.

    python bench/distill.py --device cuda                       # llama-s, calib.txt, eval.txt, 3.25/2.5/2.25/2.0
    python bench/distill.py --device cuda --configs 128@1e-3,128@1e-3+e2e64@2e-4 --budgets 2.25

For each budget: the default pipeline's greedy plan (one damage table on the calibration text, shared by the
budgets, as `wqedge plan --calib` makes it), error-feedback conversion (wqedge.quant.feedback, on
--feedback-windows windows: by default what `wqedge convert` takes on the device, 256 on CUDA, 32 on the CPU) =
the row "feedback"; then, from the same fitted chunks, each distillation config STEPS@LR[+e2eSTEPS[@LR]]
(wqedge.quant.distill.distill_model: block stage with STEPS AdamW steps per decoder layer at relative learning
rate LR, optional end-to-end KL stage) = one row each, with its seconds, peak memory (CUDA: max allocated
during the distillation, the resident fp32 model included; CPU: process peak RSS) and held-out block MSE.
The model evaluated is the one the file holds (fp16 d/m, F32 norms; tests/test_distill.py checks the file
against it). Perplexity: llama.cpp's definition (wqedge.perplexity), eval text, 512-token windows, second half
scored, first --windows windows; beside it the mean KL(fp || model) per scored token, how faithful the model is
(perplexity alone can reward a model softer than an over-confident fp one: bench/results/distill_smol.md). Rows
are written to --out (markdown) and --out .json as they come, so a run
stopped at --time-limit still reports what it finished.

Checks of what distillation starts from and trains on (bench/results/distill_codes.md runs 12-13): --plan-windows,
--grad-windows and --max-rows size the damage table; --tilt F plans with the <= 2-bit kinds' damage times F (one
plan per factor); --e2e-ce W mixes the calibration text's cross-entropy into the end-to-end loss (one row per W).
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


def default_config(device, windows: int) -> dict:
    """The recipe `wqedge convert` distils with on `device` with `windows` calibration windows
    (wqedge.pipeline.distill_options)."""
    from wqedge import pipeline
    e2e, code_lr = pipeline.distill_options(_NoPlan(), device, windows)
    steps = pipeline.default_distill_steps(device)
    return {"steps": steps, "lr": None, "code_lr": code_lr, "e2e": e2e, "e2e_lr": None, "e2e_code_lr": None,
            "name": "default"}


class _NoPlan:
    """A plan that records no distillation options (distill_options and distill_windows_of read only plan.meta)."""

    def __init__(self, meta: dict | None = None):
        self.meta = meta or {}


def tilted(table, factor: float):
    """`table` with the predicted damage of every <= 2-bit action (by nominal width, protected variants included)
    times `factor`: a plan that takes more (factor < 1) or fewer low-bit chunks at the same budget."""
    if factor == 1:
        return table
    from dataclasses import replace

    from wqedge import blocks
    from wqedge.saliency import split_action
    low = [i for i, a in enumerate(table.actions) if blocks.block_type(split_action(a)[0]).nominal_bits <= 2]
    damage = table.damage.copy()
    damage[:, low] *= factor
    return replace(table, damage=damage)


def parse_config(s: str) -> dict:
    """'128@1e-3c5e-3+e2e64@2e-4c1e-3h1e-4' -> {"steps": 128, "lr": 1e-3, "code_lr": 5e-3, "e2e": 64, "e2e_lr": 2e-4,
    "e2e_code_lr": 1e-3, "e2e_head_lr": 1e-4} (learning rates optional; cX: train the codes at rate X, code units per
    step; hX: train an untied output head in the end-to-end stage at X times its mean |weight|)."""
    main, _, e2e = s.partition("+e2e")

    def part(p):
        p, _, code = p.partition("c")
        steps, _, lr = p.partition("@")
        return steps, (float(lr) if lr else None), (float(code) if code else None)

    steps, lr, code = part(main)
    e2e, _, head = e2e.partition("h")
    e_steps, e_lr, e_code = part(e2e) if e2e else ("", None, None)
    return {"steps": int(steps), "lr": lr, "code_lr": code, "e2e": int(e_steps) if e_steps else 0,
            "e2e_lr": e_lr, "e2e_code_lr": e_code, "e2e_head_lr": float(head) if head else None}


def main(argv=None):
    from wqedge.bench.report import add_fixture_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="3.25,2.5,2.25,2.0")
    ap.add_argument("--configs", default="128@1e-3", help="distillation configs STEPS@LR[cCODE_LR][+e2eSTEPS[@LR][cCODE_LR][hHEAD_LR]] "
                    "or 'default' (what wqedge convert distils with on this device), comma separated")
    ap.add_argument("--device", default=None, help="planning, conversion, distillation and evaluation device")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--feedback-windows", type=int, default=None,
                    help="calibration windows of error feedback and distillation (default: the device's, as convert)")
    ap.add_argument("--distill-windows", default=None,
                    help="calibration windows of distillation, comma separated: every config runs with each "
                         "(default: as convert, wqedge.pipeline.distill_windows_of: 512 on a GPU where they fit, "
                         "else the feedback windows)")
    ap.add_argument("--two-level", action="store_true",
                    help="offer the two-level kinds (q4s, q3s, q2s) to the greedy plans at every budget (`wqedge "
                         "convert --two-level`; the default offers them from 4 bits)")
    ap.add_argument("--tilt", default="1",
                    help="damage factors for the <= 2-bit kinds (q2, ternary, q1 and their protected variants), comma "
                         "separated: one greedy plan per factor and budget (1: the table as planned); checks whether "
                         "distillation, which the table does not price, favours more or fewer low-bit chunks (run 12: "
                         "neither)")
    ap.add_argument("--plan-windows", type=int, default=None,
                    help="calibration windows of the damage table's input statistics (default: make_plan's, 32)")
    ap.add_argument("--grad-windows", type=int, default=None,
                    help="LM-gradient windows of the damage table (default: make_plan's, 32 on a GPU, 16 on the CPU)")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="rows per linear the damage is estimated on, 0 for all (default: make_plan's, 256)")
    ap.add_argument("--e2e-ce", default="0",
                    help="weights of the calibration text's cross-entropy in the end-to-end loss, comma separated: "
                         "every config runs with each ((1 - w)·KL + w·CE; 0: KL alone)")
    ap.add_argument("--batch", default=None,
                    help="calibration windows per distillation step, comma separated: every config runs with each "
                         "(default: distill_model's, wqedge.quant.distill.BATCH)")
    ap.add_argument("--no-compact", action="store_true",
                    help="offer the fp16-header kinds q4 .. q1 instead of q4c .. q1c (as `wqedge convert "
                    "--no-compact-headers`): the compact headers' A/B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no new row after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.md"))
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from wqedge.alloc.greedy import greedy_allocate
    from wqedge.alloc.planner import plan_from_choice, prepare
    from wqedge.calib import calibration_tokens, default_device, tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge import kl
    from wqedge.perplexity import perplexity
    from wqedge.quant import distill
    from wqedge.quant.feedback import dequantize, feedback_windows, quantize_model

    t_start = time.time()
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    dev = default_device(a.device)
    budgets = [float(b) for b in a.budgets.split(",")]
    configs = [c for c in a.configs.split(",") if c]
    ckpt = LlamaCheckpoint.open(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    eval_tokens = tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)
    calib_text = Path(a.calib).read_text(encoding="utf-8")
    n_fb = a.feedback_windows or feedback_windows(dev)
    fb_tokens = calibration_tokens(tok, calib_text, n_fb, 512, 0, bos_id=bos, seed=a.seed).train
    if a.distill_windows:
        d_windows = [int(w) for w in a.distill_windows.split(",")]
    else:   # as convert: wqedge.pipeline.distill_windows_of (512 on a GPU where they fit, else the feedback windows)
        from wqedge import pipeline
        d_windows = [pipeline.distill_windows_of(_NoPlan({"fit": {"n_seqs": n_fb}}), ckpt.spec, dev, log)]
    configs = [default_config(dev, d_windows[0]) if c == "default" else parse_config(c) for c in configs]
    sets = {w: calibration_tokens(tok, calib_text, w, 512, 4, bos_id=bos, seed=a.seed) for w in d_windows}

    model = ckpt.load_hf_model(torch.float32).to(dev)
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore():
        model.load_state_dict(state0)

    @torch.no_grad()
    def logits_fn(win):
        return model(torch.as_tensor(win, dtype=torch.long, device=dev)).logits.float().cpu().numpy()

    def ppl() -> dict:
        """{"ppl": perplexity on the eval windows, "kl": mean KL(fp || this model) per scored token} (wqedge.kl):
        KL says how faithful a quantized model is, which perplexity alone does not where the fp model is
        over-confident (smol-s: tempered by 1.35 its perplexity falls 11%)."""
        fn = kl.KLComparer(logits_fn, base=fp_base)
        return {"ppl": perplexity(fn, eval_tokens, bos, 512, a.windows, batch_size=8).perplexity,
                "kl": fn.result().mean}

    @torch.no_grad()
    def apply(chunks, norms=None):
        for name, ch in chunks.items():
            model.get_parameter(name).copy_(dequantize(ch).to(dev))
        for name, w in (norms or {}).items():
            model.get_parameter(name).copy_(w.to(dev))

    rows = []
    out = Path(a.out)
    fp_base = kl.KLBaseRecorder(logits_fn)   # the fp model's distributions, which every row is compared with
    fp = perplexity(fp_base, eval_tokens, bos, 512, a.windows, batch_size=8).perplexity
    log(f"fp16: {fp:.4f}")
    t = time.time()
    from wqedge.pipeline import offered_actions
    extra = {"actions": offered_actions(min(budgets), a.two_level, compact=not a.no_compact)}
    for k, v in (("n_seqs", a.plan_windows), ("n_grad_seqs", a.grad_windows), ("max_rows", a.max_rows)):
        if v is not None:
            extra[k] = v or None
    table, ctx = prepare(ckpt, 128, calib_text, a.seed, dev, progress=log, **extra)
    prep_s = time.time() - t
    log(f"damage table on {dev}: {prep_s:.1f} s")

    def write():
        lines = [f"# Light distillation (issue 17): {Path(a.model).name}, fp16 perplexity {fp:.3f}", "",
                 f"`python bench/distill.py {' '.join(argv if argv is not None else sys.argv[1:])}`; device {dev}"
                 f" ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}); greedy plans"
                 f"{' (two-level kinds offered)' if a.two_level else ''}"
                 f"{' (fp16 headers: --no-compact)' if a.no_compact else ''} from one damage"
                 f" table ({prep_s:.1f} s); error feedback on {n_fb} calibration windows, distillation on"
                 f" {', '.join(map(str, d_windows))}; perplexity"
                 f" on {Path(a.eval).name}, {a.windows} windows, second half; KL to fp16: mean KL(fp || model)"
                 f" per scored token (nats).", "",
                 "| bits | row | perplexity | Δ vs feedback | KL to fp16 | distill s | peak MiB "
                 "| held-out block MSE before → after |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            base = next(x["ppl"] for x in rows if x["budget"] == r["budget"] and x["row"].startswith("feedback")
                        and x.get("tilt", 1) == r.get("tilt", 1))
            d = "" if r["row"].startswith("feedback") else f"{r['ppl'] - base:+.3f}"
            mse = "" if "mse_before" not in r else f"{r['mse_before']:.4g} → {r['mse_after']:.4g}"
            extra = "" if not r.get("e2e_kl") else f" (KL {r['e2e_kl'][0]:.4g} → {r['e2e_kl'][1]:.4g})"
            lines.append(f"| {r['effective_bits']:.3f} | {r['row']} | {r['ppl']:.3f} | {d} | {r['kl']:.4f} | "
                         f"{r.get('seconds', 0):.1f} | {r.get('peak_mib', 0):.0f} | {mse}{extra} |")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"fp16": fp, "device": str(dev), "prep_s": prep_s,
                                                        "feedback_windows": n_fb, "distill_windows": d_windows,
                                                        "rows": rows}, indent=1))
        print("\n".join(lines[-1:]), flush=True)

    tilts = [float(f) for f in a.tilt.split(",")]
    ces = [float(x) for x in a.e2e_ce.split(",")]
    batches = [int(x) for x in a.batch.split(",")] if a.batch else [None]
    for b, f in [(b, f) for b in budgets for f in tilts]:
        if time.time() - t_start > a.time_limit:
            log(f"time limit: budget {b} tilt {f} not run")
            break
        choice = greedy_allocate(tilted(table, f), b)
        plan = plan_from_choice(ckpt, table, choice, b, "greedy")
        tag = "" if len(tilts) == 1 else f" (tilt {f:g})"
        restore()
        t = time.time()
        fitted = quantize_model(model, plan, fb_tokens, device=dev, batch_size=16)
        conv_s = time.time() - t
        rows.append({"budget": b, "effective_bits": plan.effective_bits(), "row": "feedback" + tag, **ppl(),
                     "convert_s": conv_s, "histogram": plan.action_histogram(), "tilt": f,
                     "predicted_damage": table.plan_damage(choice)})
        log(f"B={b}: feedback {rows[-1]['ppl']:.4f} ({conv_s:.1f} s)")
        write()
        for c, w, ce, bs in [(c, w, ce, bs) for c in configs for w in d_windows for ce in ces for bs in batches]:
            cs = sets[w]
            if time.time() - t_start > a.time_limit:
                log(f"time limit: {c} at {b} not run")
                break
            restore()
            kw = {k: c[k] for k in ("lr", "e2e_lr", "code_lr", "e2e_code_lr", "e2e_head_lr") if c.get(k) is not None}
            if ce:
                kw["e2e_ce"] = ce
            if bs:
                kw["batch_size"] = bs
            res = distill.distill_model(model, fitted, cs.train, cs.heldout, c["steps"], c["e2e"], dev,
                                        seed=a.seed, progress=log, **kw)
            apply(res.chunks, res.norms)
            name = ("default: " if c.get("name") == "default" else "") + f"distill {c['steps']}@{c['lr'] or distill.LR:g}" + (
                f" codes@{c['code_lr']:g}" if c["code_lr"] else "") + (
                f"+e2e{c['e2e']}@{c['e2e_lr'] or distill.E2E_LR:g}" if c["e2e"] else "") + (
                f" codes@{c['e2e_code_lr']:g}" if c["e2e"] and c["e2e_code_lr"] else
                " codes frozen" if c["e2e"] and c["e2e_code_lr"] == 0 and c["code_lr"] else "") + (
                f" head@{c['e2e_head_lr']:g}" if c["e2e"] and c.get("e2e_head_lr") else "") + (
                f" on {cs.train.shape[0]} windows" if len(d_windows) > 1 else "") + (
                f", CE weight {ce:g}" if ce and c["e2e"] else "") + (f", batch {bs}" if bs else "")
            rows.append({"budget": b, "effective_bits": plan.effective_bits(), "row": name + tag, **ppl(), "tilt": f,
                         "seconds": res.seconds, "peak_mib": res.peak_bytes / 2**20, "peak_what": res.peak_what,
                         "mse_before": sum(x["before"] for x in res.layers) / len(res.layers),
                         "mse_after": sum(x["after"] for x in res.layers) / len(res.layers),
                         "layers": res.layers, "e2e_kl": None if not res.e2e else [res.e2e["before"], res.e2e["after"]],
                         "skipped": res.skipped, "codes_changed": res.codes_changed})
            log(f"B={b}: {name} {rows[-1]['ppl']:.4f} ({res.seconds:.1f} s, {res.codes_changed} codes changed)")
            write()
    restore()
    log(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
