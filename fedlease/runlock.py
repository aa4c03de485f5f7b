"""One run per output folder at a time: a second run with the same `output_dir` (and so the same
checkpoints) fails at once with a clear error instead of deleting the first one's work.

An advisory `flock` on <output_dir>/.run.lock, held for the whole pipeline run or stage; the kernel
releases it when the process ends, however it ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class RunLocked(RuntimeError):
    """Another run holds this output folder."""


#: folders this process holds -> (fd, owning thread): the owner may take it again (a stage inside run_all,
#: a Prefect subflow); another thread of this process is refused like another process
_HELD: dict[str, tuple[int, int]] = {}


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    folder = Path(output_dir).resolve()
    key = str(folder)
    if key in _HELD:
        if _HELD[key][1] == threading.get_ident():
            yield
            return
        raise RunLocked(f"output_dir {folder}: in use by another run in this process (pid {os.getpid()}); give this "
                        "run its own output_dir (--set output_dir=...)")
    path = folder / ".run.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        from fedlease.io import ArtifactError

        raise ArtifactError(f"{folder}: cannot write ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLocked(f"output_dir {folder}: in use by another run ({holder}); wait for it, or give this run its "
                        "own output_dir (--set output_dir=...)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _HELD[key] = (fd, threading.get_ident())
    try:
        yield
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
