"""The convert pipeline: (checkpoint, plan or budget, calibration, target) -> files.

This is the one place that decides
  - which allocator makes the plan when none is named (`make_plan`),
  - how chunks are fitted: error feedback, activation statistics, or weights alone (`fit_mode`), and
    whether their scales, offsets and norms (and, with enough calibration windows, codes) are then distilled
    (`distill_steps`, `distill_options`; by default at <= 2.5 bits, 3.5 on a GPU: `settle_distill`),
  - what the output files are called (`default_output`),
  - how the output head is stored (`head_kind`: DEFAULT_HEAD unless named; our GGUF only),
  - and which writer a target goes to (`convert`).
The CLI (`wqedge convert`, `wqedge plan`) and the benchmarks (wqedge/bench/files.py,
bench/uniform_quality.py) call it; none of them makes these decisions again.

It reports through a `say(message)` callback and raises PlanError (no plan) or ConvertError (a step cannot
run or failed; nothing is written); it never prints or exits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .plan import Plan, PlanError
from .rotation_format import MAX_INT8_BLOCK

ALLOCATORS = ("uniform", "greedy", "rl")   # the allocators a caller may name (wqedge.alloc.planner)
FEEDBACK_ALLOCATORS = ("greedy", "rl")     # plans made for error-feedback lowering when text is given
TARGETS = ("gguf", "onnx", "llamacpp")
DISTILL_STEPS = 128   # steps per decoder layer of `--distill` given without a number (wqedge.quant.distill)
# The default's steps when planning on the CPU: on 2 cores 128 steps more than triple a 2.5-bit llama-s conversion
# (~270 s without), 32 add about 60-70% and, on the CPU's 32 calibration windows, gain as much at 2.5 bits (-0.041
# perplexity; 2.0 b: -0.102, 16 steps -0.079); bench/results/distill.md "Default at <= 2.5 bits".
DISTILL_STEPS_CPU = 32
# `convert` and `plan` distil by default (`default_distill`) when the plan's effective bits are at most this and
# calibration text is at hand. Over error feedback alone the block stage lowered perplexity on llama-s (6.263 fp16,
# 3 seeds, bench/results/allocation.md) by 0.057 / 0.078 / 0.156 / 0.284 at 2.5 / 2.25 / 2.0 / 1.75 bits, against
# 0.011 at 3.25, and on a second checkpoint, smol-s (bench/results/allocation_smol.md), by 8 / 10 / 13 / 17%;
# what it costs on a 2-core CPU: bench/results/distill.md "Default at <= 2.5 bits".
DISTILL_DEFAULT_MAX_BITS = 2.5
# On a GPU distillation costs seconds (llama-s: 30-40 s with trained codes and the end-to-end stage), and with
# trained codes it gained at 3.25 bits too (6.416 -> 6.388, bench/results/distill_codes.md), so there the default
# reaches up to this many bits.
DISTILL_DEFAULT_MAX_BITS_GPU = 3.5
# What distillation trains besides scales, offsets and norms, unless told otherwise (`distill_options`):
# - the codes themselves (straight-through latent codes, wqedge.quant.distill), at DISTILL_CODE_LR code units per
#   step, when it has at least DISTILL_CODES_MIN_WINDOWS calibration windows: on llama-s with 256 windows and 128
#   steps this lowered the block stage's perplexity from 6.795 to 6.715 at 2.5 b and from 7.329 to 7.149 at 2.0 b;
#   with the CPU's 32 windows and 32 steps it changed no code at 0.02 and made it worse at 0.04 and above
#   (bench/results/distill_codes.md); `--freeze-codes` keeps NeUQI's light distillation (codes frozen);
# - an end-to-end KL stage of DISTILL_E2E_STEPS steps after the block stage when planning on a GPU (on the CPU it
#   costs more than the whole conversion); with codes trained it took 2.5 b on to 6.652 and 2.0 b to 6.989.
DISTILL_CODE_LR = 0.02
DISTILL_CODES_MIN_WINDOWS = 128
DISTILL_E2E_STEPS = 256
# Calibration windows distillation trains on when planning on a GPU (error feedback keeps its own count): trained
# codes gain from more text. On llama-s 512 windows against 256 took 3.25 b from 6.388 to 6.344 and 2.5 b from
# 6.652 to 6.622; 1024 gained nothing more (6.629) (bench/results/distill_codes.md, run 9). Used where the block
# stage's hidden states fit (`distill_windows_of`), else the feedback windows; `--distill-windows N` chooses.
DISTILL_WINDOWS_GPU = 512
STAGE2_STEPS = 20     # AdamW steps per group of `--rotate-stage2` given without a number (bench/ruquant.py's setting)
DEMO_DIR = Path("wqedge-demo")
# How `convert` stores the output head when the caller names none (wqedge.head): q8 halves the head's bytes per
# decoded token for no measurable perplexity (llama-s, smol-s: within 0.02% of fp16 on the reference; q4 costs
# 0.5-1.1%); bench/results/head_quant.md.
DEFAULT_HEAD = "q8"


def _quiet(msg: str) -> None:
    pass


def default_allocator(calib_text: str | None) -> str:
    """The allocator when the caller names none."""
    if calib_text is None:
        # No calibration text given: weight-only planning, one action everywhere.
        return "uniform"
    return "greedy"


def stage2_weight_bits(bits: float, preset: str | None) -> int | None:
    """The weight bits stage 2's straight-through surrogate quantizes with. Stage 2 runs before the allocator
    (which plans on its result), so a budget plan's per-chunk widths are not known yet: a preset's width when
    there is one (fp16: float weights; ternary as 2 bits, q1 as 1), else the affine width a uniform plan
    at the budget would take everywhere (4.25 bits -> 4, 3.25 -> 3, below -> 2, 8.25 and up -> 8), which is
    the width most of a greedy plan's chunks get at that budget."""
    if preset is not None:
        return {"fp16": None, "q8": 8, "q4": 4, "q3": 3, "q2": 2, "ternary": 2, "q1": 1}[preset]
    return 8 if bits >= 8.25 else 4 if bits >= 4.25 else 3 if bits >= 3.25 else 2


