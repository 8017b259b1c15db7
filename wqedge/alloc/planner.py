"""make_plan: the one entry point from a checkpoint and a bit budget to a Plan.

    plan = make_plan(ckpt, 2.5, allocator="greedy", calib_text=open("calib.txt").read())

Pipeline (allocator "greedy" or "rl"):
  1. calibration windows from the text (wqedge.calib.calibration_tokens);
  2. per-linear input statistics, one decoder layer at a time (diag and full XᵀX, mean/max |x|);
  3. output-gradient statistics of the LM loss (G_i, the output factor of a K-FAC Fisher);
  4. the unit x action damage table (wqedge.damage): exact stored bits and ½ Σ_i G_i Δw_i H Δw_iᵀ;
  5. the allocation: multiple-choice knapsack (greedy, wqedge.alloc.greedy) or the PPO policy
     (rl, wqedge.alloc.ppo), which also measures candidate plans on held-out calibration windows.
Plans are converted best with error feedback (wqedge.quant.feedback.quantize_checkpoint: GPTQ-style, act-order
inside chunks, damp 0.1, 256 calibration windows (32 on the CPU: feedback.feedback_windows), quantized earlier
layers in the loop, least-squares refit of the <= 2-bit grids); plan.meta["fit"] says so. Measured on llama-s (G=128, eval.txt, 32 windows, second half):
greedy 6.426 at 3.25 bits, 6.869 at 2.5, 7.080 at 2.25 (bench/allocation.py).

Options measured and left off by default (bench/results/allocation.md): feedback_damage=True (prices errors as
error feedback sees them; predicts the layer loss within 15% (tested) instead of 1.3-1.5x over, yet its plans were no better:
6.456 vs 6.456 at 3.25, 7.01 vs 6.90 at 2.5) and protect=(1, 2, 4) (saliency-protected columns as extra
actions: the knapsack bought 7-8 of 35,840 columns, 6.445/6.456 vs 6.456 at 3.25 and 6.94/6.87 vs 6.90/6.86
at 2.5, i.e. noise, for a 3.5x larger damage table).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..blocks import ALLOCATOR_ACTIONS, block_type
from ..plan import Plan, PlanError
from ..quant.gptq import REFIT_MAX_BITS
from ..quant.feedback import DAMP, feedback_windows
from .uniform import check_budget, uniform_plan

ALLOCATORS = ("greedy", "rl", "uniform")
# LM-loss gradient windows (forward + backward of the whole model each): 32 on a GPU; 16 on CPU cores, where they were
# 15 s of a 107 s conversion of llama-s with calibration text (2 cores). llama-s, CPU, 64 feedback windows: 16 vs 32
# gradient windows changed 5 / 15 / 0 of 280 chunks at 3.25 / 2.5 / 2.25 bits and gave ppl 6.4218 vs 6.4756 and
# 6.8217 vs 6.8465 (bench/results/feedback_windows.md)
GRAD_SEQS, GRAD_SEQS_CPU = 32, 16


def grad_windows(device) -> int:
    """The default LM-gradient window count on `device` (a torch.device)."""
    return GRAD_SEQS if device.type == "cuda" else GRAD_SEQS_CPU


# The joint pruning search (prune_check) converts each candidate plan with error feedback on prune_check_fb_seqs
# calibration windows and measures it on the held-out windows, PRUNE_CHECK_HELDOUT unless n_heldout says otherwise
# (wqedge.alloc.joint): llama-s on 2 CPU cores, ~12 s per candidate. The ranking needs the same conversion for every
# candidate, not the full one.
PRUNE_CHECK_HELDOUT = 16

# n_grad_seqs None: grad_windows(device)
# stream_layers None: wqedge.stream.wants_streaming decides (True when the model does not fit the device)
DEFAULTS = dict(n_seqs=32, seqlen=512, n_heldout=4, n_grad_seqs=None, max_rows=256, damage="kfac",
                feedback_damage=False, protect=(), actions=None,   # actions None: blocks.ALLOCATOR_ACTIONS
                stream_layers=None, resume_dir=None, prune_check=True, prune_check_fb_seqs=16)


@dataclass
class PlanningContext:
    """What `prepare` computed besides the damage table, for allocators that measure plans (PPO) and for
    reports: the planning model (CPU), its device, the options, the timings, the calibration windows and the
    statistics (None without calibration text)."""
    model: Any
    device: Any
    opts: dict
    times: dict = field(default_factory=dict)
    calib: Any = None              # wqedge.calib.CalibrationSet or None
    input_stats: dict | None = None
    grad_stats: Any = None


def _printer(progress) -> Callable[[str], None] | None:
    if progress is True:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    if callable(progress):
        return progress
    return None


def _every(say: Callable[[str], None] | None, seconds: float = 10.0) -> Callable[[str], None] | None:
    """`say`, but at most once per `seconds`: long loops report progress without a line per item."""
    if say is None:
        return None
    last = [time.time()]

    def tick(msg: str) -> None:
        if time.time() - last[0] >= seconds:
            last[0] = time.time()
            say(msg)
    return tick


def plan_from_choice(ckpt, table, choice: np.ndarray, budget_bits: float, allocator: str, method: str = "neuqi",
                     meta: dict | None = None, pruning=None) -> Plan:
    """The Plan for one table action per unit (protected variants become the plan's protected columns); with
    `pruning`, the table is of the pruned model's linears."""
    acts, prot = table.plan_actions(choice)
    spec = ckpt.spec if pruning is None else pruning.pruned_spec(ckpt.spec)
    return Plan.from_actions(spec.linears(), table.group_size, budget_bits, allocator, acts, method,
                             protected=prot, meta=meta or {}, model_name=ckpt.spec.name,
                             model_fingerprint=ckpt.fingerprint(), pruning=pruning)


def shared_forward(model, dev, xtx, checkpoints=None) -> bool:
    """Whether planning gathers input statistics in the gradient pass's forward (calib.InputStatsHooks): on CPU, for
    a whole float32 model, block-diagonal XᵀX (all layers' sums are held at once) and no resumable checkpoints
    (they save the two passes apart)."""
    import torch
    from ..stream import StreamedModel
    return (dev.type == "cpu" and checkpoints is None and not isinstance(model, StreamedModel) and xtx is not True
            and next(model.parameters()).dtype == torch.float32)


def prepare(ckpt, group_size: int = 128, calib_text=None, seed: int = 0, device=None, progress=True,
            full_xtx: bool = False, **opts):
    """Calibration and damage table for a checkpoint: returns (table, PlanningContext). The input statistics hold
    XᵀX's diagonal chunk blocks, all the damage table reads, unless `full_xtx` asks for a band of blocks around the
    diagonal (joint pruning re-cuts chunks from kept columns: calib.XtxBand) or feedback-aware damage for the whole
    matrix."""
    from ..calib import (PRUNE_XTX_BAND, InputStatsHooks, XtxBand, calibration_tokens, default_device, gradient_stats,
                         layerwise_stats)
    from ..damage import build_damage_table

    say = _printer(progress)
    o = {**DEFAULTS, **opts}
    actions = tuple(o["actions"] or ALLOCATOR_ACTIONS)   # e.g. blocks.ACTION_NAMES to offer the subscale kinds
    dev = default_device(device)
    if o["n_grad_seqs"] is None:
        o["n_grad_seqs"] = grad_windows(dev)
    times = {}
    t0 = time.time()
    linears = ckpt.spec.linears()
    from ..stream import StreamedModel, planning_model
    try:
        model = planning_model(ckpt, dev, o["stream_layers"])
    except ValueError as e:
        raise PlanError(str(e)) from None
    if isinstance(model, StreamedModel) and say:
        say("planning model: streamed one decoder layer at a time from the checkpoint's files")
    ctx = PlanningContext(model, dev, o, times)
    if calib_text is None:
        if say:
            say("no calibration text: damage from the weights alone (no activation or gradient statistics)")
        table = build_damage_table(linears, ckpt.linear_weight, group_size, None, None, kind="proxy",
                                   device=dev if dev.type == "cuda" else None, max_rows=o["max_rows"], actions=actions,
                                   progress=_every(say))
        times["table"] = time.time() - t0
        return table, ctx
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, o["n_seqs"], o["seqlen"], o["n_heldout"], bos_id=bos, seed=seed)
    times["tokenize"] = time.time() - t0
    if say:
        say(f"calibration: {cs.train.shape[0]} x {cs.seqlen} tokens (+{cs.heldout.shape[0]} held out) on {dev}")
    t = time.time()
    # pruning re-cuts chunks from the kept columns, whose XᵀX blocks lie off the diagonal: a band of them (XtxBand),
    # not the dense matrix (44 GB at 7B); feedback-aware damage reads the whole matrix
    xtx = True if o["feedback_damage"] else XtxBand(group_size, PRUNE_XTX_BAND) if full_xtx else group_size
    ck = None
    if o["resume_dir"] is not None:   # per-layer checkpoints of the statistics (wqedge.resume), keyed by their inputs
        from ..resume import StatsCheckpoints, tokens_digest
        key = {"model": ckpt.fingerprint(), "windows": tokens_digest(cs.train), "xtx": xtx, "group": group_size,
               # a rotated or masked view of the checkpoint keeps its fingerprint (a plan made on it is a plan for
               # the checkpoint), so its statistics are told apart by what the view does
               **({"view": ckpt.stats_view()} if hasattr(ckpt, "stats_view") else {}),
               **{k: o[k] for k in ("n_grad_seqs", "max_rows", "damage", "feedback_damage", "protect")},
               "actions": list(actions)}
        ck = StatsCheckpoints(o["resume_dir"], key, say)

    def grads():
        return gradient_stats(model, cs.train[: o["n_grad_seqs"]], device=dev, batch_size=4 if dev.type == "cuda" else 2)
    n_grad = min(o["n_grad_seqs"], cs.train.shape[0])
    from .. import distributed
    # (every process needs windows of its own in both passes: --distributed shards each pass's windows)
    if min(n_grad, cs.train.shape[0] - n_grad) >= distributed.world() and shared_forward(model, dev, xtx, ck):
        # on CPU the forward passes are most of planning: the gradient pass's forward also gathers its windows'
        # input statistics, and the layer-by-layer pass runs only the other windows (same sums, one forward less)
        t = time.time()
        with InputStatsHooks(model, xtx, dev) as seen:
            gs = grads()
        times["grad_stats"] = time.time() - t
        t = time.time()
        st = layerwise_stats(model, cs.train[n_grad:], device=dev, full_xtx=xtx, progress=None, prior=seen)
        times["input_stats"] = time.time() - t
    else:
        st = layerwise_stats(model, cs.train, device=dev, full_xtx=xtx, progress=None, checkpoints=ck)
        times["input_stats"] = time.time() - t
        t = time.time()
        gs = ck.cached("gradients", grads) if ck is not None else grads()
        times["grad_stats"] = time.time() - t
    if say:
        say(f"statistics: inputs {times['input_stats']:.1f} s, gradients {times['grad_stats']:.1f} s")
    t = time.time()

    def damage_table():
        return build_damage_table(linears, ckpt.linear_weight, group_size, st, gs, kind=o["damage"], device=dev,
                                  max_rows=o["max_rows"], feedback=o["feedback_damage"], protect=tuple(o["protect"]),
                                  actions=actions, progress=_every(say))
    table = ck.cached("table", damage_table) if ck is not None else damage_table()
    times["table"] = time.time() - t
    if ck is not None and ck.loaded and say:
        say(f"resumed from checkpoints: {', '.join(ck.loaded)}")
    if say:
        say(f"damage table: {len(table.units)} units x {len(table.actions)} actions in {times['table']:.1f} s")
    ctx.calib, ctx.input_stats, ctx.grad_stats = cs, st, gs
    return table, ctx


