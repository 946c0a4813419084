"""atomic_file / atomic_dir: nothing half-written on error, and published files get normal (umask) permissions."""

import os

import pytest

from chunkpolicy.atomic import atomic_dir, atomic_file


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