# The greedy allocator is offered the two-level kinds (q4s, q3s, q2s) by default at budgets of this many effective bits
# and up: at 4.09-5.45 bits they never cost perplexity on the two trained checkpoints measured and gained up to 1.0%
# (llama-s, smol-s; with and without calibration text), decode at the one-scale plans' speed with int8 activations
# (bench/results/two_level_default.md). Below, the evidence is one checkpoint's, so they stay opt-in (--two-level).
TWO_LEVEL_MIN_BITS = 4.0
# There the allocator never chooses q2s (llama-s and smol-s with calibration at 4.0, 4.25 and 4.5 b: 0-2 of 250-280
# chunks; bench/results/table_grid.md), so at those budgets it is not offered: the damage table skips a sixth of its
# NeUQI work. Below 4 bits all three are.
Q2S_MAX_BITS = TWO_LEVEL_MIN_BITS


def offered_actions(bits: float, two_level: bool, compact: bool = True) -> tuple[str, ...]:
    """What the table-based allocators choose from: blocks.ALLOCATOR_ACTIONS (the compact-header kinds among them),
    plus, with two_level, the two-level kinds (less q2s from Q2S_MAX_BITS up); compact=False offers the fp16-header
    q4 .. q1 instead of q4c .. q1c (files that format 1-3 readers take)."""
    from .blocks import ALLOCATOR_ACTIONS, BLOCK_TYPES, block_type
    acts = ALLOCATOR_ACTIONS
    if two_level:
        acts += tuple(b.name for b in BLOCK_TYPES if b.has_subscales and not (b.name == "q2s" and bits >= Q2S_MAX_BITS))
    return acts if compact else tuple(block_type(a).base or a for a in acts)


def default_two_level(allocator: str, bits: float, preset: str | None, prune=()) -> bool:
    """Whether a plan offers the two-level kinds when the caller leaves it open (two_level=None): greedy budget
    plans at TWO_LEVEL_MIN_BITS and up, without pruning (the joint search has not been measured with them)."""
    return allocator == "greedy" and preset is None and not prune and bits >= TWO_LEVEL_MIN_BITS


