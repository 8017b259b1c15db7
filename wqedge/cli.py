"""The `wqedge` command line: plan, convert, inspect and evaluate column-chunk quantized LLaMA models.

The CLI only parses options, shows progress and prints reports; the work is done by the
library modules (checkpoint, alloc, quantize, converters, runtime), which know nothing of it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .blocks import ACTION_NAMES
from .head import HEAD_KINDS
from .pipeline import (ALLOCATORS, DEFAULT_HEAD, DEMO_DIR, DISTILL_CODES_MIN_WINDOWS, DISTILL_DEFAULT_MAX_BITS,
                       DISTILL_DEFAULT_MAX_BITS_GPU, DISTILL_E2E_STEPS, DISTILL_STEPS, DISTILL_STEPS_CPU,
                       DISTILL_WINDOWS_GPU, STAGE2_STEPS, TARGETS)
from .plan import METHODS
from .rotation_format import DEFAULT_BLOCK as ROTATE_BLOCK, MAX_INT8_BLOCK
MIN_CALIB_WORDS = 16


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


class _LineProgress:
    """Progress as plain lines on stderr, for logs and pipes where a tqdm bar is not drawn: the first step, then at
    most one line per `every` seconds, and the last."""

    def __init__(self, total: int, desc: str, every: float = 10.0):
        self.total, self.desc, self.every, self.n = total, desc, every, 0
        self.t0 = self.last = time.time()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        if self.n in (1, self.total) or now - self.last >= self.every:
            self.last = now
            click.echo(f"{self.desc}: {self.n}/{self.total} tensors ({now - self.t0:.0f} s)", err=True)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    """A tqdm bar on a terminal, else progress lines (a long conversion logged to a file still shows it moving)."""
    if not sys.stderr.isatty():
        return _LineProgress(total, desc)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr)


def _open_checkpoint(model_dir):
    from .checkpoint import CheckpointError, LlamaCheckpoint
    try:
        return LlamaCheckpoint.open(model_dir)
    except CheckpointError as e:
        _fail(str(e))


def _demo_model() -> Path:
    """The embedded default: a tiny random LLaMA with a real tokenizer, built on the spot."""
    from .tinymodel import build_tiny_model
    path = DEMO_DIR / "tiny-llama"
    if not (path / "config.json").exists():
        click.echo(f"no model given: building a tiny random LLaMA in {path}/ (the embedded default)")
        build_tiny_model(path, intermediate=384)  # every size a multiple of 128: no ragged chunks
    return path


def _read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        _fail(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError:
        _fail(f"{path} is not UTF-8 text")


def _read_calib(path) -> str:
    """Calibration text: must hold some words (an empty file would silently mean 'no calibration')."""
    text = _read_text(path)
    if len(text.split()) < MIN_CALIB_WORDS:
        _fail(f"calibration text {path} holds {len(text.split())} words; give at least {MIN_CALIB_WORDS} "
              "(a few thousand tokens of ordinary text in the model's language is a good start), or leave out "
              "--calib")
    return text


def _check_bits(ctx, param, value):
    if value is None:
        return value
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"the budget must be a positive number of bits per weight, got {value}")
    return value


def _check_group(value: int) -> int:
    from .units import check_group_size
    try:
        return check_group_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _print_plan_summary(plan) -> None:
    hist = ", ".join(f"{a}: {n}" for a, n in plan.action_histogram().items())
    click.echo(f"plan: allocator {plan.allocator}, group size {plan.group_size}, budget {plan.budget_bits} bits, "
               f"effective {plan.effective_bits():.4f} bits/weight")
    click.echo(f"chunks per action: {hist}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wqedge")
def main():
    """wqedge: quantize a Hugging Face LLaMA checkpoint in column chunks under a global bit budget,
    write it as GGUF, and evaluate or run it.

    \b
    Typical use:
      wqedge convert path/to/llama -o model.gguf --bits 2.5 --calib calib.txt
      wqedge inspect model.gguf
      wqedge eval model.gguf --text eval.txt
    """
    from .fileio import terminate_as_interrupt
    terminate_as_interrupt()  # SIGTERM unwinds like Ctrl-C: no partial file is left behind


def _parse_protect(ctx, param, value):
    if not value:
        return ()
    try:
        ks = tuple(sorted({int(k) for k in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated column counts such as 1,2,4, got {value!r}") from None
    if any(k <= 0 or k > 32 for k in ks):
        raise click.BadParameter(f"protected-column counts must lie in 1..32, got {value!r}")
    return ks


def _parse_prune(ctx, param, value):
    from .alloc.prune import KINDS
    kinds = tuple(k.strip() for k in value.split(",") if k.strip()) if value else ()
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise click.BadParameter(f"structure kinds are {', '.join(KINDS)}; got {bad[0]!r}")
    return kinds


def default_prune_group(spec, prune, target: str = "gguf") -> int:
    """--prune-group when not given: 256 for a llama.cpp export of a pruned plan whose model has an FFN length that
    is a multiple of 256 (llama.cpp's k- and i-quants read ffn_down and attn_output in 256-column blocks: smaller
    units would leave them off that multiple and the export above Q4_0-class types), else 32."""
    from .alloc.prune import BLOCK_COLUMNS
    aligned = spec.intermediate_size % BLOCK_COLUMNS == 0
    return BLOCK_COLUMNS if prune and target == "llamacpp" and aligned else 32


def _make_plan(ckpt, bits, group, allocator, method, calib, seed, device, protect=(), preset=None, rotate=None,
               act_bits=8, prune=(), max_prune=0.3, stream_layers=None, rotate_stage2=None, resume_dir=None,
               prune_group=None, two_level=None, target: str = "gguf", compact_headers: bool = True,
               rotate_block=None):
    from .pipeline import make_plan
    from .plan import PlanError
    if prune_group is None:
        prune_group = default_prune_group(ckpt.spec, prune, target)
        if prune_group != 32:
            click.echo(f"pruning in units of {prune_group} FFN channels and heads in steps of 256 columns, so the "
                       f"llama.cpp export keeps 256-column blocks (--prune-group to change)")
    try:
        plan = make_plan(ckpt, bits, group, allocator, method, calib, seed, device, protect, preset,
                         rotate=rotate or False, act_bits=act_bits, prune=prune,
                         max_prune=max_prune, stream_layers=stream_layers, rotate_stage2=rotate_stage2 or 0,
                         resume_dir=resume_dir, prune_group=prune_group, two_level=two_level,
                         compact=compact_headers, rotate_block=rotate_block)
    except PlanError as e:
        _fail(str(e))
    if plan.allocator == "uniform":
        _explain_uniform(plan, calib is not None)
    return plan


def _explain_uniform(plan, have_calib: bool) -> None:
    """Say what the uniform allocator chose and why, so a budget never silently means a lower width."""
    u = plan.meta.get("uniform", {})
    main, by_width = u.get("action"), u.get("by_width", {})
    eff = plan.effective_bits()
    if u.get("preset"):
        click.echo(f"preset {main}: every chunk {main}, {eff:.4f} effective bits at group size {plan.group_size}")
        return
    others = {int(g): a for g, a in by_width.items() if a != main}
    if others:
        narrow = ", ".join(f"{g}-column chunks {a}" for g, a in sorted(others.items(), reverse=True))
        click.echo(f"uniform {main} within {plan.budget_bits:g} bits: {main} everywhere would cost "
                   f"{u['all_main_bits']:.4f} bits (chunks narrower than {plan.group_size} columns pay their scale and "
                   f"offset over fewer weights), so the narrow chunks take a smaller width: {narrow}. "
                   f"For {main} everywhere: --preset {main} (or --bits {u['all_main_bits']:.4f}).")
    spare = plan.budget_bits - eff
    if spare > 0.2 and plan.budget_bits < 16:
        hint = ("the greedy allocator (with --calib) spends the rest where it matters most" if not have_calib else
                "--allocator greedy spends the rest where it matters most")
        click.echo(f"note: uniform {main} uses {eff:.4f} of the {plan.budget_bits:g}-bit budget; {hint}.")


_common_plan_options = [
    click.option("--bits", "-b", type=float, default=4.25, show_default=True, callback=_check_bits,
                 help="Budget: effective bits per weight over all decoder linears, counting every scale, "
                      "zero point and protected column (q4 at group 128 costs 4.25, q3 3.25, q2 2.25)."),
    click.option("--group", "-g", type=int, default=128, show_default=True, callback=lambda c, p, v: _check_group(v),
                 help="Chunk width G in input columns (a multiple of 32; 128 or 256 recommended)."),
    click.option("--allocator", "-a", type=click.Choice(ALLOCATORS), default=None,
                 help="Who chooses each chunk's action: 'uniform' (one action everywhere), 'greedy' "
                      "(deterministic loss-aware knapsack; it beat 'rl' on held-out perplexity at all 5 budgets, "
                      "see bench/results/allocation.md) or 'rl' (PPO policy, WINDQuant). "
                      "Default: greedy (on --calib text, or on text the model writes itself: --self-calib); uniform with "
                      "--no-self-calib and no --calib."),
    click.option("--method", type=click.Choice(METHODS), default="neuqi", show_default=True,
                 help="Scale/zero-point initialisation of uniform quantizers: NeUQI or min-max round-to-nearest."),
    click.option("--calib", type=click.Path(exists=True, dir_okay=False),
                 help="Calibration text (UTF-8). Gives activation statistics that weight the quantizer fits "
                      "and drive the loss-aware allocators."),
    click.option("--protect", default="", callback=_parse_protect, metavar="K,K,...",
                 help="Offer the greedy allocator saliency-protected variants of the low-bit actions, keeping the "
                      "K most salient input columns of a chunk in fp16 (e.g. 1,2,4); it buys them only where "
                      "they beat wider codes. Off by default: on llama-s they were bought for 8 of 35,840 columns "
                      "and made no measurable difference, for a 3.5x longer damage table."),
    click.option("--preset", type=click.Choice(ACTION_NAMES), default=None,
                 help="One action for every chunk, whatever it costs (q4 is 4.25 bits at G = 128, more where a "
                      "ragged last chunk is narrower); replaces --bits. For those who think in types, like "
                      "llama.cpp's Q4_0/Q3_K presets."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling and RL."),
    click.option("--device", default=None, help="torch device for planning (default: cuda if available, else cpu)."),
    click.option("--distill", type=click.IntRange(min=0), is_flag=False, flag_value=DISTILL_STEPS, default=None, metavar="[STEPS]",
                 help=f"Light distillation after fitting (NeUQI): each chunk's scales and offsets and the RMSNorm "
                      f"weights (and, with enough calibration windows, the codes: --freeze-codes) trained to match "
                      f"the fp model's layer outputs on the calibration text, STEPS AdamW steps per decoder layer "
                      f"(default {DISTILL_STEPS}; 0: off), then an end-to-end stage (--distill-e2e). Default: on at "
                      f"plans of <= {DISTILL_DEFAULT_MAX_BITS:g} effective bits ({DISTILL_DEFAULT_MAX_BITS_GPU:g} on a "
                      f"GPU) with calibration text (--calib or "
                      f"self-calibration), {DISTILL_STEPS} steps when planning on a GPU, {DISTILL_STEPS_CPU} on the "
                      f"CPU (bench/results/distill.md), except with --target llamacpp or --stream-layers; off "
                      f"above. `plan` records the choice in the plan for a later convert."),
    click.option("--no-distill", is_flag=True, default=False,
                 help="No light distillation, also where it is the default (the same as --distill 0)."),
    click.option("--distill-e2e", type=click.IntRange(min=0), default=None, metavar="STEPS",
                 help=f"End-to-end stage of distillation after the block stage: STEPS AdamW steps on the KL "
                      f"divergence of the next-token distributions against the fp model, all layers at once "
                      f"(default {DISTILL_E2E_STEPS} when planning on a GPU where it fits: it holds the whole model "
                      f"in float32 several times over; 0 on the CPU, where it costs more than the conversion). It is "
                      f"kept only when it lowers the held-out KL."),
    click.option("--freeze-codes", is_flag=True, default=False,
                 help=f"Distil with the integer codes frozen (NeUQI's light distillation: only scales, offsets and "
                      f"norms). By default the codes are trained too (straight-through latent codes) when "
                      f"distillation has at least {DISTILL_CODES_MIN_WINDOWS} calibration windows (the GPU's "
                      f"default; bench/results/distill_codes.md), with a layer whose held-out error rises trained "
                      f"again with frozen codes."),
    click.option("--distill-windows", type=click.IntRange(min=1), default=None, metavar="N",
                 help=f"Calibration windows (512 tokens each) distillation trains on; recorded in the plan. Default: "
                      f"{DISTILL_WINDOWS_GPU} when planning on a GPU where their hidden states fit (trained codes "
                      f"gain from more text: llama-s 3.25 b 6.388 -> 6.344 against 256), else the error-feedback "
                      f"windows (--feedback-windows; 32 on the CPU)."),
    click.option("--distill-ce", type=click.FloatRange(0.0, 1.0), default=None, metavar="W",
                 help="Weight of the calibration text's own next tokens in the end-to-end stage's loss: "
                      "(1 - W)·KL(fp || model) + W·cross-entropy; recorded in the plan. Default 0: the KL alone, "
                      "the model as close to the fp one as it gets. W = 0.1 lowered llama-s's perplexity by "
                      "0.3-0.5% over three seeds at 2.5 and 3.25 bits but raised its KL to the fp model by 3-10% "
                      "(bench/results/distill_codes.md run 13): it fits the calibration text's domain, not the fp "
                      "model, so use it where that text is the domain the model will serve."),
    click.option("--rotate", type=click.Choice(["ruquant", "hadamard"]), is_flag=False, flag_value="ruquant",
                 default=None, metavar="[ruquant|hadamard]",
                 help="Rotate before quantizing, for low activation bits (--act-bits 6/4). 'ruquant' (the default of a "
                      "bare --rotate): orthogonal input transforms per layer and linear group (q/k/v, o, gate/up, "
                      "down) built from the calibration activations, folded into the weights and applied online by "
                      "the runtime; needs calibration text. 'hadamard': data-free; the residual stream and the "
                      "attention heads rotated offline (folded into every weight, norms and head included) and one "
                      "block Hadamard online, on down_proj's input: at W4A4 as good as RUQuant on llama-s at a "
                      "fraction of its run-time cost (docs/ruquant.md, bench/results/rotation_methods.md)."),
    click.option("--rotate-stage2", type=click.IntRange(min=1), is_flag=False, flag_value=STAGE2_STEPS, default=None,
                 metavar="[STEPS]",
                 help=f"With --rotate: RUQuant stage 2, each group's global Householder vector learnt by STEPS AdamW "
                      f"steps (default {STAGE2_STEPS}) on the group's output error with the plan's --act-bits and "
                      f"straight-through weights at the preset's width (else the width the budget buys uniformly). "
                      f"Recorded in the plan (version 4), so `convert --plan` rebuilds the same transforms. Off "
                      f"unless given: on llama-s W4A4 it changed perplexity by -0.006% for ten times the build time "
                      f"(bench/results/ruquant.md)."),
    click.option("--rotate-block", type=click.IntRange(min=2, max=MAX_INT8_BLOCK), default=None, metavar="B",
                 help=f"With --rotate ruquant: channels per block of the transforms' block matrices (default "
                      f"{ROTATE_BLOCK}). The runtime pays 2·B multiply-adds per input column and group; on llama-s "
                      f"B = 32 gave the best W4A4/W8A4 perplexity of 32, 64 and 128, at under half of 128's decode "
                      f"overhead (bench/results/ruquant_block.md). Recorded in the plan (rotation.block)."),
    click.option("--prune", default="", callback=_parse_prune, metavar="ffn,heads",
                 help="Let the greedy (or rl) allocator also prune structures as 0-bit actions under the same budget: "
                      "'ffn' (FFN channels in groups of --prune-group: rows of gate/up, columns of down), 'heads' "
                      "(query heads, evenly per KV group, or whole KV groups). Pruned weights leave the file; --bits stays bits "
                      "over the unpruned model's weights. The pruned amounts tried (0, 5%, ... --max-prune) that a calibrated "
                      "prediction does not rule out are converted and measured on held-out calibration windows; pruning "
                      "is kept only where it measures better than "
                      "quantization alone; with --allocator rl, PPO re-allocates the bits of every pruned amount "
                      "measured, and the measured loss chooses among those plans and the knapsack's. With "
                      "--rotate the structures are chosen on the unrotated model, then the transforms are built on the "
                      "kept heads and channels and the bits allocated again. Needs calibration text (or self-calibration)."),
    click.option("--max-prune", type=click.FloatRange(0.0, 0.9), default=0.3, show_default=True,
                 help="With --prune: the largest fraction of decoder linear weights the search may remove."),
    click.option("--two-level/--no-two-level", default=None,
                 help="Offer the two-level kinds (q4s, q3s, q2s: an fp16 scale per chunk row and 6-bit sub-scales and "
                      "offsets per 32 columns, as llama.cpp's k-quants) to the greedy allocator beside the others. "
                      "Default: on for greedy plans of 4 bits and up (never worse on the checkpoints measured, up to "
                      "1% lower perplexity; decode as fast with int8 activations: bench/results/two_level_default.md), "
                      "off below, with --prune, --rotate or --act-bits other than 8, and for --target llamacpp / "
                      "onnx. --two-level without calibration plans greedily from the weights alone."),
    click.option("--compact-headers/--no-compact-headers", default=True, show_default=True,
                 help="Offer the allocators the compact-header kinds (q4c, q3c, q2c, ternaryc, q1c: the q4 .. q1 grids "
                      "with one byte per row scale and offset instead of fp16, 16 bits a chunk row less; at 2.5 bits "
                      "-2% perplexity, bench/results/compact_headers.md) instead of the fp16-header q4 .. q1. Files "
                      "with them are format version 4; --no-compact-headers writes files that runtimes of formats "
                      "1-3 read."),
    click.option("--prune-group", type=click.IntRange(min=1), default=None, metavar="N",
                 help="With --prune ffn: FFN channels per pruning unit. A multiple of 256 keeps every pruned FFN "
                      "length a multiple of 256 where the model's is, and makes head pruning remove heads in steps "
                      "of 256 columns, so `--target llamacpp` can still give ffn_down and attn_output llama.cpp's "
                      "k- and i-quant types (their rows come in blocks of 256 columns); smaller units let the search "
                      "remove less at a time. Default: 256 for `convert --target llamacpp` when the model's FFN "
                      "length is a multiple of 256, else 32."),
    click.option("--feedback-windows", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Calibration windows (512 tokens each) that error feedback fits on; recorded in the plan. "
                      "Default: 256 when planning on a GPU (it costs there what 32 do), 32 on the CPU, where "
                      "each window is two forward passes per layer (llama-s: 32 vs 256 windows +0.3-0.4% "
                      "perplexity for 8x less of that work; bench/results/feedback_windows.md)."),
    click.option("--stream-layers/--no-stream-layers", default=None,
                 help="Plan and fit on the model read one decoder layer at a time from its safetensors files (peak "
                      "memory: one layer, the embeddings and head, the calibration windows' hidden states; fitted "
                      "chunks kept on disk until written) instead of the whole model in memory. Same plan and "
                      "file. Default: on when the checkpoint's 16-bit copy would take more than 40% of the "
                      "planning device's memory (free GPU memory on CUDA, available RAM on the CPU). Not with "
                      "--prune, --allocator rl, --rotate or --distill, which hold the whole model."),
    click.option("--resume-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                 help="Keep checkpoints in DIR as they are computed — planning's statistics (each decoder layer's "
                      "input statistics, the gradients, the damage table) and convert's error-feedback fits, one "
                      "file per layer — and, when a job with the same model, text and options left some there, load "
                      "them instead of recomputing: a failed or killed plan/convert resumes. Under --distributed a "
                      "folder every process reads (docs/distributed.md)."),
    click.option("--act-bits", type=click.Choice(["8", "6", "4"]), default="8", show_default=True,
                 callback=lambda c, p, v: int(v),
                 help="Activation bits of the runtime's linears (per token, asymmetric at 6 and 4; 8 is the "
                      "int8 path of every file). Recorded in the plan; best with --rotate."),
]


def _kv_rotation_option(default: str):
    """--kv-rotation of plan / convert / eval / run: turning off the Hadamard rotation of K before it is quantized."""
    return click.option("--kv-rotation", type=click.Choice(["hadamard", "none"]), default=None,
                        help="Rotation of a quantized KV cache: 'hadamard' rotates K per head before quantizing (and Q "
                             "with it, so scores are unchanged; 4-bit V too), 'none' quantizes K and V as they are "
                             "(docs/format.md \"KV cache\"; bench/results/kv_cache.md measures both). " + default)


def _kv_cache_spec(kv_bits, kv_rotation, where: str = ""):
    """The KV cache --kv-bits / --kv-rotation ask for (None when --kv-bits is not given); --kv-rotation without a
    quantized cache to apply to is refused."""
    from .kv_format import KVCacheSpec, parse_bits
    if kv_rotation is not None and kv_bits not in ("8", "4"):
        _fail(f"--kv-rotation {where}needs --kv-bits 8 or 4 (it is a setting of a quantized KV cache)")
    return None if kv_bits is None else KVCacheSpec(parse_bits(kv_bits), kv_rotation or "hadamard")


def _kv_bits_option(default: str):
    """--kv-bits of plan / convert / eval / run: one set of choices and one explanation, each command's own default."""
    return click.option("--kv-bits", type=click.Choice(["f32", "f16", "8", "4"]), default=None,
                        help="KV cache of the runtime: 'f32' float32, 'f16' fp16 values (half the bytes, as llama.cpp's "
                             "default cache), '8' or '4' bits per value (per token and KV head, "
                             "groups of 32 / 16 values with an fp16 scale and min; K Hadamard-rotated per head first; "
                             "docs/format.md \"KV cache\"). 4 bits store 6 bits a value, 19% of float32 "
                             "(bench/results/kv_cache.md). " + default)


