"""atomic_file / atomic_dir: nothing half-written on error, and published files get normal (umask) permissions.
FileLock: one holder at a time across processes; a waiter is told whom it waits for; a killed holder frees it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from chunkpolicy.atomic import FileLock, LockTimeout, atomic_dir, atomic_file


def test_atomic_file_mode_and_failure(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "r.json") as tmp:
            tmp.write_text("{}")
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        with pytest.raises(RuntimeError):
            with atomic_file(tmp_path / "r.json") as tmp:
                tmp.write_text("half")
                raise RuntimeError("crash")
        assert (tmp_path / "r.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    finally:
        os.umask(old)


def test_atomic_dir_mode_and_replace(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_text("1")
        assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "b").write_text("2")
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["b"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    finally:
        os.umask(old)


def _hold(path, seconds: float) -> subprocess.Popen:
    """Another process that takes the lock, says so on stdout, and holds it for ``seconds``."""
    code = (f"import sys, time; from chunkpolicy.atomic import FileLock\n"
            f"with FileLock({str(path)!r}):\n    print('held', flush=True); time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_file_lock_waits_for_its_holder_then_takes_it(tmp_path):
    lock = tmp_path / "sub" / "train.lock"
    holder = _hold(lock, 1.0)
    told = []
    t0 = time.monotonic()
    with FileLock(lock, on_wait=told.append):
        waited = time.monotonic() - t0
        assert lock.read_text() == str(os.getpid())  # the holder's pid, for the next waiter's message
    assert holder.wait(10) == 0
    assert told == [str(holder.pid)] and waited > 0.3  # told once, with the holder's pid; waited for its release
    assert lock.read_text() == ""


def test_file_lock_timeout_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    lock = tmp_path / "row.lock"
    holder = _hold(lock, 60)
    with pytest.raises(LockTimeout, match=f"pid {holder.pid}") as e:
        with FileLock(lock, timeout=0.2):
            pass
    assert e.value.holder == str(holder.pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    with FileLock(lock, timeout=2.0):  # the kernel dropped the dead process's lock
        pass


def test_file_lock_without_create_parent_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        with FileLock(tmp_path / "deleted_store.zarr" / ".write.lock", create_parent=False):
            pass
    assert not (tmp_path / "deleted_store.zarr").exists()  # a lock never recreates a deleted store
