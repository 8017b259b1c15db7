"""Atomic output: a file appears under its final name complete, or not at all.

Nothing is left behind on failure: not the hidden temporary file, not the folders made for the output.
Errors name the file the user asked for, never the temporary one, and a full disk says so.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

LOW_SPACE_BYTES = 1 << 20  # a write that failed with less than this free is reported as a full disk


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder; return the folders this call created, deepest first (to remove them on failure)."""
    created = []
    p = folder
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _explain(e: OSError, path: Path, tmp: str | None) -> OSError:
    """The same failure, told about `path` (the user's name) rather than the temporary file; an error
    about some other file (an input read inside the block) is returned unchanged."""
    ours = tmp is None or e.filename in (tmp, str(path)) or e.errno in (errno.ENOSPC, errno.EDQUOT) or e.errno is None
    if not ours:
        return e
    if isinstance(e, PermissionError):
        return PermissionError(e.errno, f"cannot write {path}: permission denied in {path.parent}")
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and tmp is not None:
        try:
            full = shutil.disk_usage(path.parent).free < LOW_SPACE_BYTES
        except OSError:
            pass
    if full:
        return OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device (the partial file was "
                                     "removed)")
    msg = e.strerror or str(e)
    if tmp is not None:
        msg = msg.replace(tmp, str(path))
    return OSError(e.errno, f"cannot write {path}: {msg}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` on success, delete it (and any folder
    made for it) on any failure. OSErrors are re-raised with messages that name `path`."""
    path = Path(path)
    created = []
    tmp = None
    try:
        created = _make_parents(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError):
            told = _explain(e, path, tmp)
            if told is not e:
                raise told from e
        raise


def terminate_as_interrupt() -> None:
    """Make SIGTERM (and SIGHUP) unwind like Ctrl-C, so `finally` blocks and atomic_output clean up
    instead of the process vanishing with a half-written temporary file. For command-line entry points."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signal.Signals(signum).name}")
    for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            with contextlib.suppress(ValueError, OSError):  # not the main thread, or not settable
                signal.signal(s, handler)
