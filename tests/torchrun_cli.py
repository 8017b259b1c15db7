"""Running `wqedge` in one process or under torchrun with several CPU processes (gloo), for the tests of
--distributed and --resume-dir; and the file comparison they share."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TORCHRUN_TIMEOUT_S = 600
DIST_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_wqedge(args, nproc: int, cwd: Path, env_extra: dict | None = None, check: bool = True):
    """`python -m wqedge ARGS` (nproc 1) or `torchrun --nproc-per-node nproc -m wqedge ARGS --distributed`; the
    completed process (asserted successful when `check`). One thread per process in both, as torchrun gives each
    rank, so one and several processes do the same arithmetic; no GPU (gloo on CPU processes)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("WQEDGE_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(env_extra or {}))
    pre = [sys.executable, "-m", "wqedge"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "wqedge"]
    cmd = pre + [str(a) for a in args] + (["--distributed"] if nproc > 1 else [])
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def assert_weights_equal(a, b, share: float = 1e-3, hair: float = 1e-3, compact_share: float = 3e-2) -> None:
    """Two wqedge GGUFs (runtime.gguf_reader.WqGGUF) hold the same decoder linears: at most `share` of their values
    moved by more than `hair` x the linear's largest |w| (a code flipped by the float summation order of reduced
    statistics in an error-feedback fit, and the refitted scale of its row). Smaller moves are an fp16 scale or
    offset one ulp apart (~4e-4 of the range measured), not counted. Files with compact-header chunks may move up to
    `compact_share`: a fitted d one ulp apart takes the neighbouring scale code (steps of 4.4%) in about 2% of the rows
    (measured 1.0-1.8% of the weights), which moves that row's whole chunk."""
    from wqedge import blocks
    if any(blocks.block_type(x).compact for f in (a, b) for n in f.linear_names() for x in f.layout(n).actions):
        share = max(share, compact_share)
    assert a.linear_names() == b.linear_names()
    moved = total = 0
    for name in a.linear_names():
        wa, wb = a.dequantize_linear(name), b.dequantize_linear(name)
        moved += int((abs(wa.astype("float64") - wb) > hair * float(abs(wa).max())).sum())
        total += wa.size
    assert moved <= share * total, f"{moved} of {total} weights moved by more than {hair} of the largest"
