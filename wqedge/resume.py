"""Checkpoints of planning's statistics, one file per decoder layer, so a job that failed resumes (issue 18).

`wqedge plan/convert --resume-dir DIR`: as planning computes them, each decoder layer's input statistics
(`inputs-L.pt`), the LM-loss gradient statistics (`gradients.pt`) and the damage table (`table.pt`) are saved in
DIR/<key>/, where the key hashes everything they depend on (the checkpoint's fingerprint, the calibration windows'
tokens, the statistics and table options). A rerun with the same inputs loads what is there and computes only the
rest; other inputs get another key, so a stale file is never read. Under --distributed the files hold the reduced
statistics (every rank's are the same), rank 0 writes them, and rank 0 decides once which exist and tells the
others, so every rank skips the same steps (their collectives stay matched); on several hosts DIR must be a folder
every process reads (a shared filesystem). Each file is written whole or not at all (a temporary file, then a
rename), so a job killed while saving leaves no torn checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import distributed

FORMAT = 1     # bump when what a file holds changes: old folders then get another key and are not read


_saved = 0     # checkpoint files this process wrote (for _fault_after_save)


def _fault_after_save() -> None:
    """WQEDGE_RESUME_FAULT_AFTER=n: the process dies (exit status 18) after its n-th checkpoint file: how tests check
    that a killed job resumes. Counted per process."""
    global _saved
    _saved += 1
    n = os.environ.get("WQEDGE_RESUME_FAULT_AFTER")
    if n is not None and _saved >= int(n):
        os._exit(18)


class StatsCheckpoints:
    """The checkpoint folder of one planning job's inputs (see the module docstring)."""

    def __init__(self, root, key: dict, say: Callable[[str], None] | None = None):
        blob = json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str).encode()
        self.dir = Path(root) / hashlib.sha256(blob).hexdigest()[:16]
        self.say = say
        present = None
        if distributed.rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(json.dumps({"format": FORMAT, **key}, sort_keys=True, indent=1,
                                                          default=str) + "\n")
            present = sorted(p.stem for p in self.dir.glob("*.pt"))
        self.present = set(distributed.broadcast_object(present, 0))   # rank 0's view, on every rank
        self.loaded: list[str] = []
        if self.present and say:
            say(f"resuming: {len(self.present)} checkpoint files in {self.dir}")

    def has(self, name: str) -> bool:
        return name in self.present

    def load(self, name: str):
        self.loaded.append(name)
        return torch.load(self.dir / f"{name}.pt", map_location="cpu", weights_only=False)

    def save(self, name: str, obj) -> None:
        """Write `name` atomically (rank 0 only: the others hold the same values)."""
        if distributed.rank() != 0:
            return
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(obj, tmp)
            os.replace(tmp, self.dir / f"{name}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fault_after_save()

    def cached(self, name: str, compute: Callable[[], object]):
        """The checkpoint `name` when present, else compute() saved under that name."""
        if self.has(name):
            return self.load(name)
        obj = compute()
        self.save(name, obj)
        return obj


def tokens_digest(tokens: torch.Tensor) -> str:
    """A short hash of calibration windows (their token ids and shape), for checkpoint keys."""
    t = torch.as_tensor(tokens, dtype=torch.long).contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:16]
