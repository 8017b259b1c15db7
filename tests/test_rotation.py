"""RUQuant stage 1 (wqedge.rotation) and activation fake quantization (wqedge.actquant).

Small random tensors and a tiny random LLaMA built here (hidden 200, intermediate 576: 200 is a multiple of neither
the default block size 32 nor the former default 128, so its transforms have a ragged last block). Tolerances are
float32 ones.
"""
from __future__ import annotations

import copy

import pytest
import torch

from wqedge.actquant import fake_quant, quantize_model
from wqedge.rotation import (BLOCK, BlockRotation, Transform, build_model_transforms, build_transform,
                             group_activations, greedy_rotation, learn_reflection, quantize_rows,
                             smooth_scales, zigzag_permutation)

DIMS = (64, 128, 200, 512, 576)


def outlier_acts(d: int, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian tokens with a few large fixed channels (as LLaMA activations have) and one loud token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:3]] *= 40
    x[7] *= 8
    return x


def transform(d: int, seed: int = 0, smooth: bool = False) -> Transform:
    x = outlier_acts(d)
    s = smooth_scales(x.abs().amax(0), [torch.randn(16, d, generator=torch.Generator().manual_seed(1))]) if smooth else None
    return build_transform(x, seed=seed, smooth=s)


# ---------------------------------------------------------------- orthogonality and folding
# The block matrices are built orthogonal (float64) and stored as int8 rows with scales: orthogonal within
# the codes' rounding (ORTHO_TOL, measured up to 0.009), which folding then undoes exactly (the inverse).
ORTHO_TOL = 2e-2


@pytest.mark.parametrize("d", DIMS)
def test_transform_is_orthogonal(d):
    m = transform(d).matrix().double()
    assert (m.T @ m - torch.eye(d, dtype=torch.float64)).abs().max() < ORTHO_TOL


def test_greedy_rotation_is_orthogonal_before_rounding():
    v = outlier_acts(BLOCK, n=64).double()
    r = greedy_rotation(v, torch.Generator().manual_seed(0))
    assert (r.T @ r - torch.eye(BLOCK, dtype=torch.float64)).abs().max() < 1e-10


def test_quantize_rows_is_within_half_a_step():
    r = greedy_rotation(outlier_acts(BLOCK, n=64).double(), torch.Generator().manual_seed(1))
    codes, scale = quantize_rows(r)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(codes.abs().amax(1).min()) == 127 and int(codes.abs().max()) == 127   # every row uses its range
    err = (codes.double() * scale.double()[:, None] - r).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 1e-6)).all()


def test_block_product_is_the_int8_matrix():
    """apply = (x codesᵀ) · scale on each block, the runtime's order; the dequantized matrix gives the same."""
    t = transform(200)
    x = outlier_acts(200, n=8, seed=2)
    r = t.r1
    want = (x[:, :BLOCK] @ r.full_codes.float().T) * r.full_scale
    assert (r.apply(x)[:, :BLOCK] - want).abs().max() <= 1e-6 * want.abs().max()
    dense = x[:, :BLOCK].double() @ (r.full_codes.double() * r.full_scale.double()[:, None]).T
    assert (r.apply(x)[:, :BLOCK].double() - dense).abs().max() <= 1e-5 * dense.abs().max()


