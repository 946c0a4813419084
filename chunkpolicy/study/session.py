"""What every stage of a study row shares: the session deadline (``--session-minutes``) and atomic JSON writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from chunkpolicy.atomic import atomic_file

__all__ = ["Log", "SessionLimit", "Deadline", "write_json"]

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
