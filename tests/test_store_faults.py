"""Fault injection on the episode store (issue 14): concurrent writers, damaged chunks, stale stats, `data verify`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from chunkpolicy import cli
from chunkpolicy.data.store import EpisodeStore, StoreCorruptError, StoreLockedError
from chunkpolicy.data.synthetic import make_spec, synthetic_episode

SPEC = make_spec("arm", action_dim=4, state_dim=5, cameras=("top", "wrist"))
HW = (16, 24)


def _new(tmp_path, name="s.zarr"):
    return EpisodeStore.create(tmp_path / name, SPEC, fps=10, image_shapes={"top": HW, "wrist": HW})


def _tagged_episode(writer: int, k: int, T: int = 4) -> dict:
    """An episode whose every value says which writer and which of its episodes it is (and which frame)."""
    frame = np.arange(T, dtype=np.float32)[:, None]
    img = np.empty((T, *HW, 3), dtype=np.uint8)
    img[:] = (writer * 60 + k) % 256
    img[:, 0, 0, 0] = np.arange(T)
    return {
        "action": np.repeat(writer * 1000 + k * 10 + frame, SPEC.action_dim, 1).astype(np.float32),
        "state": np.repeat(-(writer * 1000 + k * 10 + frame), SPEC.state_dim, 1).astype(np.float32),
        "images": {"top": img, "wrist": 255 - img},
        "task": f"writer {writer}",
    }


def _writer(path: str, start, writer: int, n: int, seeds_from: int | None) -> None:
    """One appending process. ``seeds_from`` set: a `collect --resume` style appender (opened once at start, if_absent)."""
    store = EpisodeStore.open(path, mode="a", lock_timeout=60)
    start.wait(60)  # every writer has its store open before any appends: they race from here
    for k in range(n):
        if seeds_from is None:
            store.append_episode(_tagged_episode(writer, k), seed=writer * 100 + k)
        else:  # both appenders try the same (task, seed) pairs, as two `collect --resume` runs of one command do
            ep = _tagged_episode(0, k)
            store.append_episode(ep, seed=seeds_from + k, if_absent=True)


def _run_writers(path, args_list):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(args_list))
    procs = [ctx.Process(target=_writer, args=(str(path), start, *a)) for a in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_two_writer_processes_keep_every_episode_intact(tmp_path):
    store = _new(tmp_path)
    n = 12
    _run_writers(store.path, [(1, n, None), (2, n, None)])
    s = EpisodeStore.open(store.path)
    assert s.num_episodes == 2 * n and sorted(s.tasks) == ["writer 1", "writer 2"]
    seen = set()
    for i in range(s.num_episodes):
        ep = s.read_episode(i)
        w, k = divmod(ep["seed"], 100)
        assert ep["task"] == f"writer {w}"  # its own task label
        want = _tagged_episode(w, k)
        np.testing.assert_array_equal(ep["action"], want["action"])  # its own actions, state and frames
        np.testing.assert_array_equal(ep["state"], want["state"])
        for cam in SPEC.cameras:
            np.testing.assert_array_equal(ep["images"][cam], want["images"][cam])
        seen.add((w, k))
    assert seen == {(w, k) for w in (1, 2) for k in range(n)}
    assert cli.main(["data", "verify", str(store.path)]) == 0


def test_two_resume_style_appenders_neither_fails_nor_duplicates(tmp_path):
    store = _new(tmp_path)
    store.append_episode(_tagged_episode(0, 0), seed=0)  # an interrupted collection left one episode
    _run_writers(store.path, [(0, 8, 0), (0, 8, 0)])
    s = EpisodeStore.open(store.path)
    assert sorted(s.episode_seed(i) for i in range(len(s))) == list(range(8))
    for i in range(len(s)):
        np.testing.assert_array_equal(s.read_episode(i)["action"], _tagged_episode(0, s.episode_seed(i))["action"])


def test_second_writer_waits_then_fails_naming_the_store(tmp_path):
    store = _new(tmp_path)
    other = EpisodeStore.open(store.path, mode="a", lock_timeout=0.2)
    with store.write_lock():
        with pytest.raises(StoreLockedError, match=rf"{store.path}.*pid {os.getpid()}.*writing to this episode store"):
            other.append_episode(_tagged_episode(1, 0))
        with pytest.raises(StoreLockedError):
            other.compute_stats(save=True)
        assert EpisodeStore.open(store.path).num_episodes == 0  # readers are not blocked
    assert other.append_episode(_tagged_episode(1, 0)) == 0  # released



def test_cli_write_on_a_locked_store_is_one_clear_error(tmp_path, capsys, monkeypatch):
    store = _new(tmp_path)
    store.append_episode(_tagged_episode(1, 0))
    monkeypatch.setenv("CHUNKPOLICY_STORE_LOCK_TIMEOUT", "0.1")
    with EpisodeStore.open(store.path, mode="a").write_lock():
        assert cli.main(["data", "stats", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkpolicy: error:") and str(store.path) in err and "writing to this episode store" in err


def _store_with_episodes(tmp_path, n=3, T=4, stats=False):
    store = _new(tmp_path)
    for k in range(n):
        store.append_episode(_tagged_episode(1, k, T), seed=k)
    if stats:
        store.compute_stats()
    return store


CHUNKS = {  # key -> (chunk file under the store, how the damage is met by a reader)
    "images/top": ("data/images/top/c/9/0/0/0", lambda p: EpisodeStore.open(p).read_frames("images/top", np.array([8, 9]))),
    "action": ("data/action/c/0/0", lambda p: EpisodeStore.open(p).read("action", 0, 2)),
    "state": ("data/state/c/0/0", lambda p: EpisodeStore.open(p).read_episode(1)),
    "meta/episode_task": ("meta/episode_task/c/0", lambda p: EpisodeStore.open(p)),
}


def _damage(f: Path, how: str) -> None:
    b = bytearray(f.read_bytes())
    if how == "delete":
        f.unlink()
    elif how == "flip":
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    else:
        f.write_bytes(bytes(b[: len(b) - 3]))


@pytest.mark.parametrize("how", ["delete", "flip", "truncate"])
@pytest.mark.parametrize("key", list(CHUNKS))
def test_damaged_chunk_is_one_clear_error_and_verify_fails(tmp_path, capsys, key, how):
    store = _store_with_episodes(tmp_path)
    rel, read = CHUNKS[key]
    _damage(store.path / rel, how)
    with pytest.raises(StoreCorruptError) as ei:
        read(store.path)
    msg = str(ei.value)
    assert str(store.path) in msg and key in msg and "episode" in msg and "frame" in msg, msg
    if how == "delete":
        assert "missing" in msg
    capsys.readouterr()
    assert cli.main(["data", "verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and key in out, out


def test_all_zero_chunks_are_written_and_read_back(tmp_path):
    """Format v2 writes empty chunks, so a missing chunk can never be legitimate (all-black frames, zero actions)."""
    store = _new(tmp_path)
    ep = _tagged_episode(0, 0)
    ep["action"][:] = 0
    ep["images"]["top"][:] = 0
    store.append_episode(ep)
    assert (store.path / "data/images/top/c/0/0/0/0").exists() and (store.path / "data/action/c/0/0").exists()
    again = EpisodeStore.open(store.path).read_episode(0)
    assert not again["action"].any() and not again["images"]["top"].any()
    assert cli.main(["data", "verify", str(store.path)]) == 0


def test_append_makes_stats_stale_and_info_says_so(tmp_path, capsys):
    from chunkpolicy.data.commands import data_info

    store = _store_with_episodes(tmp_path, stats=True)
    assert EpisodeStore.open(store.path).stats["action"]["max"].max() > 0
    assert "fresh" in data_info(store.path)
    big = _tagged_episode(9, 9)
    store.append_episode(big)
    again = EpisodeStore.open(store.path)
    assert again.stats_status() == "stale"
    with pytest.raises(ValueError, match="stale.*chunkpolicy data stats"):
        again.stats
    assert "STALE" in data_info(store.path)
    capsys.readouterr()
    assert cli.main(["data", "verify", str(store.path)]) == 1
    assert "stats: stale" in capsys.readouterr().out
    assert cli.main(["data", "stats", str(store.path)]) == 0
    assert EpisodeStore.open(store.path).stats["action"]["max"].max() == big["action"].max()
    assert cli.main(["data", "verify", str(store.path)]) == 0


def test_verify_nan_in_data_and_repair_of_a_damaged_tail(tmp_path, capsys):
    store = _store_with_episodes(tmp_path, n=3, T=4)
    # the last episode lost a frame chunk (e.g. a crash after the commit): --repair drops it, atomically
    (store.path / "data/images/wrist/c/10/0/0/0").unlink()
    assert cli.main(["data", "verify", str(store.path)]) == 1
    assert "images/wrist" in capsys.readouterr().out
    assert cli.main(["data", "verify", "--repair", str(store.path)]) == 0
    assert "dropped 1 damaged tail episode" in capsys.readouterr().out
    s = EpisodeStore.open(store.path)
    assert s.num_episodes == 2 and s.num_frames == 8
    np.testing.assert_array_equal(s.read_episode(1)["action"], _tagged_episode(1, 1)["action"])
    assert s.stats_status() == "none"
    # the repaired store stays appendable (the leftover frames are overwritten)
    EpisodeStore.open(store.path, mode="a").append_episode(_tagged_episode(1, 7))
    assert cli.main(["data", "verify", str(store.path)]) == 0
    # a damaged episode that is not at the tail: --repair refuses and drops nothing
    (store.path / "data/images/top/c/1/0/0/0").unlink()
    capsys.readouterr()
    assert cli.main(["data", "verify", "--repair", str(store.path)]) != 0
    assert "not a contiguous tail" in capsys.readouterr().err
    assert EpisodeStore.open(store.path).num_episodes == 3


def test_verify_flags_nan_written_behind_the_validator(tmp_path, capsys):
    import zarr

    store = _store_with_episodes(tmp_path)
    with zarr.config.set({"array.write_empty_chunks": True}):
        arr = zarr.open_array(str(store.path / "data/state"), mode="r+")
        arr[5, 2] = np.nan
    assert cli.main(["data", "verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "state: 1 NaN/inf values, first at frame 5 dim 2 (episode 1, frame 1 of it)" in out


def _write_v1_store(path: Path, episodes: list[dict]) -> None:
    """A store exactly as format v1 wrote it: default codecs (no checksum), all-zero chunks skipped, v1 attributes."""
    import zarr
    from zarr.codecs import BloscCodec

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    cat = lambda k: np.concatenate([e[k] for e in episodes])  # noqa: E731
    root.create_group("data").create_array("action", data=cat("action"), chunks=(8192, 4))
    root["data"].create_array("state", data=cat("state"), chunks=(8192, 5))
    imgs = root["data"].create_group("images")
    for cam in SPEC.cameras:
        imgs.create_array(cam, data=np.concatenate([e["images"][cam] for e in episodes]), chunks=(1, *HW, 3),
                          compressors=BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"))
    meta = root.create_group("meta")
    meta.create_array("episode_ends", data=np.cumsum([len(e["action"]) for e in episodes]).astype(np.int64), chunks=(4096,))
    meta.create_array("episode_task", data=np.zeros(len(episodes), np.int32), chunks=(4096,))
    meta.create_array("episode_seed", data=np.arange(len(episodes), dtype=np.int64), chunks=(4096,))
    from chunkpolicy.normalize import compute_stats, stats_to_json

    root.attrs.update({"format": "chunkpolicy.episode_store", "format_version": 1, "embodiment": SPEC.to_dict(),
                       "fps": 10.0, "tasks": ["writer 1"], "num_episodes": len(episodes),
                       "stats": stats_to_json({k: compute_stats(cat(k)) for k in ("action", "state")})})


def test_old_format_store_still_opens_reads_and_verifies(tmp_path, capsys):
    eps = [_tagged_episode(1, k) for k in range(3)]
    eps[1]["images"]["top"][2] = 0  # an all-black frame: v1 never wrote its chunk
    path = tmp_path / "old.zarr"
    _write_v1_store(path, eps)
    assert not (path / "data/images/top/c/6/0/0/0").exists()
    s = EpisodeStore.open(path)
    assert s.format_version == 1 and not s.checksummed
    for i, ep in enumerate(eps):
        got = s.read_episode(i)
        np.testing.assert_array_equal(got["action"], ep["action"])
        np.testing.assert_array_equal(got["images"]["top"], ep["images"]["top"])  # the missing chunk is the black frame
    assert s.stats_status() == "unknown" and s.stats["action"]["max"].max() == eps[2]["action"].max()  # checked
    assert cli.main(["data", "verify", str(path)]) == 0
    assert "no checksums (old store)" in capsys.readouterr().out
    # appending with this version keeps it readable and invalidates its stats
    EpisodeStore.open(path, mode="a").append_episode(_tagged_episode(1, 5))
    s = EpisodeStore.open(path)
    assert s.num_episodes == 4 and s.stats_status() == "stale"
    np.testing.assert_array_equal(s.read_episode(3)["state"], _tagged_episode(1, 5)["state"])
    assert json.loads((path / "zarr.json").read_text())["attributes"]["format_version"] == 1


def test_collect_without_resume_on_an_existing_store_suggests_resume(tmp_path):
    from chunkpolicy.sim import collect as C

    out = tmp_path / "demo.zarr"
    spec = make_spec("arm", action_dim=4, state_dim=5, cameras=("top",))
    EpisodeStore.create(out, spec, fps=10, image_shapes={"top": HW}).append_episode(
        synthetic_episode(spec, 3, HW, np.random.default_rng(0), "t"))
    with pytest.raises(FileExistsError) as ei:
        C._open_store(out, spec, 10.0, {"top": HW}, overwrite=False, resume=False)
    msg = str(ei.value)
    assert "--resume" in msg and "1 episodes are kept" in msg and "overwrite" not in msg
    assert len(EpisodeStore.open(out)) == 1


def test_training_on_an_empty_store_names_the_store_and_key(tmp_path):
    """Regression (issue 14, weak errors): an empty store gave "cannot split a store without episodes"."""
    from chunkpolicy.config import load_config
    from chunkpolicy.data.synthetic import make_spec
    from chunkpolicy.training.experiment import prepare

    spec = make_spec("arm", 3, 2, ("top",))
    EpisodeStore.create(tmp_path / "empty.zarr", spec, 10.0, {"top": (16, 16)})
    cfg = load_config(None, ["model.backbone=tiny", "model.horizon=4", f"data.datasets=[{{path: {tmp_path / 'empty.zarr'}}}]",
                             f"train.output_dir={tmp_path / 'run'}", "train.progress=false"])
    with pytest.raises(ValueError, match=r"data\.datasets\.0\.path: .*empty\.zarr has no episodes"):
        prepare(cfg)
