"""The benchmark's rows: which backend runs which file, and the named presets of `--rows`.

A row is one (backend, file recipe). Each row is run on the quality model (perplexity and speed) and,
where `speed` is True, on the random-weight speed model as well (speed only).
"""
from __future__ import annotations

from dataclasses import dataclass

PRESETS_LLAMACPP = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
IQ_TYPES = ("IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
MIXED_BITS = (3.25, 2.5)
MATCHED_TYPES = PRESETS_LLAMACPP + ("IQ2_XXS",)   # wq-at-<type>: our plan at that llama.cpp file's bits
A8 = "-a8"   # suffix of the rows that decode with int8 activations (wqe_set_activations(WQE_ACT_Q8))


@dataclass(frozen=True)
class Row:
    key: str        # what --rows names
    backend: str    # "wqedge" | "llamacpp" | "ort"
    recipe: str     # how the file is made (for --help and the report)
    speed: bool = True   # also run on the speed model
    act: str = "f32"     # our runtime's decode activations: "f32" (exact, the library default) or "q8" (int8)
    matched: str | None = None   # our plan at the bits of this llama.cpp type's file (set 'matched'), compared with it
    two_level: bool = False      # that plan with the two-level kinds offered (--two-level)

    @property
    def file_key(self) -> str:
        """The row whose file this row runs (an -a8 row runs its float row's file)."""
        return self.key[: -len(A8)] if self.key.endswith(A8) else self.key


def _rows() -> list[Row]:
    r = [Row("wq-q4", "wqedge", "our runtime, uniform q4 at G=128 (4.25 b): NeUQI fits weighted by diag(XᵀX) of the "
                                "calibration text (min-max without --calib)")]
    for b in MIXED_BITS:
        r.append(Row(f"wq-{b:g}", "wqedge", f"our runtime, greedy mixed plan at {b:g} b (make_plan, calibration text), "
                                            "converted with error feedback like `wqedge convert`; on the speed model "
                                            "the same plan resampled onto its shape"))
    for key in ["wq-q4"] + [f"wq-{b:g}" for b in MIXED_BITS]:
        r.append(Row(key + A8, "wqedge", f"the {key} file with int8 activations per 32 columns (integer dot products "
                                         "in decode, prefill and perplexity, as llama.cpp does; the library's default, "
                                         "while the plain wq-* rows pin the float reference path; the ppl column "
                                         "compares the two)", act="q8"))
    for t in MATCHED_TYPES:
        r.append(Row(f"wq-at-{t}", "wqedge", f"our runtime, greedy mixed plan at the effective bits of the lcp-{t} "
                                            "file on this model (its decoder linears' tensor bytes, measured), "
                                            "one-scale kinds only (`--no-two-level`), converted like wq-3.25: ours "
                                            "against llama.cpp at equal bits; quality model only",
                     speed=False, matched=t))
        r.append(Row(f"wq-at-{t}" + A8, "wqedge", f"the wq-at-{t} file with int8 activations (llama.cpp's "
                                                 "perplexity is with its int8 activations too)", speed=False, act="q8",
                     matched=t))
        r.append(Row(f"wq-2l-at-{t}", "wqedge", f"as wq-at-{t}, with the two-level kinds offered to the allocator "
                                               "too as `wqedge convert` offers them (pipeline.offered_actions: q4s/q3s, "
                                               "and q2s below 4 bits)",
                     speed=False, matched=t, two_level=True))
    for p in PRESETS_LLAMACPP:
        r.append(Row(f"lcp-{p}", "llamacpp", f"llama.cpp {p}: llama-quantize's per-tensor recipe (preset_types; embeddings "
                                             "and head by preset_embedding_types, e.g. a Q6_K head), llama.cpp's "
                                             "quantizer, importance matrix from the calibration text"))
    for t in IQ_TYPES:
        r.append(Row(f"lcp-{t}", "llamacpp", f"llama.cpp {t} on every decoder linear (its IQ4_NL fallback where K is "
                                             "not a multiple of 256; embeddings and head as llama-quantize's {t} file "
                                             "has them); quality model only (slow to quantize)",
                     speed=False))
    for b in MIXED_BITS:
        r.append(Row(f"lcp-plan-{b:g}", "llamacpp", f"llama.cpp at our {b:g}-bit plan projected onto one stock type per "
                                                   "tensor within the same bits (export_llamacpp; no IQ types on the "
                                                   "speed model), the head stored as our files' (Q8_0), as `wqedge "
                                                   "convert --target llamacpp` writes it"))
    r.append(Row("ort-portable", "ort", "ONNX Runtime, stock: the wq-q4 file exported with variant='portable' "
                                        "(MatMulNBits), KV cache fed back each step"))
    r.append(Row("ort-native", "ort", "ONNX Runtime with our custom-op library: variant='native' "
                                      "(wqedge.runtime.onnx_session.make_session)"))
    return r


ROWS: dict[str, Row] = {r.key: r for r in _rows()}

SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(k for k, r in ROWS.items() if not r.matched),   # the matched rows (5 more plans): set 'matched'
    "quick": ("wq-q4", "lcp-Q4_0", "lcp-Q2_K", "ort-portable"),
    "ours": tuple(k for k, r in ROWS.items() if r.backend == "wqedge"),
    "a8": tuple(k for k in ROWS if k.endswith(A8)),
    "llamacpp": tuple(k for k, r in ROWS.items() if r.backend == "llamacpp"),
    "iq": tuple(f"lcp-{t}" for t in IQ_TYPES),
    "mixed": tuple(f"wq-{b:g}" for b in MIXED_BITS) + tuple(f"lcp-plan-{b:g}" for b in MIXED_BITS),
    "onnx": ("ort-portable", "ort-native"),
    # issue 13's "our file <= llama.cpp at every bpw": each llama.cpp type beside our plan at its bits
    "matched": tuple(f"lcp-{t}" for t in MATCHED_TYPES) + tuple(k for k, r in ROWS.items() if r.matched),
}


def parse_rows(text: str) -> list[str]:
    """'all', 'quick,ort-native', 'wq-q4,lcp-Q4_0' ... -> row keys in canonical order; ValueError names the
    unknown item and lists the valid ones."""
    want: set[str] = set()
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item in SETS:
            want.update(SETS[item])
        elif item in ROWS:
            want.add(item)
        else:
            match = {k.lower(): k for k in ROWS}.get(item.lower())
            if match is None:
                raise ValueError(f"unknown row {item!r}; rows: {', '.join(ROWS)}; sets: {', '.join(SETS)}")
            want.add(match)
    if not want:
        raise ValueError("no rows given")
    return [k for k in ROWS if k in want]
