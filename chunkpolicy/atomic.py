"""Write-then-rename helpers: a crash never leaves a half-written store, checkpoint or results file behind;
:func:`read_json`, which reads such files back with an error that names the file; and :class:`FileLock`, the one
advisory inter-process lock (an episode store's writer, a study row's training or data collection)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, base: int) -> None:
    """mkstemp/mkdtemp create owner-only (0600/0700) entries; give the final file the mode a plain open() would."""
    os.chmod(path, base & ~_umask())


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; on success it replaces ``path`` (an old one is removed only after the
    new one is in place), on any error it is deleted and ``path`` is untouched."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish_mode(tmp, 0o777)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path (same folder and suffix as ``path``) to write; renamed over ``path`` on success."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}.", suffix=dst.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp), 0o666)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """``json.loads`` of a file; a missing file or corrupt JSON is one error naming the file."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from None


class LockTimeout(TimeoutError):
    """:class:`FileLock` gave up waiting; ``holder`` is the pid written by the process holding it (or "unknown")."""

    def __init__(self, path: Path, holder: str, waited: float) -> None:
        super().__init__(f"{path}: held by another process (pid {holder}); gave up after waiting {waited:g}s")
        self.path, self.holder, self.waited = path, holder, waited


class FileLock:
    """An exclusive advisory ``fcntl.flock`` on ``path`` (created if missing), between processes on one machine.

    The holder writes its pid into the file, so a waiting process can say whom it waits for. ``timeout`` seconds
    (None: wait as long as it takes; 0: fail at once) before :class:`LockTimeout`; ``on_wait(holder_pid)`` is called
    once when the lock is busy. The lock is released when the holder exits in any way (the kernel drops a dead
    process's flock), so a killed holder never leaves it stuck. ``create_parent=False``: a missing folder is an error
    (a lock inside a store must not recreate a deleted store). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, timeout: float | None = None,
                 on_wait: Callable[[str], None] | None = None, create_parent: bool = True) -> None:
        self.path, self.timeout, self.on_wait, self.create_parent = Path(path), timeout, on_wait, create_parent
        self._fd: int | None = None

    def holder(self, fd: int) -> str:
        try:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self) -> "FileLock":
        if self.create_parent:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0, told = time.monotonic(), False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - t0
                    if self.timeout is not None and waited >= self.timeout:
                        raise LockTimeout(self.path, self.holder(fd), self.timeout) from None
                    if not told and self.on_wait is not None:
                        self.on_wait(self.holder(fd))
                        told = True
                    time.sleep(0.02 if waited < 1 else 0.25)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor releases the flock
