"""The plan: one action (and quantizer method) per column chunk, with its exact bit cost.

A plan is what an allocator produces and what the converter lowers; it carries no weights.
The JSON schema is versioned and documented in docs/plan.md. Every figure here is computed
from the block traits table (wqedge.blocks), so the plan's effective bits equal what the
file will measure.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import blocks
from .fileio import atomic_output
from .pruning import Pruning, PruningError
from .spec import ModelSpec
from .units import Linear, check_group_size, chunk_bounds, parse_linear_name

PLAN_FORMAT = "wqedge-plan"
PLAN_VERSION = 4          # the newest version; a plan is written in the oldest version that expresses it
READ_VERSIONS = (1, 2, 3, 4)  # 2: structured pruning ("pruning"); 3: "rotation", "act_bits", "kv_cache" (issue 15);
#                               4: a rotation with "stage2" (learnt reflections; issue 15); docs/plan.md
ACT_BITS = (8, 6, 4)      # activation bits a plan may ask the runtime for (8: the int8 path every file has)
ROTATIONS = ("ruquant", "hadamard")  # rotation methods (wqedge.rotation, wqedge.residual_rotation)
METHODS = ("neuqi", "minmax")
BUDGET_TOLERANCE = 1e-9
MAX_PLAN_BYTES = 64 << 20  # a 70B plan is well under 1 MiB; anything larger is not a plan


class PlanError(ValueError):
    """A plan that cannot be used: malformed, for another model, or over its budget."""


@dataclass
class TensorPlan:
    """The actions of one linear's chunks, left to right."""
    name: str                 # Hugging Face weight name, e.g. model.layers.0.self_attn.q_proj.weight
    out_features: int
    in_features: int
    actions: list[str]
    methods: list[str]
    protected: list[list[int]] = field(default_factory=list)  # chunk-local column indices, per chunk

    def __post_init__(self):
        if not self.protected:
            self.protected = [[] for _ in self.actions]

    def widths(self, group_size: int) -> list[int]:
        return [e - s for s, e in chunk_bounds(self.in_features, group_size)]

    def bits(self, group_size: int) -> int:
        """Exact stored bits of this tensor."""
        return sum(blocks.chunk_bits(a, self.out_features, g, len(p))
                   for a, g, p in zip(self.actions, self.widths(group_size), self.protected))

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features


