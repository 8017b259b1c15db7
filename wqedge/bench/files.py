"""Making (and caching) the file of every row: our GGUFs, llama.cpp GGUFs, ONNX models, and the random
speed-model checkpoint.

Planning the greedy mixed plans takes ~100 s each on 2 cores and error-feedback conversion about as long,
so everything is cached under `cache_dir/<model fingerprint>-<options>/` (plans as JSON, files as written);
a rerun only measures. Bump CACHE_VERSION when a converter's output changes meaning.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from .rows import ROWS

CACHE_VERSION = 2   # 2: plans offer the compact-header kinds (q4c .. q1c) by default
# llama.cpp rows' files: 2 = embeddings and head as llama-quantize makes them (preset_embedding_types; plan rows: the
# head as our files store it), where version 1 kept both F16, so llama.cpp read twice the head bytes per token.
LLAMACPP_FILES_VERSION = 2
DEFAULT_CACHE = Path(os.environ.get("WQEDGE_BENCH_CACHE", Path.home() / ".cache" / "wqedge" / "bench"))
# Stock types for the speed model's plan projection: the IQ quantizers take minutes on a 1B model.
NON_IQ_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")


class NotAvailable(Exception):
    """This row cannot be made here (missing optional backend, type needing an importance matrix...)."""


def speed_checkpoint(shape: str, cache_dir: Path, say: Callable[[str], None]) -> Path:
    """The random-weight checkpoint of `shape` (wqedge.tinymodel.SPEED_SHAPES), built once into the cache."""
    from ..tinymodel import build_speed_model
    out = Path(cache_dir) / f"speed-{shape}-v{CACHE_VERSION}"
    if not (out / "config.json").exists():
        say(f"building the random-weight {shape} checkpoint in {out} (fp16, ~2.5 GB; once)")
        build_speed_model(out, shape)
    return out


def resample_plan(plan, spec, fingerprint: str, method: str = "minmax"):
    """`plan` (made for another model) carried onto `spec`: each linear takes the actions of the same kind of
    linear at the same relative depth, its chunks sampled at the same relative column position. The mix of
    actions, and so the kernels run, is the source plan's; the effective bits come out close to its."""
    from ..plan import Plan
    from ..units import chunk_bounds
    src = {}
    n_src_layers = 1 + max(int(t.name.split(".")[2]) for t in plan.tensors)
    for t in plan.tensors:
        src[(int(t.name.split(".")[2]), t.name.split(".", 3)[3])] = t.actions
    L = spec.n_layers
    actions = {}
    for lin in spec.linears():
        i = int(lin.hf_name.split(".")[2])
        j = round(i * (n_src_layers - 1) / max(1, L - 1))
        acts = src[(j, lin.hf_name.split(".", 3)[3])]
        n = len(chunk_bounds(lin.in_features, plan.group_size))
        actions[lin.hf_name] = [acts[c * len(acts) // n] for c in range(n)]
    p = Plan.from_actions(spec.linears(), plan.group_size, plan.budget_bits, f"{plan.allocator} (resampled)",
                          actions, method, model_fingerprint=fingerprint)
    p.budget_bits = max(p.budget_bits, round(p.effective_bits() + 1e-6, 6))
    return p


class ModelFiles:
    """The files of one checkpoint. `calib_text` None: min-max fits, no importance matrix, no planning
    statistics (the speed model); `plan_source` (a ModelFiles) gives the mixed plans to resample instead of
    planning this model; imatrix False: our files calibrate on `calib_text` but llama.cpp's get no importance
    matrix (`wqedge bench --self-calib`: each tool as a user without calibration text runs it)."""

    def __init__(self, model_dir, cache_dir, calib_text: str | None, say: Callable[[str], None],
                 plan_source: ModelFiles | None = None, device=None, rebuild: bool = False, speed_only=False,
                 imatrix: bool = True):
        from ..checkpoint import LlamaCheckpoint
        self.ckpt = LlamaCheckpoint.open(model_dir)
        self.spec = self.ckpt.spec
        self.fingerprint = self.ckpt.fingerprint()
        self.calib_text = calib_text
        self.say = say
        self.plan_source = plan_source
        self.device = device
        self.speed_only = speed_only
        self.imatrix = imatrix
        tag = hashlib.sha256(calib_text.encode()).hexdigest()[:10] if calib_text else "nocalib"
        if calib_text and not imatrix:
            tag += "-noimatrix"
        self.dir = Path(cache_dir) / f"{self.fingerprint[:16]}-{tag}-v{CACHE_VERSION}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rebuild = rebuild
        self._stats = None
        self._plans: dict[float, object] = {}
        self.notes: dict[str, str] = {}   # row key -> recipe detail (type histogram, plan summary)

    # ------------------------------------------------------------ shared inputs
    def _fresh(self, path: Path) -> bool:
        return path.exists() and not self.rebuild

    def stats(self):
        """diag(XᵀX) of every decoder linear's input on the calibration text (cached), or None without one."""
        if self.calib_text is None:
            return None
        if self._stats is None:
            import torch
            p = self.dir / "calib_stats.pt"
            if self._fresh(p):
                self._stats = torch.load(p)
            else:
                from ..calib import collect_stats
                self.say("calibration statistics (diag XᵀX) for the NeUQI fits and llama.cpp's importance matrix…")
                self._stats = collect_stats(self.ckpt, self.calib_text, device=self.device)
                torch.save(self._stats, str(p) + ".tmp")
                os.replace(str(p) + ".tmp", p)
        return self._stats

    def plan(self, bits: float, two_level: bool = False):
        """The mixed plan at `bits`: greedy make_plan on this model (cached), or the plan source's resampled.
        two_level: the two-level kinds offered too, as `wqedge convert` offers them (pipeline.offered_actions)."""
        if (bits, two_level) in self._plans:
            return self._plans[bits, two_level]
        from ..plan import Plan
        if self.plan_source is not None:
            p = resample_plan(self.plan_source.plan(bits, two_level), self.spec, self.fingerprint)
        else:
            path = self.dir / f"plan-greedy{'-2l2' if two_level else ''}-{bits:g}.json"   # (-2l: q2s at any bits)
            if self._fresh(path):
                p = Plan.load(path, self.spec, self.fingerprint)
            else:
                from ..alloc.planner import make_plan
                self.say(f"planning greedy at {bits:g} bits (~100 s on 2 cores; cached afterwards)…")
                from ..pipeline import offered_actions
                p = make_plan(self.ckpt, bits, allocator="greedy", calib_text=self.calib_text, device=self.device,
                              progress=self.say, **({"actions": offered_actions(bits, True)} if two_level else {}))
                p.save(str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
        self._plans[bits, two_level] = p
        return p

    # ------------------------------------------------------------ files
    def file(self, key: str) -> Path:
        """The file row `key` runs (made now if not cached). NotAvailable when it cannot be made here."""
        row = ROWS[key]
        if row.backend == "wqedge":
            return self._wq(row.file_key)
        if row.backend == "llamacpp":
            return self._llamacpp(key)
        return self._onnx(key.split("-", 1)[1])

    def _wq(self, key: str, head: str | None = None) -> Path:
        """Our file `key` with the output head stored as `head` (pipeline.head_kind: the default when None)."""
        import dataclasses

        from ..kv_format import DEFAULT_BITS, KVCacheSpec
        from ..pipeline import fit_mode, head_kind, write_gguf
        method = "neuqi" if self.calib_text else "minmax"
        head = head_kind("gguf", head)   # files made before the quantized head (F16) keep their names
        kv = KVCacheSpec(DEFAULT_BITS)   # the KV cache `wqedge convert` writes by default (in the name: files made
        kv_tag = "" if kv.bits is None else f"-kv{kv.label()}"   # before it, with a float32 cache, are not reused)
        path = self.dir / (f"{key}-{method}{kv_tag}.gguf" if head == "fp16" else f"{key}-{method}-head{head}{kv_tag}.gguf")
        if key == "wq-q4":
            from ..alloc.uniform import model_bits, uniform_plan
            lin = self.spec.linears()   # q4 everywhere, whatever ragged chunks cost (4.25 b at K % 128 == 0)
            plan = uniform_plan(lin, 128, model_bits(lin, 128, "q4"), method, action="q4",
                                model_fingerprint=self.fingerprint)
        elif ROWS[key].matched:
            plan = self.plan(self.matched_bits(ROWS[key].matched), two_level=ROWS[key].two_level)
        else:
            plan = self.plan(float(key.split("-", 1)[1]))
        mode = fit_mode(plan, self.calib_text)
        if key == "wq-q4":
            self.notes[key] = f"uniform q4, G=128, {method}" + (" weighted by diag(XᵀX)" if mode == "stats" else "")
        else:
            hist = ", ".join(f"{a} {n}" for a, n in plan.action_histogram().items())
            self.notes[key] = f"{plan.allocator} plan {plan.effective_bits():.3f} b ({hist})" + (
                ", error feedback" if mode == "feedback" else f", {method}")
        self.notes[key] += f"; KV cache {kv.label()}"
        if self._fresh(path):
            return path
        self.say(f"converting {key} → {path.name}…")
        plan = dataclasses.replace(plan, kv_cache=kv.to_plan())   # (a copy: the plans are shared with other rows)
        return write_gguf(self.ckpt, plan, path, self.calib_text, device=self.device,
                          stats=self.stats() if mode == "stats" else None, head=head)

    def matched_bits(self, llamacpp_type: str) -> float:
        """The effective bits of llama.cpp's `llamacpp_type` file on this model (decoder linears, measured from
        its tensor bytes, as the bits/w column), rounded down to 1e-4: the budget of our wq-at-<type> plan, so
        that ours never has more bits than the file it is compared with."""
        import math

        from ..runtime.llamacpp_eval import measured_linear_bits
        return math.floor(measured_linear_bits(self._llamacpp(f"lcp-{llamacpp_type}")) * 1e4) / 1e4

    def _llamacpp(self, key: str) -> Path:
        try:
            from ..alloc.llamacpp_types import DEFAULT_TYPES, budget_types, preset_embedding_types, preset_types
            from ..converters.llamacpp import available_types, export_llamacpp, requires_imatrix
            available_types(("Q4_0",))
        except (ImportError, RuntimeError) as e:
            raise NotAvailable(f"llama-cpp-python is not usable: {e}") from None
        what = key.split("-", 1)[1]
        path = self.dir / f"{key}.v{LLAMACPP_FILES_VERSION}.gguf"

        def imatrix():   # llama.cpp's importance matrix: diag(XᵀX) of the calibration text (computed when needed)
            return self.stats() if self.imatrix else None
        kw: dict = {}
        if what.startswith("plan-"):
            plan = self.plan(float(what.split("-", 1)[1]))
            try:
                kw = {"tensor_types": budget_types(self.spec, plan.effective_bits(), plan, available_types(
                    NON_IQ_TYPES if self.speed_only else DEFAULT_TYPES, imatrix=imatrix() is not None))}
            except ValueError as e:   # the projection: no stock types fit this model's rows at these bits
                raise NotAvailable(str(e)) from None
            from ..pipeline import llamacpp_head_types
            kw.update(llamacpp_head_types(self.spec))   # the head as `convert --target llamacpp` stores it
        elif what.startswith("IQ"):
            if requires_imatrix(what) and imatrix() is None:
                raise NotAvailable(f"{what} needs an importance matrix (run with --calib"
                                   f"{'' if self.imatrix else ', not --self-calib'})")
            if what not in available_types((what,), imatrix=True):
                raise NotAvailable(f"the installed llama.cpp cannot quantize {what}")
            kw = {"tensor_types": lambda name, n, k: what}
        else:
            kw = {"tensor_types": preset_types(self.spec, what)}
        if not what.startswith("plan-"):
            kw["embed_type"], kw["output_type"] = preset_embedding_types(self.spec, what)
        if self._fresh(path):
            from ..runtime.llamacpp_eval import measured_linear_bits
            self.notes.setdefault(key, f"{measured_linear_bits(path):.3f} b")
            self._types_note(key, path)
            return path
        self.say(f"quantizing {key} with llama.cpp → {path.name}…")
        res = export_llamacpp(self.ckpt, path, imatrix=imatrix(), **kw)
        self._types_note(key, path)
        return res.path

    def _types_note(self, key: str, path: Path) -> None:
        from wqedge.runtime.gguf_check import open_reader
        h: dict[str, int] = {}
        for t in open_reader(path).tensors:
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
                h[t.tensor_type.name] = h.get(t.tensor_type.name, 0) + 1
        self.notes[key] = "tensor types " + ", ".join(f"{t} {n}" for t, n in sorted(h.items(), key=lambda x: -x[1])) + \
            "; KV cache f16 (llama.cpp's default)"

    def _onnx(self, variant: str) -> Path:
        try:
            from ..converters.onnx_export import export_onnx
        except ImportError as e:
            raise NotAvailable(f"ONNX export needs onnx: {e}") from None
        src = self._wq("wq-q4", head="fp16")   # as `convert --target onnx`: the ONNX graph keeps the head dense
        out_dir = self.dir / f"onnx-{variant}"
        path = out_dir / "model.onnx"
        self.notes[f"ort-{variant}"] = f"{variant} ONNX of wq-q4; KV cache float32 (past_key_values)"
        if self._fresh(path):
            return path
        out_dir.mkdir(exist_ok=True)
        self.say(f"exporting wq-q4 to ONNX ({variant})…")
        try:
            info = export_onnx(src, path, variant=variant)
        except (NotImplementedError, ImportError) as e:
            raise NotAvailable(str(e)) from None
        (out_dir / "export.json").write_text(json.dumps({k: v for k, v in info.items()
                                                         if isinstance(v, (str, int, float, bool))}, indent=1))
        return path