def make_plan(ckpt, bits: float, group: int = 128, allocator: str | None = None, method: str = "neuqi",
              calib_text: str | None = None, seed: int = 0, device=None, protect=(), preset: str | None = None,
              progress=True, rotate: bool | str = False, act_bits: int = 8, prune=(), max_prune: float = 0.3,
              stream_layers: bool | None = None, rotate_stage2: int = 0, resume_dir=None,
              prune_group: int = 32, two_level: bool | None = None, fixed_pruning=None, compact: bool = True,
              rotate_block: int | None = None) -> Plan:
    """A plan for `ckpt` at `bits` effective bits (or one `preset` action everywhere). PlanError when no
    plan can be made. rotate: input transforms (`rotated`), planned on the folded weights: "ruquant" (or True)
    RUQuant's, built from calibration activations, "hadamard" the data-free residual rotation with an online
    block Hadamard on down_proj's input (wqedge.residual_rotation);
    rotate_stage2: AdamW steps per group of RUQuant stage 2 (0: stage 1 only), at the plan's act_bits and
    `stage2_weight_bits`, recorded in the plan's rotation config; act_bits: the activation bits recorded for
    the runtime; prune: structure kinds ("ffn", "heads") the greedy (or rl) allocator may also prune, up to `max_prune`
    of the weights, under the same budget (wqedge.alloc.joint), FFN channels in units of `prune_group`;
    stream_layers: plan on the model read one decoder layer at a time (wqedge.stream; None: when it does not fit);
    resume_dir: keep per-layer checkpoints of the planning statistics there and resume from them (wqedge.resume);
    two_level: the greedy allocator may also choose the two-level kinds (q4s, q3s, q2s: sub-scales per 32
    columns; `offered_actions`); None: default_two_level (off for rotated plans and other activation bits, whose runtime paths have
    not been measured with them). progress: True (lines on stderr), a callable taking a line, or False.
    compact: offer the compact-header kinds q4c .. q1c (the default) or, False, the fp16-header q4 .. q1 (`offered_actions`).
    rotate_block: RUQuant's block size B (None: wqedge.rotation.BLOCK), recorded in the plan's rotation config.
    fixed_pruning: a wqedge.pruning.Pruning whose shapes the allocator fills with bits (no structure search).

    rotate with prune: the structures are chosen first, by the joint search on the unrotated model (in a rotated o or
    down input every channel mixes heads or FFN channels, so removing one there removes no structure); then the
    transforms are built on the masked model with the o and down ones on the kept columns (`rotated`), and the bits
    are allocated again on the rotated pruned model under the same budget."""
    more = dict(prune=prune, max_prune=max_prune, stream_layers=stream_layers, resume_dir=resume_dir,
                prune_group=prune_group, two_level=two_level, fixed_pruning=fixed_pruning, compact=compact)
    if rotate is True:
        rotate = "ruquant"
    if rotate not in (False, None, "ruquant", "hadamard"):
        raise PlanError(f"rotate must be 'ruquant' or 'hadamard', got {rotate!r}")
    if rotate_block is not None and rotate != "ruquant":
        raise PlanError("a rotation block size (--rotate-block) is RUQuant's: it needs --rotate ruquant")
    if rotate_block is not None and not 2 <= rotate_block <= MAX_INT8_BLOCK:
        raise PlanError(f"--rotate-block must be from 2 to {MAX_INT8_BLOCK} (the block matrices are int8), "
                        f"got {rotate_block}")
    if rotate_stage2 and rotate != "ruquant":
        raise PlanError("stage 2 of RUQuant (--rotate-stage2) learns a reflection of RUQuant's rotation: it needs "
                        "--rotate ruquant")
    if prune and fixed_pruning is not None:
        raise PlanError("a plan either searches its pruning (prune) or is given one (fixed_pruning), not both")
    searched = None
    if rotate and prune:
        joint = make_plan(ckpt, bits, group, allocator, method, calib_text, seed, device, protect, preset, progress,
                          **more)
        searched = {**joint.meta.get("pruning", {}), "chosen_on": "the unrotated model; bits then allocated on the "
                    "rotated pruned model", "unrotated_plan": {"effective_bits": round(joint.effective_bits(), 6),
                                                               "predicted_damage": joint.meta.get("predicted_damage")}}
        more.update(prune=(), fixed_pruning=joint.pruning)
    if (rotate or act_bits != 8) and two_level is None:
        more["two_level"] = two_level = False
    if rotate == "hadamard":
        from .residual_rotation import hadamard_config
        config = hadamard_config(seed)
        src, _ = rotated(ckpt, config, calib_text, device, pruning=more["fixed_pruning"])
        plan = make_plan(src, bits, group, allocator, method, calib_text, seed, device, protect, preset, progress,
                         **more)
        plan.rotation, plan.act_bits = config, act_bits
        if searched is not None:
            plan.meta["pruning"] = searched
        return plan.validate()
    if rotate:
        from .rotation import BLOCK, rotation_config, stage2_config
        try:
            s2 = (stage2_config(int(rotate_stage2), act_bits, stage2_weight_bits(bits, preset), group)
                  if rotate_stage2 else None)
        except ValueError as e:
            raise PlanError(f"--rotate-stage2: {e}") from None
        config = rotation_config(seed, block=rotate_block or BLOCK, stage2=s2)
        pruning = more["fixed_pruning"]
        try:
            build = rotation_build(ckpt, config, calib_text, device, _say(progress), pruning)
        except ConvertError as e:
            raise PlanError(str(e)) from None
        src, _ = rotated(ckpt, config, calib_text, device, pruning=pruning)
        plan = make_plan(src, bits, group, allocator, method, calib_text, seed, device, protect, preset, progress,
                         **more)
        plan.rotation, plan.act_bits = config, act_bits
        plan.meta["rotation"] = build.report()
        if searched is not None:
            plan.meta["pruning"] = searched
        return plan.validate()
    if act_bits != 8:
        plan = make_plan(ckpt, bits, group, allocator, method, calib_text, seed, device, protect, preset, progress,
                         **more)
        plan.act_bits = act_bits
        return plan.validate()
    if preset is not None:
        if allocator not in (None, "uniform"):
            raise PlanError(f"--preset {preset} is one action everywhere; it does not go with --allocator "
                            f"{allocator}")
        allocator = "uniform"
    if allocator is None:
        allocator = "greedy" if two_level else default_allocator(calib_text)   # (weight-only without calibration)
    if two_level is None:
        two_level = default_two_level(allocator, bits, preset, prune)
    if two_level and allocator != "greedy":
        raise PlanError("--two-level offers the two-level kinds to the greedy allocator; it does not go with "
                        f"{'--preset' if preset else '--allocator ' + allocator}")
    if allocator == "uniform" and (prune or fixed_pruning is not None):
        raise PlanError("pruning (--prune) is searched by the greedy (or rl) allocator: give calibration text (or "
                        "self-calibration) and no --preset / --allocator uniform")
    if allocator == "uniform":
        from .alloc.uniform import model_bits, uniform_plan
        linears = ckpt.spec.linears()
        if preset is not None:
            bits = model_bits(linears, group, preset)
        return uniform_plan(linears, group, bits, method, action=preset, model_name=ckpt.spec.name,
                            model_fingerprint=ckpt.fingerprint(), compact=compact)
    from .alloc.planner import make_plan as plan_with_table
    return plan_with_table(ckpt, bits, allocator=allocator, group_size=group, calib_text=calib_text, seed=seed,
                           device=device, method=method, protect=protect, progress=progress, prune=prune,
                           max_prune=max_prune, prune_group=prune_group, resume_dir=resume_dir,
                           fixed_pruning=fixed_pruning,
                           actions=offered_actions(bits, two_level, compact),
                           **({} if stream_layers is None else {"stream_layers": stream_layers}))


def fit_mode(plan: Plan, calib_text: str | None, feedback: bool | None = None) -> str:
    """How the chunks of `plan` are fitted: "feedback" (GPTQ-style error feedback on the calibration text),
    "stats" (NeUQI weighted by diag(XᵀX) of the calibration text) or "weights" (no calibration text).

    feedback None: what the plan says of itself (plan.meta["fit"]["error_feedback"], written by the
    loss-aware planner), else feedback for greedy/rl plans. ConvertError for feedback without text.
    """
    if feedback is None:
        fit = plan.meta.get("fit") or {}
        feedback = calib_text is not None and bool(fit.get("error_feedback", plan.allocator in FEEDBACK_ALLOCATORS))
    if feedback and calib_text is None:
        raise ConvertError("--feedback needs calibration text (--calib FILE)")
    if feedback:
        return "feedback"
    return "stats" if calib_text is not None else "weights"


def default_output(model_dir: Path, plan: Plan, target: str) -> Path:
    """The output path when the caller gives none."""
    model_dir = Path(model_dir)
    if target == "llamacpp":
        return Path(".") / f"{model_dir.name}.llamacpp{plan.budget_bits:g}.gguf"
    where = DEMO_DIR if model_dir.parent == DEMO_DIR else Path(".")
    return where / f"{model_dir.name}.wq{plan.effective_bits():.2f}.{target}"


class ConvertError(ValueError):
    """A step of the pipeline cannot run or failed, and nothing was written; the message says which and why."""


# The llama.cpp type that stores the output head as our head kind does (q8: 8.5 bits at llama.cpp's 32-column
# blocks, our q8 8.25 at G = 128; q4: 4.5 vs 4.25), so both targets of one plan keep the head at one precision.
LLAMACPP_HEAD_TYPES = {"fp16": "F16", "q8": "Q8_0", "q4": "Q4_0"}