@dataclass
class Plan:
    group_size: int
    budget_bits: float
    allocator: str
    tensors: list[TensorPlan]
    model_name: str = ""
    model_fingerprint: str = ""
    meta: dict = field(default_factory=dict)   # allocator-specific report (free form, JSON-safe)
    pruning: Pruning | None = None             # removed structures; tensors then have their pruned shapes
    rotation: dict | None = None               # how the input transforms are built (version 3; wqedge.rotation)
    act_bits: int = 8                          # activation bits at run time (version 3 when not 8)
    kv_cache: dict | None = None               # the runtime's default KV cache (version 3; wqedge.kv_format)

    # ------------------------------------------------------------ figures
    def total_bits(self) -> int:
        return sum(t.bits(self.group_size) for t in self.tensors)

    def original_weights(self, t: TensorPlan) -> int:
        """Weights of tensor t in the unpruned model: pruned structures count as stored with 0 bits."""
        if self.pruning is None:
            return t.n_weights
        layer, proj = parse_linear_name(t.name)
        n, k = self.pruning.original_shape(layer, proj, (t.out_features, t.in_features))
        return n * k

    def n_weights(self) -> int:
        """Decoder linear weights of the original (unpruned) model: the denominator of effective bits."""
        return sum(self.original_weights(t) for t in self.tensors)

    def effective_bits(self) -> float:
        return self.total_bits() / self.n_weights()

    def layer_bits(self) -> dict[int, float]:
        """Effective bits per decoder layer (layer index parsed from the tensor name)."""
        acc: dict[int, list[int]] = {}
        for t in self.tensors:
            layer = int(t.name.split(".")[2])
            b, n = acc.setdefault(layer, [0, 0])
            acc[layer] = [b + t.bits(self.group_size), n + self.original_weights(t)]
        return {k: b / n for k, (b, n) in sorted(acc.items())}

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shape of the model this plan makes from a checkpoint of shape `spec` (pruned or as is)."""
        return spec if self.pruning is None else self.pruning.pruned_spec(spec)

    def prune_weight(self, name: str, w):
        """The part of linear `name`'s original weight [out, in] that the plan keeps (all of it unpruned)."""
        if self.pruning is None:
            return w
        layer, proj = parse_linear_name(name)
        return self.pruning.prune_weight(layer, proj, w)

    def unprune_weight(self, name: str, w, shape: tuple[int, int]):
        """A kept weight (torch) in the original `shape`, zero at pruned rows and columns."""
        if self.pruning is None:
            return w
        return self.pruning.unprune_weight(*parse_linear_name(name), w, shape)

    def kept_columns(self, name: str):
        """Original input columns that linear `name` keeps (numpy int64), or None when it keeps them all."""
        if self.pruning is None:
            return None
        return self.pruning.kept(*parse_linear_name(name))[1]

    def action_histogram(self) -> dict[str, int]:
        """Chunks per action, in the traits table's order."""
        c = Counter(a for t in self.tensors for a in t.actions)
        return {a: c[a] for a in blocks.ACTION_NAMES if c[a]}

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise PlanError(f"plan has no tensor {name!r}")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_actions(cls, linears: list[Linear], group_size: int, budget_bits: float, allocator: str,
                     actions: dict[str, list[str]], methods: dict[str, list[str]] | str = "neuqi",
                     protected: dict[str, list[list[int]]] | None = None, **kw) -> "Plan":
        tensors = []
        for lin in linears:
            acts = list(actions[lin.hf_name])
            meth = [methods] * len(acts) if isinstance(methods, str) else list(methods[lin.hf_name])
            prot = (protected or {}).get(lin.hf_name) or [[] for _ in acts]
            tensors.append(TensorPlan(lin.hf_name, lin.out_features, lin.in_features, acts, meth, prot))
        plan = cls(group_size, float(budget_bits), allocator, tensors, **kw)
        plan.validate()
        return plan

    # ------------------------------------------------------------ validation
    def validate(self, spec: ModelSpec | None = None, fingerprint: str | None = None) -> "Plan":
        """Raise PlanError on anything the converter could not lower faithfully."""
        try:
            check_group_size(self.group_size)
        except ValueError as e:
            raise PlanError(str(e)) from None
        self._validate_pruning(spec)
        self._validate_rotation()
        for t in self.tensors:
            n = len(chunk_bounds(t.in_features, self.group_size))
            if len(t.actions) != n or len(t.methods) != n or len(t.protected) != n:
                raise PlanError(f"{t.name}: {t.in_features} input columns make {n} chunks of {self.group_size}, "
                                f"plan lists {len(t.actions)} actions, {len(t.methods)} methods, "
                                f"{len(t.protected)} protected lists")
            for c, (a, m, p, g) in enumerate(zip(t.actions, t.methods, t.protected, t.widths(self.group_size))):
                if a not in blocks.BY_NAME:
                    raise PlanError(f"{t.name} chunk {c}: unknown action {a!r} (known: {', '.join(blocks.ACTION_NAMES)})")
                if m not in METHODS:
                    raise PlanError(f"{t.name} chunk {c}: unknown quantizer method {m!r} (known: {', '.join(METHODS)})")
                if len(set(p)) != len(p) or any(not (0 <= i < g) for i in p):
                    raise PlanError(f"{t.name} chunk {c}: protected columns must be distinct and in [0, {g})")
        if spec is not None:
            expected = {lin.hf_name: lin for lin in self.model_spec(spec).linears()}
            for t in self.tensors:
                lin = expected.get(t.name)
                if lin is None:
                    raise PlanError(f"plan unit {t.name!r} is not a decoder linear of this model")
                if (lin.out_features, lin.in_features) != (t.out_features, t.in_features):
                    raise PlanError(f"{t.name}: plan says [{t.out_features}, {t.in_features}], "
                                    f"model has [{lin.out_features}, {lin.in_features}]")
            missing = set(expected) - {t.name for t in self.tensors}
            if missing:
                raise PlanError(f"plan has no actions for {len(missing)} linears of the model, e.g. {sorted(missing)[0]}")
        if fingerprint and self.model_fingerprint and fingerprint != self.model_fingerprint:
            raise PlanError(f"plan was made for a different model (fingerprint {self.model_fingerprint[:12]}…, "
                            f"this model {fingerprint[:12]}…)")
        eff = self.effective_bits()
        if eff > self.budget_bits + BUDGET_TOLERANCE:
            raise PlanError(f"plan does not meet its budget: {eff:.4f} effective bits > budget {self.budget_bits}")
        return self

    def _validate_pruning(self, spec: ModelSpec | None) -> None:
        """The pruning is consistent in itself, with the model, and with every tensor's (pruned) shape."""
        if self.pruning is None:
            return
        try:
            self.pruning.validate()
            if spec is not None:
                self.pruning.check_spec(spec)
            for t in self.tensors:
                layer, proj = parse_linear_name(t.name)
                shape = (t.out_features, t.in_features)
                want = self.pruning.kept_shape(layer, proj, self.pruning.original_shape(layer, proj, shape))
                if want != shape:
                    raise PruningError(f"{t.name}: plan says [{shape[0]}, {shape[1]}], its pruning keeps "
                                       f"[{want[0]}, {want[1]}]")
        except (PruningError, ValueError) as e:
            raise PlanError(f"pruning: {e}") from None

    def _validate_rotation(self) -> None:
        """act_bits one of ACT_BITS; rotation a known method."""
        if self.act_bits not in ACT_BITS:
            raise PlanError(f"act_bits must be one of {', '.join(map(str, ACT_BITS))}, got {self.act_bits!r}")
        if self.kv_cache is not None:
            from .kv_format import KVCacheSpec
            try:
                KVCacheSpec.from_plan(self.kv_cache)
            except ValueError as e:
                raise PlanError(str(e)) from None
        if self.rotation is None:
            return
        if not isinstance(self.rotation, dict) or self.rotation.get("method") not in ROTATIONS:
            raise PlanError(f"rotation: method must be one of {', '.join(ROTATIONS)}")
        from .rotation_format import check_rotation_config
        try:
            check_rotation_config(self.rotation, ACT_BITS)
        except ValueError as e:
            raise PlanError(f"rotation: {e}") from None

    def version(self) -> int:
        """The oldest plan version that expresses this plan."""
        if isinstance(self.rotation, dict) and self.rotation.get("stage2") is not None:
            return 4   # an older reader would ignore "stage2" and rebuild other transforms than the plan's
        if self.rotation is not None or self.act_bits != 8 or self.kv_cache is not None:
            return 3
        return 1 if self.pruning is None else 2

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        def tensor_dict(t: TensorPlan) -> dict:
            d = {"name": t.name, "out_features": t.out_features, "in_features": t.in_features,
                 "actions": t.actions, "methods": t.methods}
            if any(t.protected):
                d["protected"] = t.protected
            return d
        d = {
            "format": PLAN_FORMAT, "version": self.version(),
            "model": {"name": self.model_name, "fingerprint": self.model_fingerprint, "n_weights": self.n_weights()},
            "group_size": self.group_size, "budget_bits": self.budget_bits, "allocator": self.allocator,
            "effective_bits": self.effective_bits(), "action_histogram": self.action_histogram(),
        }
        if self.pruning is not None:
            d["pruning"] = self.pruning.to_dict()
        if self.rotation is not None:
            d["rotation"] = self.rotation
        if self.act_bits != 8:
            d["act_bits"] = self.act_bits
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache
        d.update({"tensors": [tensor_dict(t) for t in self.tensors], "meta": self.meta})
        return d

    def to_json(self, timings: bool = True) -> str:
        """The plan as JSON; timings=False drops wall-clock figures (meta keys "seconds" and "*_seconds"),
        so that equal inputs give equal bytes where the plan is embedded in a model file."""
        d = self.to_dict()
        if not timings:
            d["meta"] = _without_timings(d["meta"])
        return json.dumps(d, indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then rename."""
        with atomic_output(path) as tmp:
            tmp.write_text(self.to_json())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a wqedge plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if d.get("version") not in READ_VERSIONS:
            raise PlanError(f"unsupported plan version {d.get('version')!r} (this wqedge reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))})")
        if "pruning" in d and d["version"] < 2:
            raise PlanError("a version 1 plan has no \"pruning\" (structured pruning needs version 2)")
        if ("rotation" in d or "act_bits" in d or "kv_cache" in d) and d["version"] < 3:
            raise PlanError("\"rotation\", \"act_bits\" and \"kv_cache\" need plan version 3")
        if isinstance(d.get("rotation"), dict) and "stage2" in d["rotation"] and d["version"] < 4:
            raise PlanError("a rotation with \"stage2\" needs plan version 4")
        try:
            pruning = Pruning.from_dict(d["pruning"]) if d.get("pruning") is not None else None
        except PruningError as e:
            raise PlanError(f"pruning: {e}") from None
        try:
            tensors = [TensorPlan(t["name"], int(t["out_features"]), int(t["in_features"]), list(t["actions"]),
                                  list(t.get("methods") or ["neuqi"] * len(t["actions"])),
                                  [list(map(int, p)) for p in t.get("protected", [])])
                       for t in d["tensors"]]
            model = d.get("model", {})
            return cls(int(d["group_size"]), float(d["budget_bits"]), str(d.get("allocator", "")), tensors,
                       model.get("name", ""), model.get("fingerprint", ""), d.get("meta") or {}, pruning,
                       d.get("rotation"), int(d.get("act_bits", 8)), d.get("kv_cache"))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, spec: ModelSpec | None = None, fingerprint: str | None = None) -> "Plan":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_PLAN_BYTES:
                raise PlanError(f"{path}: {path.stat().st_size} bytes is too large for a plan file "
                                f"(limit {MAX_PLAN_BYTES})")
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except OSError as e:
            raise PlanError(f"{path}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a wqedge plan (not UTF-8 text; plans are JSON from `wqedge plan`)") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d).validate(spec, fingerprint)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def _without_timings(x):
    """A copy of a JSON value without the keys that hold wall-clock seconds."""
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if not (k == "seconds" or k.endswith("_seconds"))}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x