@pytest.mark.parametrize("d", (200, 584))   # ragged at B = 32 (8 and 8 left over) and at 128 (72 and 72)
def test_block_matrices_orthogonal_and_ragged(d):
    t = transform(d)
    for r in (t.r1, t.r2):
        assert r.full.shape == (BLOCK, BLOCK)
        assert r.tail is not None and r.tail.shape == (d % BLOCK, d % BLOCK)
        for q in (r.full, r.tail):
            assert (q.T.double() @ q.double() - torch.eye(q.shape[0], dtype=torch.float64)).abs().max() < ORTHO_TOL
        assert not torch.allclose(r.full, torch.eye(BLOCK))   # the greedy steps did something
    assert sorted(t.perm.tolist()) == list(range(d))
    assert abs(float(t.v.norm()) - 1.0) < 1e-5


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("smooth", (False, True))
def test_fold_preserves_product(d, smooth):
    t = transform(d, smooth=smooth)
    x = outlier_acts(d, n=32, seed=5)
    w = torch.randn(24, d, generator=torch.Generator().manual_seed(2))
    ref = (x.double() @ w.double().T)
    xs = x if t.smooth is None else x / t.smooth
    got = (xs @ t.matrix().T) @ t.fold_into_weight(w).T   # the matrices as stored, their exact inverse folded
    assert (got.double() - ref).abs().max() <= 2e-6 * ref.abs().max() * d ** 0.5
    got = t.apply(x) @ t.fold_into_weight(w).T
    assert (got.double() - ref).abs().max() <= 2e-6 * ref.abs().max() * d ** 0.5


def test_apply_equals_dense_matrix():
    t = transform(576, smooth=True)
    x = outlier_acts(576, n=16, seed=3)
    dense = (x / t.smooth) @ t.matrix().T
    assert (t.apply(x) - dense).abs().max() <= 1e-5 * dense.abs().max()


# ---------------------------------------------------------------- determinism and the construction's purpose

def test_deterministic_under_seed():
    a, b, c = transform(584, seed=3), transform(584, seed=3), transform(584, seed=4)
    for name in ("full", "tail"):
        assert torch.equal(getattr(a.r1, name), getattr(b.r1, name))
        assert torch.equal(getattr(a.r2, name), getattr(b.r2, name))
    assert torch.equal(a.perm, b.perm) and torch.equal(a.v, b.v)
    assert not torch.equal(a.r1.full, c.r1.full)