def plan_options(f):
    for opt in reversed(_common_plan_options):
        f = opt(f)
    return f


def distributed_option(f):
    """--distributed: run the command in the torch.distributed process group torchrun describes; every rank plans,
    rank 0 alone writes (wqedge.distributed)."""
    import functools

    @click.option("--distributed", "distributed_run", is_flag=True, default=False,
                  help="Plan with several processes under torchrun (`torchrun --nproc-per-node N -m wqedge "
                       "plan ... --distributed`; NCCL on GPUs, else gloo on CPU processes): the calibration windows "
                       "are split over the processes and the statistics summed, so every process holds those of "
                       "all windows and makes the same plan; what does not split over windows (self-calibration, "
                       "--allocator rl, --prune, --rotate, --distill, the ONNX and llama.cpp exports) runs on rank 0 "
                       "alone and is handed to the others; only rank 0 writes files (docs/distributed.md).")
    @functools.wraps(f)
    def run(*args, distributed_run=False, **kw):
        if not distributed_run:
            return f(*args, **kw)
        from . import distributed
        try:
            with distributed.session():
                if not distributed.is_writer():        # one report on stdout: rank 0's
                    sys.stdout = open(os.devnull, "w")
                return f(*args, **kw)
        except distributed.DistributedError as e:
            _fail(str(e))
        except torch_dist_error() as e:   # a rank was lost (or a collective timed out): nothing was written
            _fail(f"--distributed: another process of the job failed or was lost ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); no file was written")
    return run


