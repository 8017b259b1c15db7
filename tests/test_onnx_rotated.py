"""ONNX export of rotated (RUQuant, format version 2) files (issue 15): the input transforms and the per-token
activation quantizer lowered as stock ONNX operators (converters/onnx_rotation.py), against the PyTorch reference
(wqedge.reference) built from the same file; and the llama.cpp target's refusal of rotated plans.

A tiny random LLaMA (hidden 160 = one block of B = 128 plus a ragged tail of 32; FFN 96 < B, so the down group is
one ragged block only; GQA 4 heads over 2; these files' transforms have B = 128, the former default, for those
ragged blocks, and the CLI test's the default B = 32), transforms from seeded outlier-heavy activations (build_transform, as
tests/test_ruquant_runtime.py; one group smoothed), q4 weights, act bits 8 and 4.

Tolerances (max |Δlogit| / std(reference logits)):
- act bits 8 (float activations): every position within PARITY = 1e-4, prefill and KV-cache decode steps, as the
  unrotated tiny-model ONNX tests (measured ≤ 6e-6): the graph computes the reference's operations in fp32 and
  only summation orders differ (transform alone: ≤ 1e-6 of max |x'|, test_group_input_graph).
- act bits 4: the quantizer graph is bit-exact with wqedge.actquant.fake_quant on the same input, but the
  transform's last-bit differences move a value across a rounding boundary of the 4-bit grid now and then (3 in
  4.7 M values measured, 6e-7 each), and one such flip moves this model's logits by up to 0.43 std (measured,
  one value moved by one step in the reference, 24 trials: median 0.21): no max tolerance can absorb a flip
  and still detect a wrong lowering. A flip changes only the positions from its token on in its own window, so
  with 4 windows at least 70% of positions must be within PARITY (one flip cannot break that; measured: all of
  them), and every position within FLIP_BOUND = 1.
The quantizer's exactness, the transform's accuracy and the one-step size of flips are checked directly on the
group-input graph (test_group_input_graph).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from wqedge.checkpoint import LlamaCheckpoint
from wqedge.plan import Plan
from wqedge.rotation import RotatedCheckpoint, to_stored
from rotated_tiny import synthetic_transforms, uniform_plan  # noqa: E402

ENGINE = pytest.mark.engine("onnxruntime")   # run in a child pytest (tests/engine_isolation.py)
SHAPE = dict(hidden=160, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=96)
GROUP = 128
TRANSFORM_BLOCK = 128
PARITY = 1e-4
FLIP_BOUND = 1.0
MIN_EXACT = 0.7
N_WIN, WIN, N_DECODE = 4, 24, 4


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(**SHAPE))


@pytest.fixture(scope="module")
def transforms(ckpt):
    return synthetic_transforms(ckpt, block=TRANSFORM_BLOCK)


def _plan(ckpt, action="q4", act_bits=8, rotated=True) -> Plan:
    return uniform_plan(ckpt, GROUP, action, act_bits, rotated, block=TRANSFORM_BLOCK)


@pytest.fixture(scope="module")
def files(ckpt, transforms, tmp_path_factory):
    from wqedge.quantize import convert_to_gguf
    d = tmp_path_factory.mktemp("onnx_rotated")
    stored = {k: to_stored(t) for k, t in transforms.items()}
    out = {b: convert_to_gguf(RotatedCheckpoint(ckpt, transforms), _plan(ckpt, "q4", b), d / f"q4a{b}.gguf",
                              transforms=stored) for b in (8, 4)}
    # activation bits without transforms (format version 2, no rotation): the quantizer alone
    out["a4_unrotated"] = convert_to_gguf(ckpt, _plan(ckpt, "q4", 4, rotated=False), d / "q4a4_plain.gguf")
    return out


def _windows():
    return np.random.default_rng(0).integers(0, 256, (N_WIN, WIN))


def _reference_logits(path, windows):
    from wqedge.reference import load_reference, logits_fn
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return logits_fn(load_reference(path))(windows)


def _onnx_logits(onnx_path, windows):
    """(prefill logits [n, L, V], decode logits [n, N_DECODE, V]: the last N_DECODE tokens one step each on the
    KV cache of the ones before)."""
    from wqedge.runtime.onnx_session import OnnxDecoder
    dec = OnnxDecoder(onnx_path, 2)
    prefill = dec.logits(windows)
    _, past = dec.step(windows[:, :-N_DECODE], dec.empty_past(len(windows)))
    steps = []
    for i in range(WIN - N_DECODE, WIN):
        logits, past = dec.step(windows[:, i:i + 1], past)
        steps.append(logits[:, -1])
    return prefill, np.stack(steps, axis=1)


def _per_position(lo, lr) -> np.ndarray:
    """max |Δ| / std(reference) of every position [n, L]."""
    assert lo.shape == lr.shape and np.isfinite(lo).all()
    return np.abs(lo - lr).max(-1) / lr.std()


def _check_parity(lo, lr, act_bits, what):
    err = _per_position(lo, lr)
    exact = float((err < PARITY).mean())
    print(f"{what}: max|d|/std = {err.max():.2e}, positions within {PARITY:g}: {exact:.3f}")
    if act_bits >= 8:
        assert err.max() < PARITY
    else:
        assert exact >= MIN_EXACT and err.max() < FLIP_BOUND


def _variant_path(gguf, variant, tmp_path) -> Path:
    from wqedge.converters.onnx_export import export_onnx
    if variant == "native":
        from wqedge.runtime import onnx_session
        try:
            onnx_session.custom_ops_library()
        except onnx_session.CustomOpsLibraryNotFound:
            pytest.skip("libwqedge_ort not built (tests/test_onnx.py builds it)")
    return Path(export_onnx(gguf, tmp_path / f"{variant}.onnx", variant=variant)["path"])


# ---------------------------------------------------------------- the group input alone
@ENGINE
def test_group_input_graph(files):
    """Per stored transform: the ONNX transform equals Transform.apply within 2e-6 of max |x'| (fp32 sums in
    another order); the ONNX quantizer (4 and 6 bits, also without a transform: an act-bits-only file) is
    bit-exact with fake_quant on the same input; transform + 4-bit quantizer together differ from the reference
    only by grid-step flips (|Δ| within 1e-4 of a step, else exactly one step) on fewer than 1e-4 of the values."""
    import onnxruntime as ort

    from wqedge.actquant import fake_quant
    from wqedge.converters.onnx_rotation import group_input_model
    from wqedge.rotation import from_stored
    from wqedge.runtime.gguf_reader import WqGGUF

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2

    def run(st, bits, x):
        m = group_input_model(st, bits)
        onnx.checker.check_model(m, full_check=True)
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    rng = np.random.default_rng(0)
    flips = total = 0
    transforms = WqGGUF(files[4]).transforms()
    assert any(st.smooth is not None for st in transforms.values())
    for key, st in transforms.items():
        d = st.dim
        x = rng.standard_normal((4, 64, d)).astype(np.float32)
        x[..., rng.permutation(d)[:3]] *= 30
        xr = from_stored(st).apply(torch.from_numpy(x))
        y = run(st, None, x)
        assert np.abs(y - xr.numpy()).max() <= 2e-6 * float(xr.abs().max()), key
        for bits in (4, 6):
            np.testing.assert_array_equal(run(None, bits, xr.numpy()), fake_quant(xr, bits).numpy())
        q, qr = run(st, 4, x), fake_quant(xr, 4).numpy()
        step = (qr.max(-1, keepdims=True) - qr.min(-1, keepdims=True)) / 15
        dq = np.abs(q - qr) / step
        flip = dq > 0.5
        assert (dq[~flip] < 1e-4).all() and (np.abs(dq[flip] - 1) < 1e-4).all(), key
        flips, total = flips + int(flip.sum()), total + q.size
    print(f"4-bit flips: {flips} of {total} values")
    assert flips <= 1e-4 * total


@ENGINE
def test_graph_is_stock_and_shares_the_group_input(files, tmp_path):
    """Stock operators only; one transform per group (4 Gathers by a stored permutation per layer), computed once
    and read by every linear of its group; the quantizer (2 Rounds) only at act bits < 8; model properties."""
    from wqedge.converters.onnx_export import export_onnx
    for bits in (8, 4):
        gguf = files[bits]
        info = export_onnx(gguf, tmp_path / f"a{bits}.onnx")
        m = onnx.load(info["path"])
        nodes = m.graph.node
        assert {n.domain for n in nodes} <= {"", "com.microsoft"}
        perms = [n for n in nodes if n.op_type == "Gather" and "_perm" in n.input[1]]
        assert len(perms) == 4 * SHAPE["n_layers"]
        assert sum(n.op_type == "Round" for n in nodes) == (0 if bits == 8 else 2 * 4 * SHAPE["n_layers"])
        props = {p.key: p.value for p in m.metadata_props}
        assert props["wqedge.rotation"] == "ruquant" and props["wqedge.act_bits"] == str(bits)
        assert info["linear_bytes_by_kind"]["rotation"] > 0
        x_of = {}
        for n in nodes:
            if n.op_type == "MatMulNBits":
                x_of[n.input[1].split("_matmulnbits")[0]] = n.input[0]
        for li in range(SHAPE["n_layers"]):
            assert x_of[f"blk_{li}_attn_q"] == x_of[f"blk_{li}_attn_k"] == x_of[f"blk_{li}_attn_v"]
            assert x_of[f"blk_{li}_ffn_gate"] == x_of[f"blk_{li}_ffn_up"]
            assert x_of[f"blk_{li}_attn_q"] != x_of[f"blk_{li}_ffn_gate"]


# ---------------------------------------------------------------- logits against the reference
@ENGINE
@pytest.mark.parametrize("variant", ["portable", "native"])
@pytest.mark.parametrize("key", [8, 4, "a4_unrotated"])
def test_logits_match_reference(files, tmp_path, key, variant):
    """Prefill of 4 windows and KV-cache decode steps vs the reference's logits at the same positions; rotated
    files at act bits 8 and 4, and a file with act bits 4 and no transforms."""
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(files[key])
    bits = f.act_bits
    assert f.format_version == (2 if key == "a4_unrotated" else 3) and (f.rotation is None) == (key == "a4_unrotated")
    path = _variant_path(files[key], variant, tmp_path)
    if key == "a4_unrotated":
        assert not any(n.op_type == "Gather" and "_perm" in n.input[1] for n in onnx.load(str(path)).graph.node)
    w = _windows()
    lr = _reference_logits(files[key], w)
    prefill, decode = _onnx_logits(path, w)
    _check_parity(prefill, lr, bits, f"{key} {variant} prefill")
    _check_parity(decode, lr[:, WIN - N_DECODE:], bits, f"{key} {variant} decode")


@ENGINE
def test_cli_converts_rotated_plan_to_onnx(ckpt, tmp_path):
    """`wqedge convert --preset q4 --rotate --act-bits 4 --calib ... --target onnx`: the GGUF beside the ONNX
    model is version 2, and the ONNX logits are the reference's of that GGUF (A4 criterion)."""
    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.runtime.gguf_reader import WqGGUF
    from wqedge.tinymodel import tiny_corpus
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(tiny_corpus(600)))
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["convert", str(ckpt.path), "--preset", "q4", "--rotate", "--act-bits", "4",
                                  "--calib", str(calib), "--no-feedback", "--no-check", "--target", "onnx",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    gguf = out.with_suffix(".gguf")
    f = WqGGUF(gguf)
    assert f.format_version == 3 and f.act_bits == 4 and f.rotation == "ruquant"
    w = _windows()
    lr = _reference_logits(gguf, w)
    prefill, decode = _onnx_logits(out, w)
    _check_parity(prefill, lr, 4, "CLI A4 prefill")
    _check_parity(decode, lr[:, WIN - N_DECODE:], 4, "CLI A4 decode")


def test_export_of_rotated_file_needs_no_torch(files, tmp_path):
    """The exporter stays numpy + onnx for rotated files too (both variants), run from the installed package."""
    import subprocess
    code = ("import sys; from wqedge.converters.onnx_export import export_onnx; "
            f"export_onnx({str(files[4])!r}, {str(tmp_path / 'p.onnx')!r}); "
            f"export_onnx({str(files[4])!r}, {str(tmp_path / 'n.onnx')!r}, variant='native'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
    assert (tmp_path / "p.onnx").is_file() and (tmp_path / "n.onnx").is_file()


# ---------------------------------------------------------------- llama.cpp
def test_cli_llamacpp_refuses_rotated_plan(ckpt, tmp_path):
    """Stock llama.cpp cannot run the online transforms the folded weights need: convert says so and what to use
    instead, before any work (with --plan, and with --rotate before planning), and writes nothing."""
    from click.testing import CliRunner

    from wqedge.cli import main
    plan = tmp_path / "p.json"
    plan.write_text(_plan(ckpt, "q4", 4).to_json())
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    r = CliRunner().invoke(main, ["convert", str(ckpt.path), "--plan", str(plan), "--target", "llamacpp",
                                  "--no-self-calib", "-o", str(out)])
    assert r.exit_code != 0
    msg = " ".join(r.output.split())
    for part in ("cannot be written for stock llama.cpp", "llama.cpp has no operator for such an input transform",
                 "--target gguf", "--target onnx", "without --rotate"):
        assert part in msg, r.output
    assert list(out.parent.iterdir()) == []
    # --rotate without a plan: refused before the transforms and the plan are built
    r = CliRunner().invoke(main, ["convert", str(ckpt.path), "--preset", "q4", "--rotate", "--target", "llamacpp",
                                  "--no-self-calib", "-o", str(out)])
    assert r.exit_code != 0 and "llama.cpp has no operator" in " ".join(r.output.split()), r.output
    assert "plan:" not in r.output and list(out.parent.iterdir()) == []
