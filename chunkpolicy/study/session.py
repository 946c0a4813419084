"""What every stage of a study row shares: the session deadline (``--session-minutes``), atomic JSON writes, the
locks that let rows run in parallel processes, and how many rows share the GPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from chunkpolicy.atomic import FileLock, atomic_file

__all__ = ["Log", "SessionLimit", "Deadline", "write_json", "study_lock", "gpu_shared_by", "SHARED_GPU_ENV"]

# set by benchmarks/study_gpu.sh for rows it runs in parallel streams: how many row processes share the GPU
SHARED_GPU_ENV = "CHUNKPOLICY_STUDY_SHARED_GPU"

Log = Callable[[str], None]


class SessionLimit(Exception):
    """The session's time (``--session-minutes``) ran out before the row was done; what was done is kept, and the
    same command continues the row."""


class Deadline:
    """The end of this session (``None``: no limit), as seconds left on a monotonic clock."""

    def __init__(self, minutes: float | None = None) -> None:
        self.end = None if minutes is None else time.monotonic() + 60.0 * float(minutes)

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def check(self, what: str, need_s: float = 0.0) -> None:
        """:class:`SessionLimit` when no more than ``need_s`` seconds are left (``what`` would not finish)."""
        left = self.left()
        if left is not None and left <= need_s:
            raise SessionLimit(f"session time is up before {what}" if need_s <= 0 else
                               f"{max(left, 0) / 60:.1f} session minutes left, {need_s / 60:.1f} needed, before {what}")


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON at ``path``, written to a temp file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def study_lock(path: Path, what: str, log: Log) -> FileLock:
    """Serialize ``what`` between ``study run`` processes running at the same time (parallel streams of
    ``benchmarks/study_gpu.sh``): the second waits for the first, then finds the work done and reuses it."""
    return FileLock(path, on_wait=lambda pid: log(f"[{what}] waiting for process {pid}, which holds {path}"))


def gpu_shared_by() -> int:
    """How many row processes share this GPU (``CHUNKPOLICY_STUDY_SHARED_GPU``, default 1): their minutes, samples/s
    and chunk latencies are then not solo figures, and the study's GPU total counts each such row's minutes / n."""
    raw = os.environ.get(SHARED_GPU_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{SHARED_GPU_ENV}={raw!r}: expected a positive int") from None
    if n < 1:
        raise ValueError(f"{SHARED_GPU_ENV}={raw!r}: expected a positive int")
    return n