def torch_dist_error():
    """torch.distributed's error class (a RuntimeError), imported only when --distributed runs."""
    import torch.distributed
    return getattr(torch.distributed, "DistError", RuntimeError)


@main.command()
@click.argument("model_dir", required=False, type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Output GGUF (default: <model>.wq<bits>.gguf "
              "beside the current folder; for the embedded demo, inside wqedge-demo/).")
@plan_options
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="Use this plan (from `wqedge plan`) instead of making one; --bits/--allocator are then ignored.")
@click.option("--save-plan", type=click.Path(dir_okay=False), help="Also write the plan used as JSON here.")
@click.option("--feedback/--no-feedback", default=None,
              help="Fit chunks with error feedback (GPTQ-style, earlier layers quantized in the loop) on the "
                   "calibration text. Default: on for greedy/rl plans with --calib and for self-calibration, "
                   "off otherwise.")
@click.option("--self-calib/--no-self-calib", "self_calib", default=True, show_default=True,
              help="Without --calib, sample calibration text from the model itself (32 x 256 tokens, seeded; "
                   "data-free) and use it as --calib text: greedy plan, error feedback. At 4.25 bits it removed "
                   "44% (llama-s) and 91% (smol-s) of the perplexity damage of the weight-only default "
                   "(bench/results/calib_source.md). --no-self-calib: uniform plan, weight-only fits, several "
                   "times faster.")
