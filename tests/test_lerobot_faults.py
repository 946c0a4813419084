"""Fault injection for LeRobot import / export (issue 14): metadata that disagrees with the data, missing local files
(never a download), kills and failures part-way (nothing half-written), --overwrite, NaN, feature mismatch, corrupt
JSON. The datasets are built locally with `lerobot` itself, as in test_lerobot_io.py."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot.datasets.lerobot_dataset", reason="needs the lerobot extra")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from chunkpolicy.cli import main as cli_main  # noqa: E402
from chunkpolicy.data import lerobot_io  # noqa: E402
from chunkpolicy.data.lerobot_io import LocalOnlyError, export_lerobot, import_lerobot  # noqa: E402
from chunkpolicy.data.store import EpisodeStore  # noqa: E402

EPISODES = (4, 5, 3, 6)
DATA = "data/chunk-000/file-000.parquet"
REPO = Path(__file__).resolve().parents[1]


def _build(root: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    feats = {
        "action": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "gripper"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "observation.images.top": {"dtype": "image", "shape": (8, 8, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/faults", fps=10, features=feats, root=root, robot_type="toybot", use_videos=False)
    written = []
    for e, T in enumerate(EPISODES):
        ep = {
            "action": rng.normal(size=(T, 3)).astype(np.float32),
            "state": rng.normal(size=(T, 2)).astype(np.float32),
            "images": rng.integers(0, 256, size=(T, 8, 8, 3), dtype=np.uint8),
            "task": f"task {e % 2}",
        }
        for t in range(T):
            ds.add_frame({"action": ep["action"][t], "observation.state": ep["state"][t], "observation.images.top": ep["images"][t], "task": ep["task"]})
        ds.save_episode()
        written.append(ep)
    ds.finalize()
    return written


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "lr"
    return root, _build(root)


@pytest.fixture
def lr(base, tmp_path):
    """A fresh copy of the 4-episode dataset for each test (edit it freely)."""
    dst = tmp_path / "lr"
    shutil.copytree(base[0], dst)
    return dst


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse every connection and hub download attempt."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a local-only test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    return attempts


def _edit_info(root: Path, **fields) -> None:
    p = root / "meta" / "info.json"
    info = json.loads(p.read_text())
    info.update(fields)
    p.write_text(json.dumps(info, indent=4))


def _edit_data(root: Path, column: str, fn) -> None:
    """Rewrite one column of the data parquet (schema and its HF metadata kept)."""
    p = root / DATA
    t = pq.read_table(p)
    col = t.column(column).combine_chunks()
    new = fn(col)
    t = t.set_column(t.schema.get_field_index(column), t.schema.field(column), new)
    pq.write_table(t, p)


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def _assert_store_matches(store: EpisodeStore, written: list[dict]) -> None:
    assert store.num_episodes == len(written)
    for i, ep in enumerate(written):
        got = store.read_episode(i)
        assert np.array_equal(got["action"], ep["action"]) and np.array_equal(got["state"], ep["state"])
        assert np.array_equal(got["images"]["top"], ep["images"]) and got["task"] == ep["task"]


# -- meta/info.json edited --------------------------------------------------------------------------------------------
def test_total_episodes_edited_is_an_error_unless_allowed(lr, base, tmp_path, capsys, no_network):
    _edit_info(lr, total_episodes=2)
    out = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match=r"meta/info.json: total_episodes is 2, the data has 4 episodes"):
        import_lerobot(lr, out, progress=False)
    assert not out.exists() and not _partials(out)
    assert cli_main(["data", "import-lerobot", str(lr), str(out)]) == 2
    err = capsys.readouterr().err
    assert "total_episodes" in err and "--allow-metadata-mismatch" in err and not out.exists()
    # the explicit flag: the data wins (all 4 episodes), with a warning
    with pytest.warns(UserWarning, match="total_episodes"):
        store = import_lerobot(lr, out, progress=False, allow_metadata_mismatch=True)
    _assert_store_matches(store, base[1])
    # more episodes claimed than there are: lerobot would go to the hub for them; we import the data, offline
    _edit_info(lr, total_episodes=6, total_frames=99)
    with pytest.raises(ValueError, match="total_episodes is 6") as e:
        import_lerobot(lr, tmp_path / "t.zarr", progress=False)
    assert "total_frames is 99, the data has 18 rows" in str(e.value)
    assert cli_main(["data", "import-lerobot", str(lr), str(tmp_path / "t.zarr"), "--allow-metadata-mismatch"]) == 0
    _assert_store_matches(EpisodeStore.open(tmp_path / "t.zarr"), base[1])
    assert no_network == []


def test_fps_edited_is_checked_against_timestamps(lr, tmp_path):
    _edit_info(lr, fps=30)
    with pytest.raises(ValueError, match=r"meta/info.json: fps is 30 .* episode 0 has timestamps 0.1 s apart") as e:
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert "the data is 10 fps" in str(e.value)
    assert not (tmp_path / "s.zarr").exists()
    with pytest.warns(UserWarning, match="fps is 30"):
        store = import_lerobot(lr, tmp_path / "s.zarr", progress=False, allow_metadata_mismatch=True)
    assert store.fps == 10 and store.spec.control_hz == 10  # the timestamps' rate, not the edited one


def test_irregular_timestamps_name_the_episode_even_when_allowed(lr, tmp_path):
    def shift(col):  # episode 2 (rows 9..11): frame 2 comes 0.05 s late
        ts = col.to_numpy().copy()
        ts[11] += 0.05
        return pa.array(ts, type=col.type)

    _edit_data(lr, "timestamp", shift)
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"episode 2 has timestamps 0.15 s apart \(frame 1 -> 2\)"):
            import_lerobot(lr, tmp_path / "s.zarr", progress=False, allow_metadata_mismatch=allow)
    assert not (tmp_path / "s.zarr").exists()


def test_episode_lengths_in_meta_episodes_are_cross_checked(lr, tmp_path):
    p = next((lr / "meta" / "episodes").glob("*/*.parquet"))
    t = pq.read_table(p)
    lengths = t.column("length").to_numpy().copy()
    lengths[1] = 7
    t = t.set_column(t.schema.get_field_index("length"), "length", pa.array(lengths))
    pq.write_table(t, p)
    with pytest.raises(ValueError, match="meta/episodes: episode 1 has length 7, the data has 5 frames"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)


# -- missing local files: named, never downloaded ----------------------------------------------------------------------
def test_missing_parquet_is_named_and_never_downloaded(lr, tmp_path, capsys, no_network):
    (lr / DATA).unlink()
    with pytest.raises(LocalOnlyError, match=r"data/chunk-000/file-000.parquet: missing .*never downloads"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert cli_main(["data", "import-lerobot", str(lr), str(tmp_path / "s.zarr")]) == 2
    assert "file-000.parquet: missing" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists() and no_network == []


def test_missing_episode_metadata_is_named(lr, tmp_path, no_network):
    shutil.rmtree(lr / "meta" / "episodes")
    with pytest.raises(LocalOnlyError, match="meta/episodes"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert no_network == []


def test_lerobot_runs_with_the_hub_refused(lr, no_network):
    """Belt and braces: were lerobot to want a download anyway, the guard refuses it without touching the network."""
    (lr / DATA).unlink()
    with lerobot_io._offline(lr), pytest.raises(LocalOnlyError, match="reads local files only"):
        LeRobotDataset("local/faults", root=lr)
    assert no_network == []
    import huggingface_hub.constants as hc
    import lerobot.datasets.lerobot_dataset as lds

    assert lds.snapshot_download is not None and lds.snapshot_download.__name__ == "snapshot_download"  # restored
    assert hc.HF_HUB_OFFLINE == (os.environ.get("HF_HUB_OFFLINE") == "1")


# -- atomic: kills and failures part-way -----------------------------------------------------------------------------
def _run_killed(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300)


def test_kill_during_import_leaves_nothing_and_rerun_works(lr, base, tmp_path):
    out = tmp_path / "s.zarr"
    old = import_lerobot(lr, out, progress=False)  # an existing store that --overwrite would replace
    before = [old.read_episode(i)["action"] for i in range(old.num_episodes)]
    for overwrite in (False, True):
        dst = out if overwrite else tmp_path / "fresh.zarr"
        r = _run_killed(f"""
            import os, signal
            from chunkpolicy.data.store import EpisodeStore
            from chunkpolicy.data.lerobot_io import import_lerobot
            orig, calls = EpisodeStore.append_episode, []
            def append(self, *a, **k):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return orig(self, *a, **k)
            EpisodeStore.append_episode = append
            import_lerobot({str(lr)!r}, {str(dst)!r}, progress=False, overwrite={overwrite})
        """)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert _partials(dst), "the killed run leaves its partial sibling behind (removed by the next run)"
        if overwrite:  # the old store is untouched
            kept = EpisodeStore.open(out)
            assert all(np.array_equal(kept.read_episode(i)["action"], a) for i, a in enumerate(before))
            _assert_store_matches(kept, base[1])
        else:
            assert not dst.exists()
        store = import_lerobot(lr, dst, progress=False, overwrite=overwrite)  # re-run works and cleans up
        _assert_store_matches(store, base[1])
        assert not _partials(dst)


def test_kill_between_the_renames_of_an_overwrite_restores_the_old_copy(lr, base, tmp_path):
    """Killed after moving the old store aside but before moving the new one in: the next run puts the old one back."""
    out = tmp_path / "s.zarr"
    import_lerobot(lr, out, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(out, out.with_name(f".{out.name}.partial-{dead.pid}-old"))
    with pytest.warns(UserWarning, match="restored the previous copy"), pytest.raises(FileExistsError, match="--overwrite"):
        import_lerobot(lr, out, progress=False)
    _assert_store_matches(EpisodeStore.open(out), base[1])
    assert not _partials(out)


def test_failure_during_import_leaves_nothing(lr, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    orig, calls = EpisodeStore.append_episode, []

    def append(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full (injected)")
        return orig(self, *a, **k)

    monkeypatch.setattr(EpisodeStore, "append_episode", append)
    with pytest.raises(RuntimeError, match="injected"):
        import_lerobot(lr, out, progress=False)
    assert not out.exists() and not _partials(out)


def test_kill_during_export_leaves_nothing_and_rerun_works(lr, base, tmp_path):
    store = import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    dst = tmp_path / "exported"
    r = _run_killed(f"""
        import os, signal
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        from chunkpolicy.data.lerobot_io import export_lerobot
        orig, calls = LeRobotDataset.save_episode, []
        def save(self, *a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, *a, **k)
        LeRobotDataset.save_episode = save
        export_lerobot({str(tmp_path / "s.zarr")!r}, {str(dst)!r}, progress=False)
    """)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not dst.exists() and _partials(dst)
    export_lerobot(store, dst, progress=False)
    assert not _partials(dst)
    back = import_lerobot(dst, tmp_path / "back.zarr", progress=False)
    _assert_store_matches(back, base[1])


def test_failure_during_export_leaves_old_dataset_unchanged(lr, tmp_path, monkeypatch):
    store = import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    dst = tmp_path / "exported"
    export_lerobot(store, dst, progress=False)
    snapshot = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    orig, calls = LeRobotDataset.save_episode, []

    def save(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("encoder crashed (injected)")
        return orig(self, *a, **k)

    monkeypatch.setattr(LeRobotDataset, "save_episode", save)
    with pytest.raises(RuntimeError, match="injected"):
        export_lerobot(store, dst, progress=False, overwrite=True)
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == snapshot
    assert not _partials(dst)


def test_overwrite_flag_on_the_cli(lr, tmp_path, capsys):
    out, back = tmp_path / "s.zarr", tmp_path / "back"
    assert cli_main(["data", "import-lerobot", str(lr), str(out)]) == 0
    assert cli_main(["data", "import-lerobot", str(lr), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert cli_main(["data", "import-lerobot", str(lr), str(out), "--overwrite"]) == 0
    assert EpisodeStore.open(out).num_episodes == 4
    assert cli_main(["data", "export-lerobot", str(out), str(back)]) == 0
    assert cli_main(["data", "export-lerobot", str(out), str(back)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["data", "export-lerobot", str(out), str(back), "--overwrite"]) == 0
    assert LeRobotDataset("local/x", root=back).num_episodes == 4
    assert not _partials(out) and not _partials(back)


# -- weak errors ------------------------------------------------------------------------------------------------------
def test_nan_error_names_episode_and_frame(lr, tmp_path):
    def poison(col):  # episode 1 starts at row 4: its frame 2 is row 6
        a = col.flatten().to_numpy().reshape(len(col), 3).copy()
        a[6, 1] = np.nan
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), type=pa.float32()), 3)

    _edit_data(lr, "action", poison)
    with pytest.raises(ValueError, match=r"action contains NaN or inf \(first at episode 1, frame 2, dim 1"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_feature_shape_mismatch_names_the_feature(lr, tmp_path, capsys):
    p = lr / "meta" / "info.json"
    info = json.loads(p.read_text())
    info["features"]["action"]["shape"] = [4]
    info["features"]["action"]["names"] = ["x", "y", "z", "gripper"]
    p.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"feature 'action': meta/info.json says shape \[4\], the data has 3 values per frame"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert cli_main(["data", "import-lerobot", str(lr), str(tmp_path / "s.zarr")]) == 2
    assert "feature 'action'" in capsys.readouterr().err


def test_dataset_generation_error_becomes_one_clear_error(lr, tmp_path, monkeypatch):
    """Should lerobot's own load still fail on the schema, the error is a ValueError, not DatasetGenerationError."""
    p = lr / "meta" / "info.json"
    info = json.loads(p.read_text())
    info["features"]["action"]["shape"] = [4]
    p.write_text(json.dumps(info))
    monkeypatch.setattr(lerobot_io, "_check_schema", lambda *a, **k: None)
    with pytest.raises(ValueError, match="does not match the features of meta/info.json"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)


@pytest.mark.parametrize("name", ["info.json", "stats.json"])
def test_corrupt_json_names_the_file(lr, tmp_path, name, capsys):
    p = lr / "meta" / name
    p.write_text(p.read_text()[:40])
    with pytest.raises(ValueError, match=rf"meta/{name}: corrupt JSON"):
        import_lerobot(lr, tmp_path / "s.zarr", progress=False)
    assert cli_main(["data", "import-lerobot", str(lr), str(tmp_path / "s.zarr")]) == 2
    assert f"{name}: corrupt JSON" in capsys.readouterr().err