def _ppo_on(ckpt, table, ctx, budget_bits: float, seed: int, opts: dict, say, pruning=None):
    """The rl allocator on `table` at `budget_bits` (bits over the table's weights): (table restricted to the
    policy's actions, choice, info). With `pruning`, `table` is cut for the pruned shapes and the reward measures
    the pruned model (PlanMeasurer with the kept rows and columns)."""
    from .ppo import PPOConfig, heldout_windows, ppo_allocate
    cfg = PPOConfig(**{k: v for k, v in opts.items() if k in PPOConfig.__dataclass_fields__})
    cfg.seed = seed
    # the policy's action space is the offered base actions (their fp16-header twins in a --no-compact-headers table)
    policy = ALLOCATOR_ACTIONS if set(ALLOCATOR_ACTIONS) <= set(table.actions) else tuple(
        block_type(a).base or a for a in ALLOCATOR_ACTIONS)
    if table.actions != policy:
        table = table.restrict(policy)
    measurer = None
    if pruning is not None and cfg.measure and ctx.calib is not None:
        from .joint import pruned_input_stats
        from .measure import PlanMeasurer
        measurer = PlanMeasurer(table, ctx.model, ctx.device, pruned_input_stats(ckpt, ctx, pruning),
                                heldout_windows(ctx, cfg), fit=cfg.reward_fit, pruning=pruning)
    try:
        choice, info = ppo_allocate(table, budget_bits, cfg, ctx=ctx, progress=say, measurer=measurer)
    finally:
        if measurer is not None:
            measurer.close()
    return table, choice, info