@click.option("--target", type=click.Choice(TARGETS), default="gguf", show_default=True,
              help="'gguf': our column-chunk GGUF (runs in wqedge's C++ runtime); 'onnx': a KV-cache decoder for "
                   "stock ONNX Runtime (the GGUF is made first and kept beside it); 'llamacpp': a GGUF that stock "
                   "llama.cpp runs, the plan projected onto one llama.cpp type per tensor within the same budget and "
                   "quantized by llama.cpp's own quantizer (importance matrix from --calib).")
@click.option("--onnx-lowering", type=click.Choice(["compact", "widen", "int4"]), default="compact",
              show_default=True,
              help="How chunks become ONNX operators: 'compact' keeps every width (q3/ternary/q1 unpacked in the "
                   "graph), 'widen' stores them as 4/2-bit MatMulNBits, 'int4' makes every linear one 4-bit "
                   "MatMulNBits (fastest in ONNX Runtime; see docs/onnx.md).")
@click.option("--check/--no-check", "check", default=None,
              help="After writing, compare the file's model with the original on 256 tokens (the calibration text, "
                   "else text the model writes itself): perplexity of both, KL divergence, top-1 agreement, and a "
                   "loud warning when the file is damaged. Default: on for models up to 1.5 B parameters (it holds "
                   "two float32 copies in memory).")
@click.option("--onnx-variant", type=click.Choice(["portable", "native"]), default="portable", show_default=True,
              help="'portable': stock ONNX Runtime operators; 'native': one wqedge.ChunkLinear per linear, run by "
                   "our custom-op library libwqedge_ort (smaller and packed in memory; see docs/onnx.md).")
@_kv_bits_option("Default: the plan's (--plan), else f16 (half the bytes of float32, 2x the decode speed at "
                 "2000 tokens, bench/results/decode_depth.md); written into the file (and the plan) as the runtime's "
                 "default, which `wqedge run` / `eval --backend cpp` --kv-bits override. GGUF target only.")
@_kv_rotation_option("Default: hadamard; needs --kv-bits 8 or 4, written into the file beside it.")
@click.option("--head", type=click.Choice(HEAD_KINDS), default=None,
              help=f"How the output head (the vocabulary projection; the embedding table too when the checkpoint "
                   f"ties them) is stored: 'fp16' dense as in the checkpoint, 'q8' / 'q4' a quantized linear in the "
                   f"decoder linears' layout, fitted from the weights (default {DEFAULT_HEAD}). Not counted in the "
                   f"effective bits; the head is read once per decoded token (bench/results/head_quant.md). "
                   f"--target llamacpp stores it as the matching llama.cpp type (q8: Q8_0, q4: Q4_0, fp16: F16; "
                   f"untied embeddings stay F16 as in our GGUF); --target onnx keeps it dense.")