def llamacpp_head_types(spec, head: str = DEFAULT_HEAD) -> dict[str, str]:
    """export_llamacpp's embed_type / output_type for our head kind: the head as LLAMACPP_HEAD_TYPES[head] (with tied
    embeddings the one table is the head), untied embeddings F16 as in our GGUF."""
    head_t = LLAMACPP_HEAD_TYPES[head]
    return {"output_type": head_t, "embed_type": head_t if spec.tie_word_embeddings else "F16"}


def head_kind(target: str, head: str | None = None, say: Callable[[str], None] = _quiet) -> str:
    """How `target`'s file stores the output head: `head` (DEFAULT_HEAD when None) for our GGUF and the llama.cpp
    GGUF (there as LLAMACPP_HEAD_TYPES[kind]); the ONNX graph keeps it dense (fp16) and says so when a quantized
    head was asked for by name."""
    from .head import check_head
    try:
        kind = check_head(DEFAULT_HEAD if head is None else head)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if target != "onnx":
        return kind
    if head is not None and head != "fp16":
        say(f"--head {head} ignored for --target onnx: the ONNX graph keeps the head dense (fp16)")
    return "fp16"


@dataclass
class Fits:
    """What the GGUF writer fits chunks from: statistics, or chunks fitted already (error feedback)."""
    mode: str
    stats: dict | None = None
    fitted: dict | None = None
    norms: dict | None = None      # distilled RMSNorm weights (HF name -> tensor), written instead of the checkpoint's

    def source(self, ckpt):
        """The checkpoint the writer reads dense tensors from: `ckpt`, with the distilled norms when there are."""
        if not self.norms:
            return ckpt
        from .quant.distill import TunedCheckpoint
        return TunedCheckpoint(ckpt, self.norms)


def distill_steps(plan: Plan, distill: int | None = None) -> int:
    """Steps per decoder layer of light distillation (wqedge.quant.distill): `distill` when given, else what
    the plan asks for (plan.meta["fit"]["distill_steps"], from `wqedge plan --distill`), else 0: off."""
    from .quant.distill import check_steps
    if distill is None:
        distill = (plan.meta.get("fit") or {}).get("distill_steps", 0)
    try:
        return check_steps(distill)
    except ValueError as e:
        raise ConvertError(f"--distill: {e}") from None


def record_distill(plan: Plan, steps: int, default: str | None = None) -> None:
    """Ask, in the plan itself, for `steps` of light distillation when it is converted (`distill_steps`).
    default: why the default chose it (recorded as fit.distill_default: a later run that cannot distil drops it,
    where an explicit request would be refused)."""
    fit = plan.meta.setdefault("fit", {})
    fit["distill_steps"] = distill_steps(plan, steps)
    if default:
        fit["distill_default"] = default
    else:
        fit.pop("distill_default", None)


def set_distill_options(plan: Plan, e2e_steps: int | None = None, freeze_codes: bool = False,
                        windows: int | None = None, ce: float | None = None) -> None:
    """Record in `plan` how distillation goes beyond its block steps (--distill-e2e, --freeze-codes,
    --distill-windows, --distill-ce); None / False leave the defaults (`distill_options`, `distill_windows_of`,
    the end-to-end stage on the KL alone)."""
    from .quant.distill import check_ce_weight, check_steps
    fit = plan.meta.setdefault("fit", {})
    if e2e_steps is not None:
        try:
            fit["distill_e2e"] = check_steps(e2e_steps, "--distill-e2e")
        except ValueError as e:
            raise ConvertError(str(e)) from None
    if freeze_codes:
        fit["distill_freeze_codes"] = True
    if windows is not None:
        if int(windows) < 1:
            raise ConvertError(f"--distill-windows must be at least 1, got {windows}")
        fit["distill_windows"] = int(windows)
    if ce is not None:
        try:
            fit["distill_ce"] = check_ce_weight(ce, "--distill-ce")
        except ValueError as e:
            raise ConvertError(str(e)) from None


def distill_windows_of(plan: Plan, spec, device=None, say: Callable[[str], None] | None = None) -> int:
    """Calibration windows distillation trains on for `plan`: what the plan records (--distill-windows), else on
    CUDA max(DISTILL_WINDOWS_GPU, the feedback windows) when the block stage's hidden states and the model fit in
    70% of the free GPU memory (wqedge.quant.distill.block_stage_bytes), else the feedback windows (the CPU's
    default: distillation's cost there grows with each window)."""
    from .calib import default_device
    n = (plan.meta.get("fit") or {}).get("distill_windows")
    if n:
        return int(n)
    fb = feedback_windows_of(plan, device)
    dev = default_device(device)
    if dev.type != "cuda" or fb >= DISTILL_WINDOWS_GPU:
        return fb
    from .quant.distill import block_stage_bytes
    need = block_stage_bytes(spec, DISTILL_WINDOWS_GPU)
    free = _gpu_short(need, dev)
    if free is not None:
        if say:
            say(f"distillation on {fb} windows: {DISTILL_WINDOWS_GPU} would hold about {need / 2**30:.1f} GiB on "
                f"{dev} and {free / 2**30:.1f} GiB are free (--distill-windows N chooses)")
        return fb
    return DISTILL_WINDOWS_GPU


def _gpu_short(need: int, dev) -> int | None:
    """The free bytes on the CUDA device `dev` when an estimated `need` exceeds 70% of them (the estimates ran
    12-19% under measured peaks on llama-s), else None: it fits."""
    import torch
    free, _ = torch.cuda.mem_get_info(dev)
    return free if need > 0.7 * free else None


def distill_options(plan: Plan, device=None, windows: int | None = None) -> tuple[int, float]:
    """(end-to-end steps, code learning rate) of distilling `plan` on `device` with `windows` calibration windows:
    what the plan records (`set_distill_options`), else DISTILL_E2E_STEPS on CUDA and 0 on the CPU, and codes
    trained at DISTILL_CODE_LR with at least DISTILL_CODES_MIN_WINDOWS windows (0: frozen)."""
    from .calib import default_device
    fit = plan.meta.get("fit") or {}
    e2e = fit.get("distill_e2e")
    if e2e is None:
        e2e = DISTILL_E2E_STEPS if default_device(device).type == "cuda" else 0
    windows = feedback_windows_of(plan, device) if windows is None else windows
    frozen = fit.get("distill_freeze_codes") or windows < DISTILL_CODES_MIN_WINDOWS
    return int(e2e), 0.0 if frozen else DISTILL_CODE_LR