def make_plan(ckpt, budget_bits: float, allocator: str = "greedy", group_size: int = 128, calib_text=None,
              seed: int = 0, device=None, progress=True, method: str = "neuqi", prune=(), max_prune: float = 0.3,
              prune_group: int = 32, fixed_pruning=None, **opts) -> Plan:
    """A plan for `ckpt` (wqedge.checkpoint.LlamaCheckpoint) meeting `budget_bits` effective bits.

    allocator: "greedy" (deterministic knapsack on the loss-aware damage table; the default), "rl" (PPO,
    WINDQuant) or "uniform". calib_text: the calibration text itself or a path to it (None: weight-only
    damage). opts: n_seqs, seqlen, n_heldout, n_grad_seqs, max_rows, damage ("kfac" | "fisher" | "proxy"),
    actions (the table's base actions; default blocks.ALLOCATOR_ACTIONS, blocks.ACTION_NAMES adds the subscale
    kinds for "greedy"), and for "rl" the PPO settings of wqedge.alloc.ppo.PPOConfig (episodes, ...).
    prune: structure kinds ("ffn", "heads") the search may prune as 0-bit actions, at most `max_prune` of the
    decoder weights, FFN channels in groups of `prune_group` (wqedge.alloc.joint: the knapsack per pruned amount,
    each candidate converted and measured); with "rl", PPO re-allocates the bits of every candidate the check
    converts (its reward measured on that pruned model) and the converted plans' measured loss chooses among knapsack
    and PPO plans of every candidate (joint_allocate's refine). fixed_pruning: a wqedge.pruning.Pruning chosen already (e.g. by the
    joint search on the unrotated model, for a rotated plan): its shapes get the whole budget, nothing is searched.
    Raises PlanError for a budget no plan can meet.
    """
    if allocator not in ALLOCATORS:
        raise PlanError(f"unknown allocator {allocator!r} (known: {', '.join(ALLOCATORS)})")
    if prune and allocator not in ("greedy", "rl"):
        raise PlanError(f"pruning (--prune) is searched by the greedy or rl allocator, not {allocator!r}")
    if prune and calib_text is None:
        raise PlanError("pruning (--prune) needs calibration text: its damage comes from LM-loss gradients")
    if fixed_pruning is not None and (prune or allocator not in ("greedy", "rl")):
        raise PlanError("a given pruning (fixed_pruning) is filled by the greedy or rl allocator, without a search")
    linears = ckpt.spec.linears()
    check_budget(linears, group_size, budget_bits)
    kw = dict(model_name=ckpt.spec.name, model_fingerprint=ckpt.fingerprint())
    if allocator == "uniform":
        return uniform_plan(linears, group_size, budget_bits, method, **kw)
    t0 = time.time()
    say = _printer(progress)
    if allocator == "rl" and calib_text is not None and "n_heldout" not in opts:
        from .ppo import PPOConfig     # the measured reward's held-out windows (search + confirm)
        cfg = PPOConfig(**{k: v for k, v in opts.items() if k in PPOConfig.__dataclass_fields__})
        opts["n_heldout"] = max(DEFAULTS["n_heldout"], cfg.measure_windows + cfg.confirm_windows)
    if prune and calib_text is not None:
        # the joint search's measured check: held-out windows to score each candidate on, feedback windows to convert
        opts.setdefault("n_heldout", PRUNE_CHECK_HELDOUT)
    if calib_text is not None and (prune or fixed_pruning is not None or allocator == "rl"):
        # both measure the whole model in memory (PPO's held-out loss, pruning's structure damage)
        if opts.get("stream_layers"):
            raise PlanError(f"{'pruning (--prune)' if prune else 'the rl allocator'} measures the whole model in "
                            "memory; it does not run with --stream-layers")
        opts["stream_layers"] = False
    table, ctx = prepare(ckpt, group_size, calib_text, seed, device, progress,
                         full_xtx=bool(prune) or fixed_pruning is not None, **opts)
    t1 = time.time()
    meta = {"damage": table.kind, "damage_feedback": table.meta.get("feedback", False),
            "actions": list(table.actions),   # the actions the allocator was offered (base names)
            "protect": table.meta.get("protect", []), "calibration": None if ctx.calib is None else {
        "n_seqs": int(ctx.calib.train.shape[0]), "seqlen": ctx.calib.seqlen,
        "n_heldout": int(ctx.calib.heldout.shape[0]), "n_grad_seqs": int(ctx.opts["n_grad_seqs"])},
        "fit": {"error_feedback": ctx.calib is not None, "act_order": "chunk", "damp": DAMP,
                "n_seqs": feedback_windows(ctx.device), "refit_max_bits": REFIT_MAX_BITS}}
    pruning = None
    if fixed_pruning is not None:
        from .joint import pruned_allocation
        pruning = fixed_pruning
        cap = table.budget_cap(budget_bits)
        table, choice, _, _ = pruned_allocation(ckpt, table, ctx, budget_bits, None, pruning)
        if allocator == "rl":
            table, choice, info = _ppo_on(ckpt, table, ctx, cap / table.n_weights, seed, opts, say, pruning)
            meta["ppo"], meta["actions"] = info, list(table.actions)
        meta["pruning"] = {"fixed": True, "ffn_group_size": pruning.ffn_group_size}
    elif prune:
        from ..structure_damage import structure_damage
        from .joint import joint_allocate
        from .. import distributed

        def joint_search():
            sd = structure_damage(ctx.model, ctx.calib.train[: ctx.opts["n_grad_seqs"]], prune_group,
                                  device=ctx.device, batch_size=4 if ctx.device.type == "cuda" else 2)
            measure = None
            if ctx.opts["prune_check"] and len(ctx.calib.heldout):   # the measured loss, not the prediction, decides
                from .measure import ConvertedPlanLoss
                loss = ConvertedPlanLoss(ctx.model, ctx.calib.train[: ctx.opts["prune_check_fb_seqs"]],
                                         ctx.calib.heldout, ctx.device, original=ckpt.linear_weight)

                def measure(pr, t, choice):
                    return loss(plan_from_choice(ckpt, t, choice, budget_bits, "greedy", method, pruning=pr))
            refine = None
            if allocator == "rl":   # PPO re-allocates the bits of every candidate the check measures, from its knapsack plan
                def refine(pr, t, choice):
                    return _ppo_on(ckpt, t, ctx, table.budget_cap(budget_bits) / t.n_weights, seed, opts, say, pr)
            res = joint_allocate(ckpt, table, ctx, budget_bits, sd, tuple(prune), max_prune, say=say, measure=measure,
                                 refine=refine)
            if measure is not None:
                ctx.times["prune_check"] = loss.seconds
            return res, res.info
        res, info = distributed.on_writer(joint_search)   # --distributed: measured on rank 0, over all windows
        table, choice, pruning = res.table, res.choice, res.pruning
        meta["pruning"] = {"kinds": list(prune), "max_prune": max_prune, "ffn_group_size": prune_group,
                           "chosen_by": "measured loss" if res.measured else "predicted damage", "search": res.trials}
        if info is not None:
            meta["ppo"], meta["actions"] = info, list(table.actions)
    elif allocator == "greedy":
        from .greedy import greedy_allocate
        choice = greedy_allocate(table, budget_bits)
    else:
        from .. import distributed       # --distributed: the search and its measured losses on rank 0
        table, choice, info = distributed.on_writer(_ppo_on, ckpt, table, ctx, budget_bits, seed, opts, say)
        meta["ppo"], meta["actions"] = info, list(table.actions)
    t2 = time.time()
    # the joint search's prediction also counts the pruned structures' damage
    meta["predicted_damage"] = res.predicted if prune else table.plan_damage(choice)
    meta["seconds"] = {**{k: round(v, 2) for k, v in ctx.times.items()}, "allocate": round(t2 - t1, 2),
                       "total": round(t2 - t0, 2)}
    plan = plan_from_choice(ckpt, table, choice, budget_bits, allocator, method, meta, pruning)
    if say:
        say(f"{allocator} plan: {plan.effective_bits():.4f} effective bits, predicted damage "
            f"{meta['predicted_damage']:.4f} nats, {t2 - t0:.1f} s")
    return plan