@distributed_option
def convert(model_dir, output, bits, group, allocator, method, calib, protect, preset, seed, device, distill, no_distill,
            distill_e2e, freeze_codes, distill_windows, distill_ce, rotate, rotate_stage2, rotate_block, prune, max_prune, two_level, compact_headers, prune_group, feedback_windows, stream_layers,
            resume_dir, act_bits, plan_path, save_plan, feedback, self_calib, target, onnx_lowering, check, onnx_variant,
            kv_bits, kv_rotation, head):
    """Quantize MODEL_DIR (a local Hugging Face LLaMA folder) and write a wqedge GGUF.

    With no MODEL_DIR, a tiny random LLaMA is built on the spot and converted (a self-contained demo).
    The output is written atomically: an interrupted or failed convert leaves no file behind.
    """
    from . import pipeline
    from .plan import Plan, PlanError
    from .runtime.gguf_reader import WqGGUF

    t0 = time.time()
    model_dir = Path(model_dir) if model_dir else _demo_model()
    ckpt = _open_checkpoint(model_dir)
    spec = ckpt.spec
    click.echo(f"model: {model_dir} ({spec.n_layers} layers, hidden {spec.hidden_size}, "
               f"{len(spec.linears())} decoder linears, stored {ckpt.dtype})")
    if spec.extra.get("sliding_window"):
        click.echo(f"note: a sliding attention window of {spec.max_position_embeddings} tokens; the file's context "
                   "length is that window (up to it the window attends to every earlier token, as the runtimes do; "
                   "they have no sliding window for longer contexts)")
    from .quantize import check_dense_finite
    try:
        check_dense_finite(ckpt)
    except ValueError as e:
        _fail(f"{model_dir}: {e}")
    if plan_path and preset:
        _fail("--plan and --preset both choose the actions: give one of them")
    if plan_path and (rotate or rotate_stage2 or rotate_block is not None):   # else silently the plan's own
        _fail("--rotate, --rotate-stage2 and --rotate-block say how a plan is made; a --plan file records its own "
              "rotation (its \"rotation\" field): give them to `wqedge plan`, or leave --plan out")
    if rotate and target == "llamacpp":   # before the transforms and the plan are built (minutes on a real model)
        _fail(pipeline.ROTATED_LLAMACPP)
    calib_text = _read_calib(calib) if calib else None   # read once: planning, fitting and the check use it
    source = "file" if calib_text is not None else "none"
    if calib_text is None and self_calib:
        from .calib import default_device
        from .calib_source import resolve_calibration
        from . import distributed
        try:   # the model samples where it is planned (a GPU when there is one); --distributed: rank 0 samples
            calib_text, source = distributed.on_writer(resolve_calibration, ckpt, None, True, say=click.echo,
                                                       device=default_device(device))
        except ValueError as e:
            _fail(f"self-calibration failed: {e}; give --calib FILE or --no-self-calib")
        if feedback is None:
            feedback = True            # presets and uniform plans are fitted with error feedback on it too
    if plan_path:
        try:
            plan = Plan.load(plan_path, spec, ckpt.fingerprint())
        except PlanError as e:
            _fail(str(e))
    else:
        if two_level is None and target != "gguf":   # the default is for our runtime; other targets map or refuse them
            two_level = False
        plan = _make_plan(ckpt, bits, group, allocator, method, calib_text, seed, device, protect, preset, rotate,
                          act_bits, prune, max_prune, stream_layers, rotate_stage2, resume_dir, prune_group,
                          two_level, target, compact_headers, rotate_block)
    if feedback_windows is not None:
        pipeline.set_feedback_windows(plan, feedback_windows)
    try:
        pipeline.set_distill_options(plan, distill_e2e, freeze_codes, distill_windows, distill_ce)
    except pipeline.ConvertError as e:
        _fail(str(e))
    kv = _kv_cache_spec(kv_bits, kv_rotation)
    if kv is not None:
        if target != "gguf" and kv_bits != "f32":
            _fail(f"--kv-bits is a setting of wqedge's runtime; the {target} target keeps its engine's own KV cache "
                  f"(llama.cpp: --cache-type-k/-v at run time)")
        plan.kv_cache = kv.to_plan()
    elif target == "gguf" and plan.kv_cache is None:   # neither the option nor the plan says: the default
        from .kv_format import DEFAULT_BITS, KVCacheSpec
        plan.kv_cache = KVCacheSpec(DEFAULT_BITS).to_plan()
    distill = _settle_distill(plan, distill, no_distill, calib_text, target, ckpt, device, stream_layers)
    _print_plan_summary(plan)
    from . import distributed
    if save_plan and distributed.is_writer():
        plan.save(save_plan)
        click.echo(f"plan written to {save_plan}")

    if output is None:
        output = pipeline.default_output(model_dir, plan, target)
    bars = []

    def progress(desc, total):
        bars.append(_progress(total, desc))
        return lambda *a: bars[-1].update(1)

    def written(path):
        for bar in bars:
            bar.close()
        elapsed = time.time() - t0              # the file is complete: reading it back below is a check
        f = WqGGUF(path)
        size = path.stat().st_size
        click.echo(f"wrote {path} ({size / 2**20:.2f} MiB) in {elapsed:.1f} s")
        click.echo(f"effective bits: {plan.effective_bits():.4f} planned, {f.measured_bits():.4f} measured in the file")
        # the check scores the file on text it was not fitted on: self-calibrated files on fresh samples
        _quality_check(ckpt, path, calib_text if source == "file" else None, check)

    try:
        res = pipeline.convert(ckpt, plan, output, target, calib_text, feedback, device, say=click.echo,
                               progress=progress, on_gguf=written, onnx_variant=onnx_variant,
                               onnx_lowering=onnx_lowering, distill=distill, head=head,
                               stream_layers=stream_layers, resume_dir=resume_dir)
    except pipeline.ConvertError as e:
        _fail(str(e))
    finally:
        for bar in bars:
            bar.close()
    if "rank" in res.details:     # --distributed: another rank than 0, which wrote nothing
        return
    if target == "onnx":
        info = res.details["onnx"]
        how = f"lowering {onnx_lowering}" if onnx_variant == "portable" else "native: needs libwqedge_ort"
        click.echo(f"wrote {info['path']} ({info['bytes'] / 2**20:.2f} MiB, {how})")
    elif target == "llamacpp":
        r = res.details["llamacpp"]
        hist = ", ".join(f"{t}: {n}" for t, n in r.type_histogram().items())
        click.echo(f"wrote {r.path} ({r.file_bytes / 2**20:.2f} MiB): {r.linear_bits:.4f} bits per weight over the "
                   f"decoder linears; tensor types {hist}")


def _settle_distill(plan, distill, no_distill, calib_text, target, ckpt, device, stream_layers):
    """--distill / --no-distill / the default at <= 2.5 bits, 3.5 on a GPU (pipeline.settle_distill), said on stdout."""
    if no_distill:
        if distill:
            _fail(f"--distill {distill} and --no-distill: give one of them")
        distill = 0
    from .pipeline import settle_distill
    return settle_distill(plan, distill, calib_text, target, ckpt, device, stream_layers, say=click.echo)


def _quality_check(ckpt, path, calib_text, check) -> None:
    from .quality import MAX_PARAMS_DEFAULT, check_quality
    if check is None:
        check = ckpt.n_params <= MAX_PARAMS_DEFAULT
        if not check:
            click.echo(f"quality check skipped: {ckpt.n_params / 1e9:.1f} B parameters (it holds two float32 copies; "
                       "--check forces it)")
            return
    if not check:
        return
    click.echo("checking the written model against the original…")
    rep = check_quality(ckpt, path, calib_text)
    click.echo(rep.summary())
    if rep.is_bad:
        click.secho(f"WARNING: {path} is far from the original model (perplexity x{rep.ppl_ratio:.2f}, KL {rep.kl:.3f} "
                    "nats/token): it may be unusable. Give calibration text (--calib), a larger --bits, or a wider "
                    "--preset (q4, q8).", fg="red", bold=True, err=True)


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Plan JSON to write.")
@plan_options
@_kv_bits_option("Recorded in the plan (field kv_cache), so `wqedge convert --plan` writes it into the file unless "
                 "its own --kv-bits says otherwise. Default: nothing recorded (convert then writes its default, f16).")
@_kv_rotation_option("Default: hadamard; needs --kv-bits 8 or 4, recorded beside it.")
@distributed_option
def plan(model_dir, output, bits, group, allocator, method, calib, protect, preset, seed, device, distill, no_distill,
         distill_e2e, freeze_codes, distill_windows, distill_ce, rotate, rotate_stage2, rotate_block, prune, max_prune, two_level, compact_headers, prune_group, feedback_windows, stream_layers, resume_dir,
         act_bits, kv_bits, kv_rotation):
    """Choose an action for every column chunk of MODEL_DIR under the bit budget and save the plan (JSON),
    with a text report (per-layer bits, action histogram) and a PNG heatmap beside it.

    Convert it later with `wqedge convert MODEL_DIR --plan PLAN.json --calib FILE`.
    """
    from .report import text_report, write_report

    kv = _kv_cache_spec(kv_bits, kv_rotation)   # (refused before any planning work)
    ckpt = _open_checkpoint(model_dir)
    calib_text = _read_calib(calib) if calib else None
    p = _make_plan(ckpt, bits, group, allocator, method, calib_text, seed, device, protect, preset, rotate, act_bits,
                   prune, max_prune, stream_layers, rotate_stage2, resume_dir, prune_group, two_level,
                   compact_headers=compact_headers, rotate_block=rotate_block)
    if kv is not None:
        p.kv_cache = kv.to_plan()
    if feedback_windows is not None:
        from .pipeline import set_feedback_windows
        set_feedback_windows(p, feedback_windows)
    from .pipeline import ConvertError, record_distill, set_distill_options
    try:
        set_distill_options(p, distill_e2e, freeze_codes, distill_windows, distill_ce)
    except ConvertError as e:
        _fail(str(e))
    distill = _settle_distill(p, distill, no_distill, calib_text, "gguf", ckpt, device, stream_layers)
    if distill is not None:
        try:
            record_distill(p, distill)
        except ConvertError as e:
            _fail(str(e))
    click.echo(text_report(p))
    from . import distributed
    if not distributed.is_writer():      # --distributed: rank 0 writes the plan
        return
    p.save(output)
    txt, png = write_report(p, Path(output).with_suffix(""))
    click.echo(f"plan written to {output}; report {txt}, heatmap {png} (layers x chunks, coloured by bits)")


