"""Planning on torch.distributed (issue 18): calibration windows split over the processes, statistics summed.

Under `torchrun` (one process per GPU, or CPU processes with the gloo backend) `wqedge plan/convert --distributed`
opens one process group (`session`). Every statistic planning reads is a sum over calibration windows (the input
second moments and XᵀX of wqedge.calib.layerwise_stats, the squared output gradients of gradient_stats, the
held-out loss), so each rank runs its share of the windows (`shard`: windows r, r + W, r + 2W, ...) and the sums are
all-reduced (`reduce_sum_` / `reduce_max_`): every rank then holds the statistics of all windows, bit for bit the
same on each (an all-reduce hands every rank the same result), and everything computed from them — damage table,
allocation, error-feedback fits — is the same on every rank. Only rank 0 writes files (`is_writer`). Outside a
session every function here is the identity, so single-process planning is unchanged.

The damage table and the error-feedback fits are split by owner (`owners`: each linear, or group of linears sharing
an input, computed by one rank, balanced by cost) and shared (`reduce_sum_` of rows only the owner filled,
`broadcast_object` of fitted chunks), which gives every rank the very values one process computes. Steps that do not
split into sums over windows — they sample (self-calibration), search with measured losses (PPO, the joint pruning
search), build from activation samples (RUQuant's transforms) — run on rank 0 alone over all windows and hand their
result to every rank (`on_writer`), so they give what one process gives; light distillation and the exports run on
rank 0 after the last collective (`writer_alone`). Per-layer checkpoints of the statistics and fits, for resuming a
failed job, are wqedge.resume's.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = 1800    # a rank that died is reported by the collective that waits for it, at the latest here


class DistributedError(RuntimeError):
    """--distributed asked for where it cannot run (no torchrun environment, a feature that is not sharded)."""


_ALONE = False   # set by `writer_alone`: this process goes on by itself (no more collectives)


def active() -> bool:
    """Whether this process plans together with others: a process group is open (inside `session`) and the
    process has not gone on alone (`writer_alone`)."""
    return not _ALONE and torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    """The processes planning together: 1 outside a session and for a process gone on alone, which is what the
    functions below test to become the identity."""
    return torch.distributed.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: rows r, r + W, ... of `windows` ([n, seqlen]); all of them outside a session.
    Interleaved, so ranks get equal shares of any window order."""
    if world() == 1:
        return windows
    if windows.shape[0] < world():
        raise DistributedError(f"{windows.shape[0]} calibration windows for {world()} processes: every process needs "
                               "at least one (more calibration text, or fewer processes)")
    return windows[rank()::world()]


def _fault_check() -> None:
    """WQEDGE_DISTRIBUTED_FAULT_RANK=r: rank r dies (exit status 17) at its first collective: how tests check that a
    lost rank ends the job with a message and no file."""
    f = os.environ.get("WQEDGE_DISTRIBUTED_FAULT_RANK")
    if f is not None and f.strip() == str(rank()):
        os._exit(17)


def _reduce_(t: torch.Tensor, op) -> torch.Tensor:
    if world() == 1:
        return t
    _fault_check()
    if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        moved = t.cuda()
        torch.distributed.all_reduce(moved, op=op)
        t.copy_(moved.cpu())
        return t
    torch.distributed.all_reduce(t, op=op)
    return t


def reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place (and returned)."""
    return _reduce_(t, torch.distributed.ReduceOp.SUM)


def reduce_max_(t: torch.Tensor) -> torch.Tensor:
    return _reduce_(t, torch.distributed.ReduceOp.MAX)


def reduce_sums(*values: float) -> list[float]:
    """Python numbers summed over the ranks (float64)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    reduce_sum_(t)
    return t.tolist()


def owners(costs: list[float]) -> list[int] | None:
    """Which rank computes each of a list of independent jobs (linears of the damage table, linear groups of an
    error-feedback layer): longest first to the least-loaded rank, ties to the lower index, so every rank derives the
    same assignment. None outside a session (every job is this process's)."""
    if world() == 1:
        return None
    load = [0.0] * world()
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world()), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def broadcast_object(obj, src: int):
    """`obj` of rank `src` on every rank (pickled: numpy arrays, dicts)."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def merge_dicts(d: dict) -> dict:
    """The union of every rank's dict (keys computed by one rank each)."""
    if world() == 1:
        return d
    parts = [None] * world()
    torch.distributed.all_gather_object(parts, d)
    out = {}
    for part in parts:
        out.update(part)
    return out


class _Failed:
    """What `on_writer` hands the other ranks when rank 0's step raised: its error, raised again on every rank."""

    def __init__(self, error: BaseException):
        self.error = error


def on_writer(fn, *args, **kw):
    """fn(*args, **kw) computed by rank 0 alone — its own collectives off, so it sees every calibration window as one
    process does — and handed to every rank (`broadcast_object`); the other ranks wait for it. For the planning steps
    that do not split into sums over windows. Outside a session: fn(*args, **kw). An error of rank 0's step is raised
    on every rank (so none waits for a collective that will not come)."""
    global _ALONE
    if world() == 1:
        return fn(*args, **kw)
    out = None
    if rank() == 0:
        _ALONE = True
        try:
            out = fn(*args, **kw)
        except Exception as e:      # noqa: BLE001 (handed over, raised again below on every rank)
            out = _Failed(e)
        finally:
            _ALONE = False
    out = broadcast_object(out, 0)
    if isinstance(out, _Failed):
        raise out.error
    return out


def writer_alone() -> bool:
    """After the last collective step: rank 0 goes on alone (writing, checking the written file: every statistic
    from here on is its own, windows unsharded) while the others wait at the end of the session. Returns whether
    this process is the writer; the others must write nothing."""
    global _ALONE
    if not active():
        return True
    if rank() != 0:
        return False
    _ALONE = True
    return True


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextmanager
def session(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Open the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    with NCCL when CUDA is present, else gloo; close it on the way out. DistributedError without that environment."""
    if not _launched_by_torchrun():
        raise DistributedError("--distributed runs under torchrun (one process per GPU, or CPU processes): "
                               "`torchrun --nproc-per-node N -m wqedge plan ... --distributed`; RANK, "
                               "WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set")
    if not torch.distributed.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _ALONE
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield
        torch.distributed.barrier()     # rank 0 may still be writing: nobody leaves before it is done
    finally:
        _ALONE = False
        torch.distributed.destroy_process_group()