def e2e_blocker(spec, device, code_lr: float) -> str | None:
    """Why the default end-to-end stage should not run on `device` (None: it fits within 70% of the free memory):
    it holds the whole model in float32 several times over (wqedge.quant.distill.e2e_stage_bytes), which a 7B model
    exceeds on any one GPU. (Should it still run out of memory, distill_model keeps the block stage's result.)"""
    from .calib import default_device
    from .quant.distill import e2e_stage_bytes
    dev = default_device(device)
    if dev.type != "cuda":
        return None
    need = e2e_stage_bytes(spec, code_lr > 0)
    free = _gpu_short(need, dev)
    if free is not None:
        return (f"the end-to-end stage needs about {need / 2**30:.1f} GiB on {dev} and {free / 2**30:.1f} GiB are "
                f"free; skipped (the block stage runs; --distill-e2e N asks for it anyway)")
    return None


def default_distill_max_bits(device=None) -> float:
    """The effective bits up to which `convert` and `plan` distil by default when planning on `device`."""
    from .calib import default_device
    return DISTILL_DEFAULT_MAX_BITS_GPU if default_device(device).type == "cuda" else DISTILL_DEFAULT_MAX_BITS


def default_distill_steps(device=None) -> int:
    """Steps per decoder layer the default distils with when planning on `device`: DISTILL_STEPS on CUDA,
    DISTILL_STEPS_CPU on the CPU (where distillation's cost is of the order of the whole conversion)."""
    from .calib import default_device
    return DISTILL_STEPS if default_device(device).type == "cuda" else DISTILL_STEPS_CPU


def distill_blocker(calib_text: str | None, target: str = "gguf", ckpt=None, device=None,
                    stream_layers: bool | None = None) -> str | None:
    """Why light distillation cannot run here (None: it can). The default never switches it on where an explicit
    --distill would be refused."""
    if calib_text is None:
        return "it needs calibration text (--calib FILE, or self-calibration)"
    if target == "llamacpp":
        return "--target llamacpp quantizes with llama.cpp's own types"
    if stream_layers or (stream_layers is None and ckpt is not None and _streams(ckpt, device)):
        return "it trains on the whole model in memory and this run streams layers (--stream-layers)"
    return None


def _streams(ckpt, device) -> bool:
    from .stream import wants_streaming
    return wants_streaming(ckpt, device, None)


def default_distill(plan: Plan, calib_text: str | None, target: str = "gguf", ckpt=None, device=None,
                    stream_layers: bool | None = None) -> tuple[int, str]:
    """(steps, why) of light distillation for a `plan` whose caller asked neither for nor against it: on at
    `default_distill_steps` when the plan's effective bits are at most `default_distill_max_bits` and nothing blocks
    it (`distill_blocker`), else 0; `why` is one line for the user ("" above the threshold, where nothing changed)."""
    eff = plan.effective_bits()
    limit = default_distill_max_bits(device)
    if eff > limit:
        return 0, ""
    blocker = distill_blocker(calib_text, target, ckpt, device, stream_layers)
    if blocker:
        return 0, (f"not distilling ({eff:.2f} effective bits, where light distillation is the default): {blocker}")
    steps = default_distill_steps(device)
    return steps, (f"light distillation on by default: {eff:.2f} effective bits <= {limit:g}, "
                   f"where it lowered perplexity over error feedback alone by 0.8-3.5% (llama-s) and 8-17% (smol-s) "
                   f"with codes frozen, 0.3-10% (llama-s, 3.25-1.75 b) with codes trained on a GPU; "
                   f"{steps} steps per decoder layer (--no-distill turns it off, --distill N sets the steps)")


def settle_distill(plan: Plan, distill: int | None, calib_text: str | None, target: str = "gguf", ckpt=None,
                   device=None, stream_layers: bool | None = None, say: Callable[[str], None] = _quiet) -> int | None:
    """The `distill` to convert `plan` with (None: what the plan records), the default applied and recorded.

    An explicit `distill` (0: off) and a plan's explicit request (`plan --distill`) stand, refusals included. A
    plan that records the default's choice keeps it unless this run cannot distil (then 0, said). Otherwise the
    default decides (`default_distill`) and a choice to distil is recorded in the plan, so `plan` then
    `convert --plan` distils as one `convert` does."""
    if distill is not None:
        return distill
    fit = plan.meta.get("fit") or {}
    if "distill_steps" in fit:
        if not fit.get("distill_default") or not fit["distill_steps"]:
            return None
        blocker = distill_blocker(calib_text, target, ckpt, device, stream_layers)
        if blocker:
            why = f"not distilling, which the plan chose by default: {blocker}"
            say(why)
            record_distill(plan, 0, default=why)    # the file's plan says what was done
            return 0
        say(f"the plan distils by default: {fit['distill_default']}")
        return None
    steps, why = default_distill(plan, calib_text, target, ckpt, device, stream_layers)
    if why:
        say(why)
    if steps:
        record_distill(plan, steps, default=why)
    return None


def feedback_windows_of(plan: Plan, device=None) -> int:
    """Calibration windows error feedback (and distillation) runs for `plan`: what the plan records
    (meta fit.n_seqs: the planner's device default or --feedback-windows), else the default on `device`."""
    from .quant.feedback import feedback_windows
    n = plan.meta.get("fit", {}).get("n_seqs")
    return int(n) if n else feedback_windows(device)


def set_feedback_windows(plan: Plan, n: int) -> None:
    """Record in `plan` that error feedback fits on `n` calibration windows (--feedback-windows)."""
    if int(n) < 1:
        raise ConvertError(f"--feedback-windows must be at least 1, got {n}")
    plan.meta.setdefault("fit", {})["n_seqs"] = int(n)