@main.command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False))
def inspect(gguf_file):
    """Print the per-linear table of a wqedge GGUF: shape, stored bits per weight, chunks per action (a column for
    each block kind the file holds); then the output head, how the chunks were fitted (error feedback, light
    distillation), transforms and KV cache."""
    from .blocks import ACTION_NAMES
    from .kv_format import KVCacheSpec
    from .runtime.gguf_reader import FormatError, WqGGUF
    try:
        f = WqGGUF(gguf_file)
        rows = f.layer_table()
        f.kv_cache  # noqa: B018  (an unknown KV cache value is a FormatError, reported here)
    except FormatError as e:
        _fail(str(e))
    s = f.spec
    click.echo(f"{gguf_file}: {s.n_layers} layers, hidden {s.hidden_size}, heads {s.n_heads}/{s.n_kv_heads}, "
               f"ffn {s.intermediate_size}, vocab {s.vocab_size}, group size {f.group_size}")
    if s.uneven:   # a pruned model: the figures above are the largest over the layers
        click.echo("pruned, per layer (ffn, heads/kv heads): " + ", ".join(
            f"{i}: {s.ff(i)}, {s.heads(i)}/{s.kv_heads(i)}" for i in range(s.n_layers)))
    # one column per kind the file holds, in the kinds' order (17 kinds exist; a file uses a few)
    kinds = [a for a in ACTION_NAMES if any(r["actions"].get(a, 0) for r in rows)]
    header = f"{'tensor':28s} {'shape':>13s} {'bits':>6s}  " + " ".join(f"{a:>8s}" for a in kinds) + "  protected"
    click.echo(header)
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        counts = " ".join(f"{r['actions'].get(a, 0):8d}" for a in kinds)
        click.echo(f"{r['name']:28s} {shape:>13s} {r['bits']:6.3f}  {counts}  {r['protected']:9d}")
    click.echo(f"effective bits: {f.measured_bits():.4f} measured ({f.effective_bits:.4f} recorded)")
    click.echo(f"output head: {f.head_tensor} ({'tied to the embeddings, ' if s.tie_word_embeddings else ''}"
               f"{f.head_kind}; not counted in the effective bits)")
    import json

    from .report import fit_lines
    try:   # how the chunks were fitted (the file's plan; files without one, or with an unreadable one, say nothing)
        lines = fit_lines(json.loads(f.plan_json or "{}").get("meta") or {})
    except (ValueError, TypeError, AttributeError, KeyError):
        lines = []
    for line in lines:
        click.echo(line)
    if f.format_version >= 2:   # RUQuant (docs/format.md "Rotations")
        t = f.transforms()
        smooth = sum(st.smooth is not None for st in t.values())
        refl = sum(bool(st.householder.any()) for st in t.values())
        first = next(iter(t.values()), None)
        from .rotation_format import is_identity
        online = sum(not is_identity(st) for st in t.values())
        skipped = "" if online == len(t) else ", the rest skipped"
        what = (f"{f.rotation}, {len(t)} transforms (4 per layer: q/k/v, o, gate/up, down; {online} not the "
                f"identity{skipped}), block "
                f"{first.r1.shape[0]}, {'int8 matrices with row scales' if first.integer else 'float32 matrices'}, "
                f"{refl} with a Householder reflection, {smooth} smoothed" if t else "none")
        click.echo(f"format version {f.format_version}: activation bits {f.act_bits}; input transforms: {what}")
    kv = f.kv_cache
    heads = [s.kv_heads(i) for i in range(s.n_layers)]
    s4k, f4k = kv.cache_bytes(4096, heads, s.head_dim), KVCacheSpec().cache_bytes(4096, heads, s.head_dim)
    label = ("float32" if kv.bits is None else "fp16 values (no rotation)" if kv.bits == 16
             else f"{kv.bits}-bit, rotation {kv.rotation}")
    click.echo(f"KV cache (runtime default): {label}"
               f"; {s4k / 2**20:.1f} MiB at 4096 tokens" + ("" if kv.bits is None else f" (float32: {f4k / 2**20:.1f} MiB)"))


def _check_window(ctx: int, context_length: int) -> None:
    """Windows longer than the model's context would score positions it was never meant to see (a Mistral file's
    context is its sliding window: wqedge.checkpoint.parse_config)."""
    if ctx > context_length:
        _fail(f"--ctx {ctx} is longer than the model's context length {context_length}: give --ctx "
              f"{context_length} or less")


@main.command(name="eval")
@click.argument("model", type=click.Path(exists=True))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text (UTF-8).")
@click.option("--chunks", type=click.IntRange(min=0), default=32, show_default=True,
              help="Number of --ctx-token windows to score (0 = all).")
@click.option("--ctx", type=click.IntRange(2, 1 << 20), default=512, show_default=True,
              help="Window length in tokens.")
@click.option("--backend", type=click.Choice(["torch", "cpp"]), default="torch", show_default=True,
              help="'torch': the PyTorch reference (dequantized weights through transformers); "
                   "'cpp': our C++ runtime (GGUF only).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False),
              help="Hugging Face folder whose tokenizer to use for a GGUF with the torch backend "
                   "(default: the GGUF's own vocabulary).")
@click.option("--threads", type=click.IntRange(0, 4096), default=0,
              help="Threads for the cpp backend (0 = all cores).")
@click.option("--batch", type=click.IntRange(1, 4096), default=4, show_default=True,
              help="Windows per forward pass (torch).")
@_kv_bits_option("Default: the file's setting (float32 when it has none). With --backend torch the reference "
                 "applies the same quantization.")
@_kv_rotation_option("Default: the file's setting (hadamard when it has none); with --backend torch it needs "
                     "--kv-bits 8 or 4.")
@click.option("--kl-base", "kl_base", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write this model's log-probabilities at the scored positions to FILE (.npz, float16: "
                   "32 windows of 512 with a 32k vocabulary take 0.5 GB), the base that later runs compare against "
                   "with --kl. Run it on the unquantized model.")
@click.option("--kl", "kl_file", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="Also report the KL divergence KL(base || this model) per scored token against a --kl-base FILE "
                   "(same text, tokenizer, --ctx and --chunks; checked), and how often both models' most likely "
                   "next token agree: how faithful a quantized model is, which perplexity alone does not say.")
