"""The C column loop of error feedback (cpp/planning/feedback_kernel.c) against its reference, the torch loop in
wqedge.quant.gptq (WQEDGE_FEEDBACK_BACKEND=torch).

Both round each element with the same float32 operations in the same order; the rank-1 update may round once (an
FMA in torch's vectorised kernel) where C rounds twice, so codes can flip where a value sits on a rounding tie.
Stated tolerance: at most 0.1% of codes different, and the dequantized weights' error against the original
weights, weighted by XᵀX (what error feedback minimises), within 0.5% of the reference's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wqedge.quant import gptq
from wqedge.quant.feedback import dequantize
from wqedge.quant.gptq import gptq_linears

CODE_TOL = 1e-3
LOSS_TOL = 5e-3

pytestmark = pytest.mark.skipif(gptq._column_loop("cpu") is None, reason="planning kernels not built")


def _loss(w, chunks, xtx):
    e = (dequantize(chunks).double() - w.double())
    return float(torch.einsum("nk,kl,nl->", e, xtx.double(), e))


def _run(monkeypatch, backend, *args, **kw):
    monkeypatch.setenv("WQEDGE_FEEDBACK_BACKEND", backend)
    return gptq_linears(*args, **kw)


CASES = {
    # one linear, every quantized kind, a ragged last chunk (K = 5 x 64 + 40)
    "kinds": ([(64, 360)], [["q8", "q4", "q3", "q2", "ternary", "q1"]], None, 64),
    # q/k/v-like stacked rows: one kind per chunk across linears and mixed kinds (subscale with one-scale)
    "stacked": ([(96, 320), (32, 320), (32, 320)], [["q4s", "q3", "q2"], ["q4", "q3s", "q2s"], ["q4", "q3", "q1"]],
                None, 128),
    # fp16 chunks and protected columns: those columns take the torch path inside the same loop
    "fp16+protected": ([(48, 256), (48, 256)], [["q4", "fp16"], ["fp16", "q3"]], [[[3, 7], []], [[], [1, 2]]], 128),
}


@pytest.mark.parametrize("act_order", ["chunk", "global", None])
@pytest.mark.parametrize("case", sorted(CASES))
def test_c_loop_matches_torch_loop(monkeypatch, case, act_order):
    shapes, acts, prot, G = CASES[case]
    torch.manual_seed(1)
    K = shapes[0][1]
    X = torch.randn(3000, K) * (torch.rand(K) * 2 + 0.05)
    X[:, ::17] *= 6                                   # outlier channels: act_order matters
    xtx = (X.T @ X).double() / 3000
    ws = [torch.randn(n, k) * (1 + 3 * (torch.rand(n, 1) > 0.9)) for n, k in shapes]
    ref = _run(monkeypatch, "torch", ws, xtx, acts, G, None, prot, act_order=act_order)
    got = _run(monkeypatch, "auto", ws, xtx, acts, G, None, prot, act_order=act_order)
    n_codes = n_diff = 0
    for w, a, b in zip(ws, ref, got):
        assert [c.action for c in a] == [c.action for c in b]
        for x, y in zip(a, b):
            if x.codes is not None:
                n_codes += x.codes.size
                n_diff += int((x.codes != y.codes).sum())
            if x.values is not None:
                np.testing.assert_allclose(x.values.astype(np.float32), y.values.astype(np.float32), atol=2e-3,
                                           rtol=2e-3)
        la, lb = _loss(w, a, xtx), _loss(w, b, xtx)
        assert abs(lb - la) <= LOSS_TOL * la, (case, la, lb)
    assert n_diff <= CODE_TOL * max(n_codes, 1), (n_diff, n_codes)


def test_c_loop_is_used_on_cpu(monkeypatch):
    """The C loop really runs (not the torch fallback) where the library has it: calls are counted."""
    calls = []
    real = gptq._column_loop("cpu")

    def counting(*a):
        calls.append(a[5] - a[4])        # i1 - i0: columns in the run
        return real(*a)
    monkeypatch.setattr(gptq, "_column_loop", lambda dev: counting)
    torch.manual_seed(0)
    X = torch.randn(500, 256)
    gptq_linears([torch.randn(16, 256)], (X.T @ X).double() / 500, [["q4", "q2s"]], 128)
    assert sum(calls) == 256 and len(calls) == 2          # one run per chunk: blocks of 128 = the chunks