def prepare_fits(ckpt, plan: Plan, calib_text: str | None, feedback: bool | None = None, device=None,
                 stats=None, say: Callable[[str], None] = _quiet, distill: int | None = None,
                 stream_layers: bool | None = None, resume_dir=None) -> Fits:
    """Run the calibration step `fit_mode` chooses, then light distillation when `distill_steps` says so.
    `stats`: diag(XᵀX) computed already (a cache). stream_layers: error feedback and statistics on the model read
    one decoder layer at a time, fitted chunks kept on disk (wqedge.stream; None: when the model does not fit);
    resume_dir: error feedback keeps each layer's fits there and resumes from them (wqedge.resume)."""
    mode = fit_mode(plan, calib_text, feedback)
    steps = distill_steps(plan, distill)
    if steps and calib_text is None:
        raise ConvertError("--distill needs calibration text (--calib FILE, or self-calibration)")
    if steps and stream_layers:
        raise ConvertError("--distill trains on the whole model in memory; it does not go with --stream-layers")
    windows = feedback_windows_of(plan, device)
    if mode == "feedback":
        from .quant.feedback import quantize_checkpoint
        say(f"fitting chunks with error feedback on {windows} windows of the calibration text…")
        try:
            fitted = quantize_checkpoint(ckpt, plan, calib_text, device=device, n_seqs=windows, progress=say,
                                         stream=stream_layers, resume_dir=resume_dir)
        except ValueError as e:
            raise ConvertError(str(e)) from e
        fits = Fits(mode, fitted=fitted)
    else:
        if mode == "stats" and stats is None:
            from .calib import collect_stats
            say("calibrating (activation statistics for the quantizer fits)…")
            stats = collect_stats(ckpt, calib_text, device=device, stream=stream_layers)
        fits = Fits(mode, stats=stats if mode == "stats" else None)
    if not steps:
        return fits
    from . import distributed
    if not distributed.writer_alone():   # --distributed: rank 0 distils alone, on all windows; the others write nothing
        return fits
    from .quant.distill import distill_checkpoint
    from .quantize import quantize_linears
    from .report import e2e_loss_label
    fitted = fits.fitted or {lin.hf_name: ch for lin, ch in quantize_linears(ckpt, plan, fits.stats, device)}
    d_windows = distill_windows_of(plan, ckpt.spec, device, say)
    e2e, code_lr = distill_options(plan, device, d_windows)
    default_e2e = "distill_e2e" not in (plan.meta.get("fit") or {})   # the default's stage, not one asked for
    if e2e and default_e2e:
        blocker = e2e_blocker(ckpt.spec, device, code_lr)
        if blocker:
            say(blocker)
            e2e = 0
    ce = float((plan.meta.get("fit") or {}).get("distill_ce", 0.0))
    if ce and not e2e:
        say(f"--distill-ce {ce:g} has no effect: this distillation has no end-to-end stage (--distill-e2e STEPS)")
    say(f"light distillation on {d_windows} windows: {steps} steps per decoder layer, {e2e} end-to-end steps"
        f"{f' (loss {e2e_loss_label(ce)})' if ce and e2e else ''}…")
    unprune = plan.unprune_weight if plan.pruning is not None else None
    import torch
    try:
        res = distill_checkpoint(ckpt, fitted, calib_text, steps, e2e, device=device, n_seqs=d_windows, progress=say,
                                 unprune=unprune, act_bits=None if plan.act_bits == 8 else plan.act_bits,
                                 code_lr=code_lr, min_code_windows=DISTILL_CODES_MIN_WINDOWS,
                                 e2e_needs_heldout=default_e2e, e2e_ce=ce)
    except torch.cuda.OutOfMemoryError as e:
        # the block stage holds the model, one layer's trained copies and every window's hidden states (a 7B model
        # with 256 windows: ~27 GB): more than a 24 GB GPU has, although the model alone fits there
        why = (f"light distillation ran out of GPU memory on {d_windows} calibration windows "
               f"({str(e).splitlines()[0] if str(e) else 'CUDA out of memory'})")
        torch.cuda.empty_cache()
        if distill is None and (plan.meta.get("fit") or {}).get("distill_default"):
            why += "; the chunks are written as fitted, without it (--distill-windows N with fewer windows needs less)"
            say(why)
            record_distill(plan, 0, default=why)     # the file's plan says what was done, and why
            return fits
        raise ConvertError(why + "; --distill-windows N with fewer windows needs less, --no-distill converts "
                                 "without it") from None
    say(res.summary())
    if distill is not None:         # the plan the file stores says how its parameters were made
        record_distill(plan, steps)
    plan.meta.setdefault("fit", {})["distilled"] = res.record()
    return Fits(mode, fitted=res.chunks, norms=res.norms)


# ---------------------------------------------------------------- RUQuant (issue 15): the one planning-side hook
_TRANSFORMS: dict = {}   # the last transforms built (planning then converting in one run builds them once)
_BUILDS: dict = {}       # the same run's wqedge.rotation.RotationBuild (times and stage-2 losses), same key


def _say(progress) -> Callable[[str], None]:
    """make_plan's `progress` as a line printer (True: stderr)."""
    if callable(progress):
        return progress
    if progress:
        import sys
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return _quiet