def eval_cmd(model, text_file, chunks, ctx, backend, tokenizer_dir, threads, batch, kv_bits, kv_rotation, kl_base,
             kl_file):
    """Perplexity of MODEL (a Hugging Face folder or a wqedge GGUF) on a text, as llama.cpp defines it.

    The whole text is tokenized with a leading BOS and cut into non-overlapping windows of --ctx tokens;
    each window's first token is replaced by BOS and only the second half of each window is scored.
    With --kl-base / --kl, also the KL divergence to a base model on the same positions (as llama.cpp's
    perplexity tool's --kl-divergence-base / --kl-divergence).
    """
    from .perplexity import perplexity

    if kl_base and kl_file:
        _fail("--kl-base writes a base and --kl compares with one; give one of them")

    path = Path(model)
    text = _read_text(text_file)
    if backend == "cpp":
        if path.is_dir():
            _fail("the cpp backend runs wqedge GGUF files; convert the model first (wqedge convert)")
        from .runtime import native
        try:
            m = native.Model(path)
        except native.NativeError as e:
            _fail(str(e))
        _check_window(ctx, m.info["n_ctx_train"])
        fn = native.NativeEvaluator(m, n_ctx=ctx, n_threads=threads, kv_bits=kv_bits, kv_rotation=kv_rotation)
        tokens = [m.bos_id] + list(m.tokenize(text, add_bos=False))
        bos = m.bos_id
        batch = 1
    else:
        import torch

        from .reference import load_reference, logits_fn
        kv = _kv_cache_spec(kv_bits, kv_rotation, "with --backend torch ")
        if path.is_dir():
            ckpt = _open_checkpoint(path)
            net = ckpt.load_hf_model(torch.float32)
            if kv is not None:
                from .kvquant import apply_kv_cache
                apply_kv_cache(net, kv)
            tok_dir = path
        else:
            from .runtime.gguf_reader import FormatError
            try:
                net = load_reference(path, kv)
            except FormatError as e:
                _fail(str(e))
            tok_dir = tokenizer_dir
        _check_window(ctx, net.config.max_position_embeddings)
        bos = net.config.bos_token_id
        fn = logits_fn(net)
        tokens = _tokenize(text, tok_dir, None if tok_dir else path)
    n_windows = None if chunks == 0 else chunks
    total = min(len(tokens) // ctx, n_windows or 1 << 30)
    from . import kl
    recorder = comparer = None
    try:
        if kl_base:
            fn = recorder = kl.KLBaseRecorder(fn)
        elif kl_file:
            from .perplexity import make_windows
            fn = comparer = kl.KLComparer(fn, kl_file)
            comparer.check(make_windows(tokens, bos, ctx, n_windows))
    except ValueError as e:        # KLError, and make_windows' own (a text shorter than one window)
        _fail(str(e))
    from tqdm import tqdm
    with tqdm(total=total, desc="evaluating", unit="window", leave=False, disable=None, file=sys.stderr) as bar:
        try:
            r = perplexity(fn, tokens, bos, ctx, n_windows, batch, progress=bar.update)
        except ValueError as e:
            _fail(str(e))
    if not math.isfinite(r.perplexity):
        _fail(f"perplexity is {r.perplexity}: the model produced non-finite logits (a damaged file or checkpoint?)")
    pm = "" if r.uncertainty is None else f" ± {r.uncertainty:.4f}"
    click.echo(f"perplexity: {r.perplexity:.4f}{pm} over {r.n_windows} windows of {ctx} ({r.n_scored} tokens scored); "
               f"every position: {r.perplexity_all:.4f} [{backend}]")
    if recorder is not None:
        try:
            click.echo(f"KL base written: {recorder.save(kl_base)} (compare other models with --kl)")
        except kl.KLError as e:
            _fail(str(e))
    if comparer is not None:
        click.echo(str(comparer.result()))


def _tokenize(text: str, tok_dir, gguf_path) -> list[int]:
    """Token ids with a leading BOS, from a Hugging Face tokenizer folder or a GGUF's vocabulary."""
    from transformers import AutoTokenizer
    if tok_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        from .runtime.gguf_check import check_gguf
        check_gguf(gguf_path)  # transformers reads it with gguf.GGUFReader, which trusts every count
        tok = AutoTokenizer.from_pretrained(str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id] + list(ids)


@main.command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", "-p", default="Once upon a time", show_default=True, help="Text to continue.")
@click.option("--max-tokens", "-n", type=click.IntRange(1, 1 << 24), default=64, show_default=True,
              help="Tokens to generate (prompt + these must fit the model's context).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keep the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same text).")
@click.option("--threads", type=click.IntRange(0, 4096), default=0, help="Threads (0 = all cores).")
@click.option("--chat", is_flag=True, help="Chat: read your messages line by line (Ctrl-D ends), apply the model's "
              "chat template (stored from the checkpoint as tokenizer.chat_template) and answer each.")
@click.option("--system", default=None, help="With --chat: a system message to start the conversation.")
@click.option("--ctx", "chat_ctx", type=click.IntRange(0, 1 << 24), default=0,
              help="With --chat: the conversation's context in tokens, its KV cache allocated up front; the oldest "
                   "exchanges are dropped when a turn would not fit. 0 (default): the model's context length, at most "
                   "4096. (Without --chat the context is the prompt plus --max-tokens.)")
@click.option("--act", type=click.Choice(["q8", "f32"]), default=None,
              help="Activations of decode and prompt steps: 'q8' (int8 per 32 columns, integer dot products; the default) or 'f32' "
                   "(float, the reference path, logits within ~1e-5 of PyTorch). Default: WQEDGE_ACT, else q8.")
@_kv_bits_option("Default: the file's setting (float32 when it has none).")
@_kv_rotation_option("Default: the file's setting (hadamard when it has none).")
def run(gguf_file, prompt, max_tokens, temperature, top_p, top_k, seed, threads, chat, system, chat_ctx, act, kv_bits,
        kv_rotation):
    """Generate text from GGUF_FILE with the C++ runtime, streaming it to the terminal."""
    from .runtime import native
    if act:
        native.set_activations(act)
    if chat:
        _chat(gguf_file, system, max_tokens, threads, dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                                             seed=seed), kv_bits, kv_rotation, chat_ctx)
        return
    if chat_ctx:
        _fail("--ctx is an option of --chat (without it the context is the prompt plus --max-tokens)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        _fail("the prompt is not valid UTF-8 text")
    if not (math.isfinite(temperature) and temperature >= 0):
        _fail(f"--temperature must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        _fail(f"--top-p must lie in (0, 1], got {top_p}")
    started = False

    def stream(piece):
        nonlocal started
        if not started:
            click.echo(prompt, nl=False)
            started = True
        click.echo(piece, nl=False)
    try:
        native.run(gguf_file, prompt, max_tokens, temperature, top_p, top_k, seed, threads, stream=stream,
                   kv_bits=kv_bits, kv_rotation=kv_rotation)
    except (native.NativeError, ValueError) as e:
        if started:
            click.echo()
        _fail(str(e))
    if not started:
        click.echo(prompt, nl=False)
    click.echo()


def _chat(gguf_file, system, max_tokens, threads, sampling, kv_bits=None, kv_rotation=None, n_ctx=0) -> None:
    from .runtime import native
    from .runtime.chat import ChatError, ChatSession
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        model = native.Model(gguf_file)
        session = ChatSession(model, system=system, n_threads=threads, max_new_tokens=max_tokens, kv_bits=kv_bits,
                              kv_rotation=kv_rotation, n_ctx=n_ctx, **sampling)
    except (native.NativeError, ChatError) as e:
        _fail(str(e))
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("chat with the model; an empty line is skipped, Ctrl-D ends", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        try:
            session.reply(line, stream=lambda piece: click.echo(piece, nl=False))
        except (native.NativeError, ChatError, ValueError) as e:
            click.echo()
            click.secho(f"error: {e}", fg="red", err=True)
            continue
        click.echo()
    session.close()
    model.close()


# ---------------------------------------------------------------- wqedge bench

def _default_fixture(*parts) -> str | None:
    """A path under the shared fixtures (../shared/fixtures beside the repository or the current folder)."""
    import os
    roots = [os.environ.get("WQEDGE_FIXTURES"), Path(__file__).resolve().parents[2] / "shared" / "fixtures",
             Path.cwd().parent / "shared" / "fixtures", Path.cwd() / "shared" / "fixtures"]
    for r in roots:
        if r and (Path(r).joinpath(*parts)).exists():
            return str(Path(r).joinpath(*parts))
    return None


def _bench_help() -> str:
    from .bench.report import COLUMNS
    from .bench.rows import ROWS, SETS
    rows = "\n".join(f"  {k:14s} {r.recipe}" for k, r in ROWS.items())
    every = "every row but the wq-at-* and wq-2l-at-* rows (set 'matched')"
    sets = "\n".join(f"  {k:9s} {', '.join(v) if k != 'all' else every}" for k, v in SETS.items())
    cols = "\n".join(f"  {k}: {v}" for k, v in COLUMNS.items())
    return (
        "Benchmark our C++ runtime against llama.cpp and ONNX Runtime in one run, on this machine, with the same "
        "thread count: decode and prefill tokens/s, peak resident memory, file size, effective bits, perplexity, "
        "and decode speed as a fraction of the memory-bandwidth roofline. Writes OUT.md and OUT.json.\n\n"
        "Models: --model (default: the fixture llama-s) for quality and speed; --speed-model, a random-weight "
        "checkpoint of a real 1B shape built on the spot (no download), for speed only. Each backend runs in its "
        "own process (so peak RSS is its own), round-robin over --rounds. Plans and files are cached in "
        "--cache-dir, so a rerun only measures (a first full run spends ~15-20 min making files on 2 cores). "
        "Progress goes to stderr; targets are reported, never asserted.\n\n"
        f"\b\nRows (--rows takes a comma list of rows and sets):\n{rows}\n\n"
        f"\b\nSets:\n{sets}\n\n\b\nColumns:\n{cols}\n")


@main.command(name="bench", help=_bench_help())
@click.option("--rows", "rows_text", default=None, help="Rows and sets, comma-separated (default 'all'; --quick: "
              "'quick').")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Quality model (HF LLaMA folder). Default: ../shared/fixtures/llama-s.")
@click.option("--speed-model", type=click.Choice(["none", "tinyllama-1.1b", "llama-3.2-1b"]), default=None,
              help="Random-weight speed model shape (default tinyllama-1.1b; --quick: none).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Perplexity text (default: the fixtures' text/eval.txt).")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text (default: the fixtures' text/calib.txt).")
@click.option("--calib/--no-calib", default=None,
              help="Use the calibration text: greedy plans on it, NeUQI weights and error feedback for our files, "
                   "importance matrix for llama.cpp's (default; --quick: off). --no-calib: weight-only plans and "
                   "fits, no imatrix (the IQ types that need one are then reported as not available).")
@click.option("--self-calib", is_flag=True, default=False,
              help="Each tool as a user without calibration text runs it: our files calibrate on text the model "
                   "samples itself (what `wqedge convert` does with no --calib), llama.cpp's get no importance matrix "
                   "(the IQ types that need one are reported as not available). Implies --no-calib's llama.cpp side; "
                   "not with --calib.")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for every backend.")
@click.option("--prefill", type=int, default=None,
              help="Prompt tokens timed in one batch (default 128; quick 32). The decode steps follow that prompt, so "
                   "this is also the KV cache depth decode is timed at (llama-bench's -d): e.g. 2048 for chat-length "
                   "contexts.")
@click.option("--decode", type=int, default=None, help="Single-token decode steps timed (default 64; quick 16).")
@click.option("--reps", type=int, default=None, help="Repetitions per process (default 2; quick 1).")
@click.option("--rounds", type=int, default=None, help="Round-robin passes over all rows (default 2; quick 1).")
@click.option("--ppl-windows", type=int, default=None,
              help="Perplexity windows of --ppl-ctx tokens, 0 = none (default 8; quick 2).")
@click.option("--ppl-ctx", type=int, default=512, show_default=True, help="Perplexity window length.")
@click.option("--out", default="bench/results/bench", show_default=True, help="Report path without suffix.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where plans, files and the speed model are kept (default ~/.cache/wqedge/bench).")
@click.option("--rebuild", is_flag=True, help="Remake cached plans and files.")
@click.option("--quick", is_flag=True, help="Smoke run: rows 'quick', no speed model, small token counts.")
@click.option("--note", default="", help="A line for the report header (e.g. which subset was run and why).")
@click.option("--device", default=None, help="torch device for planning (default: cuda if available, else cpu).")
def bench_cmd(rows_text, model_dir, speed_model, eval_text, calib_text, calib, self_calib, threads, prefill, decode, reps,
              rounds, ppl_windows, ppl_ctx, out, cache_dir, rebuild, quick, note, device):
    from .bench import BenchOptions, parse_rows, run_bench
    from .bench.files import DEFAULT_CACHE
    from .bench.report import markdown, write

    try:
        rows = parse_rows(rows_text or ("quick" if quick else "all"))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rows") from None
    q = quick

    def pick(v, full, small):
        return v if v is not None else (small if q else full)

    if self_calib and (calib or calib_text is not None):
        _fail("--self-calib calibrates our side on the model's own samples and gives llama.cpp no importance matrix: "
              "it does not go with --calib / --calib-text")
    calib = False if self_calib else pick(calib, True, calib_text is not None)  # --quick: only with --calib-text
    model_dir = model_dir or _default_fixture("llama-s")
    eval_text = eval_text or _default_fixture("text", "eval.txt")
    calib_text = (calib_text or _default_fixture("text", "calib.txt")) if calib else None
    if model_dir is None or eval_text is None:
        _fail("no quality model/eval text: give --model and --eval-text (the default is ../shared/fixtures)")
    if calib and calib_text is None:
        _fail("no calibration text found: give --calib-text or --no-calib")
    speed = pick(speed_model, "tinyllama-1.1b", "none")
    if threads < 1 or ppl_ctx < 4:
        _fail("--threads must be >= 1 and --ppl-ctx >= 4")
    o = BenchOptions(model=str(model_dir), eval_text=str(eval_text), calib_text=calib_text, rows=rows,
                     speed_model=None if speed == "none" else speed, threads=threads, prefill=pick(prefill, 128, 32),
                     decode=pick(decode, 64, 16), reps=pick(reps, 2, 1), rounds=pick(rounds, 2, 1),
                     ppl_windows=pick(ppl_windows, 8, 2), ppl_ctx=ppl_ctx, cache_dir=str(cache_dir or DEFAULT_CACHE),
                     rebuild=rebuild, device=device, subset_note=note, self_calib=self_calib)
    if min(o.prefill, o.decode, o.reps, o.rounds) < 1 or o.ppl_windows < 0:
        _fail("--prefill, --decode, --reps and --rounds must be >= 1, --ppl-windows >= 0")
    try:
        rep = run_bench(o)
    except (OSError, ValueError) as e:
        _fail(f"bench failed: {e}")
    md, js = write(rep, Path(out))
    click.echo(markdown(rep))
    click.echo(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