def test_greedy_rotation_spreads_an_outlier():
    """One block with a huge channel: after R, no coordinate holds most of the energy any more."""
    v = torch.randn(200, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v[:, 5] *= 50
    r = greedy_rotation(v, torch.Generator().manual_seed(0))
    peak = lambda y: float((y.abs().amax(1) / y.pow(2).mean(1).sqrt()).mean())   # noqa: E731  max/rms per row
    assert peak(v) > 8.0   # sqrt(128) = 11.3 is the most a row can have
    assert peak(v @ r.T) < peak(v) / 2.5


@pytest.mark.parametrize("d", (200, 512, 576))
def test_transform_lowers_a4_error(d):
    x = outlier_acts(d, n=512, seed=9)
    t = build_transform(x[:256], seed=0)
    held = x[256:]
    err = lambda y: float((fake_quant(y, 4) - y).pow(2).sum() / y.pow(2).sum())   # noqa: E731
    # measured on these seeds: 1.95x (d=200), 2.4x (512), 5.4x (576); a Gaussian's own A4 error is ~0.013
    assert err(t.apply(held)) < err(held) / 1.5


def test_zigzag_spreads_largest_channels():
    d = 576   # blocks of 128, 128, 128, 128, 64
    m = torch.rand(d, generator=torch.Generator().manual_seed(0))
    perm = zigzag_permutation(m, 128)
    assert sorted(perm.tolist()) == list(range(d))
    pos = torch.empty(d, dtype=torch.long)
    pos[perm] = torch.arange(d)
    top = torch.argsort(m, descending=True)[:5]
    assert sorted((pos[top] // 128).tolist()) == [0, 1, 2, 3, 4]   # the 5 largest: one per block
    counts = torch.bincount(pos // 128)
    assert counts.tolist() == [128, 128, 128, 128, 64]


def test_identity_transform_is_identity():
    x = torch.randn(4, 200)
    assert torch.allclose(Transform.identity(200).apply(x), x, atol=0, rtol=0)
    br = BlockRotation(200, torch.eye(BLOCK), torch.eye(200 % BLOCK))
    assert torch.equal(br.apply(x), x)


def test_stage2_reflection_keeps_orthogonality_and_lowers_loss():
    d = 200
    x = outlier_acts(d, n=128, seed=4)
    ws = [torch.randn(32, d, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    t = build_transform(x, seed=0)
    t2, hist = learn_reflection(t, x, ws, act_bits=4, weight_bits=4, steps=15, seed=0)
    assert len(hist) == 16 and min(hist) < hist[0]           # it found a better vector than stage 1's
    assert abs(float(t2.v.norm()) - 1) < 1e-5 and not torch.equal(t2.v, t.v)
    m = t2.matrix().double()
    assert (m.T @ m - torch.eye(d, dtype=torch.float64)).abs().max() < ORTHO_TOL
    ref = x.double() @ ws[0].double().T
    assert ((t2.apply(x) @ t2.fold_into_weight(ws[0]).T).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------- activation quantizer

@pytest.mark.parametrize("bits", (8, 6, 4))
def test_fake_quant_round_trip_bound(bits):
    x = outlier_acts(200, n=64)
    xq = fake_quant(x, bits)
    s = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** bits - 1)
    assert bool(((xq - x).abs() <= s / 2 * (1 + 1e-4) + 1e-6).all())
    assert max(len(torch.unique(r)) for r in xq) <= 2 ** bits
    # a finer grid is never worse on average
    if bits < 8:
        assert (fake_quant(x, bits + 2) - x).pow(2).mean() < (xq - x).pow(2).mean()


def test_fake_quant_passthrough_and_errors():
    x = torch.randn(3, 5)
    assert fake_quant(x, None) is x and fake_quant(x, 16) is x
    with pytest.raises(ValueError):
        fake_quant(x, 5)
    c = torch.full((2, 7), 0.5)   # constant token: exact
    assert torch.equal(fake_quant(c, 4), c)


# ---------------------------------------------------------------- the fake-quant model

@pytest.fixture(scope="module")
def tiny_llama():
    """A random LLaMA with ragged widths (hidden 200, intermediate 576) and two loud norm channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=200, intermediate_size=576, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=50, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 150]] = 25.0
            layer.post_attention_layernorm.weight[[17]] = 30.0
    tokens = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _logits(model, tokens):
    with torch.inference_mode():
        return model(tokens).logits


@pytest.mark.parametrize("smooth_alpha", (None, 0.6))
def test_rotated_a16_forward_matches_fp(tiny_llama, smooth_alpha):
    model, tokens = tiny_llama
    acts = group_activations(model, tokens)
    assert set(acts) == {(li, gi) for li in range(2) for gi in range(4)}
    assert acts[(0, 3)].shape == (3 * 31, 576) and acts[(0, 0)].shape == (3 * 31, 200)
    tr = build_model_transforms(model, acts, seed=0, smooth_alpha=smooth_alpha)
    ref = _logits(model, tokens)
    rotated = quantize_model(copy.deepcopy(model), tr, act_bits=None)
    got = _logits(rotated, tokens)
    # stated tolerance: fp32 rounding of the transforms, 1e-4 of the logits' range
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # and the activation quantizer really acts: A4 moves the logits by far more than that
    a4 = _logits(quantize_model(copy.deepcopy(model), tr, act_bits=4), tokens)
    assert (a4 - ref).abs().max() > 1e-2 * ref.abs().max()


def test_rotation_helps_a4_on_outlier_model(tiny_llama):
    model, tokens = tiny_llama
    tr = build_model_transforms(model, group_activations(model, tokens), seed=0)
    ref = torch.log_softmax(_logits(model, tokens), -1)
    def kl(m):
        lp = torch.log_softmax(_logits(m, tokens), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())
    plain = kl(quantize_model(copy.deepcopy(model), None, act_bits=4))
    rotated = kl(quantize_model(copy.deepcopy(model), tr, act_bits=4))
    assert rotated < plain / 2