def rotation_build(ckpt, config: dict, calib_text: str | None, device=None, say: Callable[[str], None] = _quiet,
                   pruning=None):
    """The wqedge.rotation.RotationBuild of a plan's "rotation" config, built once per run (cached by checkpoint,
    config, text and pruning); ConvertError without calibration text or for a config that cannot be rebuilt.
    pruning: a plan's removed structures: the transforms are built on the masked model (wqedge.masked), those of
    the o and down inputs on the kept heads' and FFN channels' columns (wqedge.rotation.pruned_columns)."""
    if calib_text is None:
        raise ConvertError("--rotate builds its transforms from calibration text (--calib FILE, or self-calibration)")
    import hashlib
    import json
    import time
    from .rotation import build_rotation, check_config
    try:
        check_config(config)
    except ValueError as e:
        raise ConvertError(f"the plan's rotation: {e}") from None
    key = (ckpt.fingerprint(), json.dumps(config, sort_keys=True), hashlib.sha256(str(calib_text).encode()).hexdigest(),
           None if pruning is None else json.dumps(pruning.to_dict(), sort_keys=True))
    if key not in _TRANSFORMS or key not in _BUILDS:
        s2 = config.get("stage2")
        say("RUQuant: building the input transforms from calibration activations"
            + (f" (stage 1, then stage 2: {s2['steps']} steps per group)…" if s2 else "…"))
        t0 = time.time()
        _TRANSFORMS.clear()
        _BUILDS.clear()
        from . import distributed     # --distributed: built on rank 0 from all windows, handed to every rank
        src, columns = _masked(ckpt, pruning)
        build = distributed.on_writer(build_rotation, src, calib_text, config, progress=say, columns=columns)
        _TRANSFORMS[key], _BUILDS[key] = build.transforms, build
        say(f"RUQuant: transforms built in {time.time() - t0:.1f} s (stage 1 {build.stage1_seconds:.1f} s"
            + (f", stage 2 {build.stage2_seconds:.1f} s: mean output error "
               f"{build.report()['stage2_loss']['stage1']:.4g} -> {build.report()['stage2_loss']['stage2']:.4g}"
               if s2 else "") + ")")
    return _BUILDS[key]


def _masked(ckpt, pruning):
    """(`ckpt` seen through `pruning`: wqedge.masked.MaskedCheckpoint, the groups' kept columns), or (ckpt, {})."""
    if pruning is None:
        return ckpt, {}
    from .masked import MaskedCheckpoint
    from .rotation import pruned_columns
    return MaskedCheckpoint(ckpt, pruning), pruned_columns(pruning, ckpt.spec.n_layers)


def rotated(ckpt, config: dict | None, calib_text: str | None, device=None, say: Callable[[str], None] = _quiet,
            pruning=None):
    """(checkpoint to plan and fit from, {(layer, group): StoredTransform} for the writer) for a plan's
    "rotation" config: `ckpt` and None without one; else a wqedge.rotation.RotatedCheckpoint whose linears
    read folded and whose models run the transforms, so every allocator and fitter works on rotated weights
    unchanged. The transforms are rebuilt deterministically from the calibration text (`rotation_build`).
    pruning (a plan's): the rotated checkpoint is the masked one (the removed structures zero, the unpruned
    shapes kept, so a pruning plan's slicing applies as usual), with the o and down transforms on the kept
    columns: what the plan's pruned file stores are those narrower transforms."""
    if config is None:
        return ckpt, None
    from .rotation import RotatedCheckpoint, to_stored
    if config.get("method") == "hadamard":   # data-free: no calibration text, nothing to cache
        from .residual_rotation import ResidualRotatedCheckpoint, hadamard_transforms
        from .rotation import check_config
        try:
            check_config(config)
        except ValueError as e:
            raise ConvertError(f"the plan's rotation: {e}") from None
        # the residual rotation acts on the hidden size and within heads, the pruning on FFN channels and whole
        # heads: they commute, and the down (and o) transforms cover the kept columns, as RUQuant's
        src, columns = _masked(ResidualRotatedCheckpoint(ckpt, int(config["seed"])), pruning)
        t = hadamard_transforms(ckpt.spec, config, {k: len(c) for k, c in columns.items()})
        return RotatedCheckpoint(src, t, columns), {k: to_stored(v) for k, v in t.items()}
    t = rotation_build(ckpt, config, calib_text, device, say, pruning).transforms
    src, columns = _masked(ckpt, pruning)
    return RotatedCheckpoint(src, t, columns), {k: to_stored(v) for k, v in t.items()}


ROTATED_LLAMACPP = (
    "a rotated plan (--rotate) cannot be written for stock llama.cpp (--target llamacpp): its weights are "
    "folded (W' = W diag(s) M^T) and give the model's outputs only on inputs rotated online before every "
    "linear (x' = M (x / s)), and llama.cpp has no operator for such an input transform (nor for "
    "per-token activation quantization), so the file would run wrong. Use --target gguf (wqedge's runtime) "
    "or --target onnx (the transforms become graph operators), or convert for llama.cpp without --rotate")


def _check_rotated(plan: Plan, target: str) -> None:
    if plan.rotation is None:
        return
    if target == "llamacpp":   # the ONNX export lowers the transforms as graph ops (docs/onnx.md)
        raise ConvertError(ROTATED_LLAMACPP)


def write_gguf(ckpt, plan: Plan, out_path, calib_text: str | None = None, feedback: bool | None = None,
               device=None, stats=None, say: Callable[[str], None] = _quiet,
               progress: Callable[[str], None] | None = None, distill: int | None = None,
               head: str | None = None, stream_layers: bool | None = None) -> Path:
    """Our column-chunk GGUF of `ckpt` by `plan`, fitted as `fit_mode` says, written atomically; the output head
    stored as `head_kind` says."""
    from .quantize import convert_to_gguf
    _check_rotated(plan, "gguf")
    ckpt, transforms = rotated(ckpt, plan.rotation, calib_text, device, say, plan.pruning)
    fits = prepare_fits(ckpt, plan, calib_text, feedback, device, stats, say, distill, stream_layers)
    return convert_to_gguf(fits.source(ckpt), plan, out_path, fits.stats, device, progress=progress,
                           fitted=fits.fitted, transforms=transforms, head=head_kind("gguf", head))


@dataclass
class Written:
    """What `convert` wrote: the main file, the GGUF it was made from (same path for target gguf) and
    target-specific details (ONNX export info, llama.cpp export result)."""
    target: str
    path: Path
    gguf: Path | None = None
    details: dict = field(default_factory=dict)


def convert(ckpt, plan: Plan, output=None, target: str = "gguf", calib_text: str | None = None,
            feedback: bool | None = None, device=None, say: Callable[[str], None] = _quiet,
            progress: Callable[[str, int], Callable | None] | None = None,
            on_gguf: Callable[[Path], None] | None = None, onnx_variant: str = "portable",
            onnx_lowering: str = "compact", distill: int | None = None, head: str | None = None,
            stream_layers: bool | None = None, resume_dir=None) -> Written:
    """Lower `plan` of `ckpt` into the files of `target` (default names: `default_output`); head: how our GGUF
    stores the output head (`head_kind`); stream_layers, resume_dir: see prepare_fits.

    progress(stage, total) -> a per-item callback (or None), for the stages "quantizing" and "lowering to
    ONNX"; on_gguf(path) runs once our GGUF is written (the CLI's report and quality check), before any
    further lowering. ConvertError when a step cannot run or fails.
    """
    if target not in TARGETS:
        raise ConvertError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    output = Path(output) if output is not None else default_output(ckpt.path, plan, target)
    _check_rotated(plan, target)
    head = head_kind(target, head, say)
    ckpt, transforms = rotated(ckpt, plan.rotation, calib_text, device, say, plan.pruning)
    from . import distributed
    if target == "llamacpp":
        if distill_steps(plan, distill):
            if distill is not None or not (plan.meta.get("fit") or {}).get("distill_default"):
                raise ConvertError("--distill tunes our block formats; --target llamacpp quantizes with llama.cpp's own")
            say("not distilling, which the plan chose by default: --target llamacpp quantizes with llama.cpp's own "
                "types")
        if not distributed.writer_alone():   # --distributed: the plan is every rank's; rank 0 alone exports
            return Written(target, output, None, {"rank": distributed.rank()})
        return _convert_llamacpp(ckpt, plan, output, calib_text, device, head)
    gguf_out = output if target == "gguf" else output.with_suffix(".gguf")
    fits = prepare_fits(ckpt, plan, calib_text, feedback, device, None, say, distill, stream_layers, resume_dir)
    if not distributed.writer_alone():   # --distributed: the fits are every rank's; rank 0 alone writes
        return Written(target, output, None, {"rank": distributed.rank()})
    from .quantize import convert_to_gguf
    try:
        tick = progress("quantizing", len(ckpt.spec.linears())) if progress else None
        path = Path(convert_to_gguf(fits.source(ckpt), plan, gguf_out, fits.stats, device, progress=tick,
                                    fitted=fits.fitted, transforms=transforms, head=head))
    except (ValueError, OSError) as e:
        raise ConvertError(f"convert failed, nothing written: {e}") from e
    if on_gguf is not None:
        on_gguf(path)
    if target == "gguf":
        return Written(target, path, path)
    from .converters.onnx_export import export_onnx
    try:
        tick = progress("lowering to ONNX", len(ckpt.spec.linears()) + 1) if progress else None
        info = export_onnx(path, output, onnx_variant, progress=tick, lowering=onnx_lowering)
    except (ValueError, OSError) as e:
        raise ConvertError(f"ONNX export failed, nothing written: {e}") from e
    return Written(target, Path(info["path"]), path, {"onnx": info})


def _pruned_width_hint(spec, pruned) -> str:
    """Why a pruned plan may miss a low llama.cpp budget that the unpruned model reaches: llama.cpp's types below
    4.5 bits (k- and i-quants) take rows in blocks of 256 columns, and pruning can leave ffn_down's input (the FFN
    length) or attn_output's (the attention width) off that multiple, so those tensors need Q4_0/Q8_0-class types."""
    odd = []
    for layer in range(spec.n_layers):
        for what, full, kept in (("FFN length", spec.ff(layer), pruned.ff(layer)),
                                 ("attention width", spec.heads(layer) * spec.head_dim,
                                  pruned.heads(layer) * pruned.head_dim)):
            if full % 256 == 0 and kept % 256:
                odd.append(f"layer {layer} {what} {kept}")
    if not odd:
        return ""
    shown = ", ".join(odd[:4]) + (f" and {len(odd) - 4} more" if len(odd) > 4 else "")
    return (f"; pruning left widths that are not multiples of 256 ({shown}), and llama.cpp's types below 4.5 bits "
            "need 256-column blocks, so ffn_down / attn_output there take Q4_0/Q8_0-class types: give this target "
            "a larger --bits, plan with --prune-group 256 (FFN lengths and attention widths in steps of 256, "
            "convert's default for --target llamacpp), or use --target gguf "
            "(wqedge's runtime runs pruned models at any width)")


def _convert_llamacpp(ckpt, plan: Plan, output: Path, calib_text: str | None, device, head: str = DEFAULT_HEAD) -> Written:
    """A stock llama.cpp GGUF: the plan projected onto llama.cpp types within its budget, quantized by
    llama.cpp (importance matrix from the calibration text); the output head (with tied embeddings: the one
    embedding table) as LLAMACPP_HEAD_TYPES[head], untied embeddings F16 as in our GGUF."""
    try:
        from .converters.llamacpp import available_types, export_llamacpp
    except ImportError as e:
        raise ConvertError(f"--target llamacpp needs llama-cpp-python (pip install 'wqedge[llamacpp]'): {e}") from e
    from .alloc.llamacpp_types import budget_types
    imatrix = None
    if calib_text is not None:
        from .calib import collect_stats
        imatrix = collect_stats(ckpt, calib_text, device=device)
    spec = plan.pruning.pruned_spec(ckpt.spec) if plan.pruning is not None else ckpt.spec
    try:
        types = budget_types(spec, plan.budget_bits, plan, available_types(imatrix=imatrix is not None))
        res = export_llamacpp(ckpt, output, imatrix, plan=plan, tensor_types=types, **llamacpp_head_types(ckpt.spec, head))
    except (ValueError, OSError, RuntimeError) as e:
        hint = _pruned_width_hint(ckpt.spec, spec) if plan.pruning is not None and "smallest allowed" in str(e) else ""
        raise ConvertError(f"llama.cpp export failed, nothing written: {e}{hint}") from e
    return Written("llamacpp", Path(res.path), details={"llamacpp": res})
