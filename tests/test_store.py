import json
import pickle

import numpy as np
import pytest
import torch

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store, synthetic_episode

SPEC = make_spec("arm", action_dim=4, state_dim=5, cameras=("top", "wrist"))
HW = (16, 24)


def _episode(T=7, seed=0, task="stack"):
    return synthetic_episode(SPEC, T, HW, np.random.default_rng(seed), task)


def _new(tmp_path, name="s.zarr"):
    return EpisodeStore.create(tmp_path / name, SPEC, fps=10, image_shapes={"top": HW, "wrist": HW})


def test_append_read_round_trip(tmp_path):
    store = _new(tmp_path)
    eps = [_episode(5, 0, "a"), _episode(9, 1, "b"), _episode(1, 2, "a")]
    for i, ep in enumerate(eps):
        assert store.append_episode(ep, seed=i) == i
    again = EpisodeStore.open(tmp_path / "s.zarr")
    assert again.num_episodes == 3 and again.num_frames == 15
    assert again.episode_ends.tolist() == [5, 14, 15] and again.tasks == ["a", "b"]
    for i, ep in enumerate(eps):
        got = again.read_episode(i)
        np.testing.assert_array_equal(got["action"], ep["action"])
        np.testing.assert_array_equal(got["state"], ep["state"])
        for cam in SPEC.cameras:
            np.testing.assert_array_equal(got["images"][cam], ep["images"][cam])
        assert got["task"] == ep["task"] and got["seed"] == i
    np.testing.assert_array_equal(again.read_frames("images/top", np.array([6, 0, 6])), np.stack([eps[1]["images"]["top"][1], eps[0]["images"]["top"][0], eps[1]["images"]["top"][1]]))
    # images are stored one compressed chunk per frame
    z = again._root()["data/images/top"]
    assert z.chunks == (1, *HW, 3) and z.compressors


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda e: e.update(action=e["action"].astype(np.float64)), r"action: expected float32 \[T, 4\]"),
        (lambda e: e.update(state=e["state"][:, :3]), r"state: expected float32 \[T, 5\]"),
        (lambda e: e["action"].__setitem__((2, 1), np.nan), "action: contains NaN or inf .*frame 2, dim 1"),
        (lambda e: e["state"].__setitem__((0, 0), np.inf), "state: contains NaN or inf"),
        (lambda e: e["images"].pop("wrist"), "images: expected cameras"),
        (lambda e: e["images"].update(top=e["images"]["top"][:, :8]), r"images/top: expected uint8 \[T, 16, 24, 3\]"),
        (lambda e: e["images"].update(top=e["images"]["top"].astype(np.float32)), "images/top: expected uint8"),
        (lambda e: e.update(state=e["state"][:-1]), "lengths disagree"),
        (lambda e: e.update(task=""), "task: expected a non-empty string"),
        (lambda e: e.pop("task"), r"missing fields \['task'\]"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutate, match):
    store = _new(tmp_path)
    store.append_episode(_episode())
    ep = _episode(seed=3)
    mutate(ep)
    with pytest.raises(ValueError, match=match):
        store.append_episode(ep)
    assert EpisodeStore.open(store.path).num_episodes == 1  # nothing half-written


def test_interrupted_append_keeps_earlier_episodes(tmp_path, monkeypatch):
    store = _new(tmp_path)
    good = [_episode(6, 0), _episode(4, 1)]
    for ep in good:
        store.append_episode(ep)
    # crash after the frames of a third episode were written but before the commit
    import zarr

    calls = {"n": 0}
    real_setitem = zarr.Array.__setitem__

    def flaky(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:  # action, state written; crash on the first camera
            raise RuntimeError("simulated crash")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.append_episode(_episode(8, 2))
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)

    reopened = EpisodeStore.open(store.path)
    assert reopened.num_episodes == 2 and reopened.num_frames == 10
    assert reopened._root()["data/action"].shape[0] == 18  # leftovers exist but are not committed
    for i, ep in enumerate(good):
        np.testing.assert_array_equal(reopened.read_episode(i)["action"], ep["action"])
    # the store stays appendable and the leftovers are overwritten
    app = EpisodeStore.open(store.path, mode="a")
    third = _episode(3, 9)
    assert app.append_episode(third) == 2
    final = EpisodeStore.open(store.path)
    assert final.num_frames == 13
    np.testing.assert_array_equal(final.read_episode(2)["images"]["wrist"], third["images"]["wrist"])


def test_crash_in_a_subprocess_after_frames(tmp_path):
    """A hard kill (os._exit) between the frame writes and the commit leaves a readable store."""
    import subprocess
    import sys
    import textwrap

    store = _new(tmp_path)
    store.append_episode(_episode(5, 0))
    code = textwrap.dedent(
        f"""
        import os, numpy as np
        from chunkpolicy.data.store import EpisodeStore
        from chunkpolicy.data.synthetic import make_spec, synthetic_episode
        spec = make_spec("arm", action_dim=4, state_dim=5, cameras=("top", "wrist"))
        s = EpisodeStore.open({str(store.path)!r}, mode="a")
        type(s._root().attrs).update = lambda *a, **k: os._exit(9)  # die at the commit
        s.append_episode(synthetic_episode(spec, 6, {HW!r}, np.random.default_rng(1), "x"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    again = EpisodeStore.open(store.path)
    assert again.num_episodes == 1 and again.num_frames == 5


def test_create_errors_and_corruption(tmp_path):
    with pytest.raises(ValueError, match="image_shapes: cameras"):
        EpisodeStore.create(tmp_path / "x.zarr", SPEC, 10, image_shapes={"top": HW})
    store = _new(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        _new(tmp_path)
    store.append_episode(_episode())
    with pytest.raises(PermissionError, match="read-only"):
        EpisodeStore.open(store.path).append_episode(_episode())
    with pytest.raises(FileNotFoundError):
        EpisodeStore.open(tmp_path / "missing.zarr")
    # bad format version
    meta = store.path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        EpisodeStore.open(store.path)
    doc["attributes"]["format_version"] = 1
    meta.write_text(json.dumps(doc))
    import shutil

    shutil.rmtree(store.path / "meta" / "episode_ends")
    with pytest.raises(ValueError, match="corrupt store"):
        EpisodeStore.open(store.path)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable zarr v3 episode store"):
        EpisodeStore.open(store.path)


def test_overwrite_replaces_atomically(tmp_path):
    store = _new(tmp_path)
    store.append_episode(_episode())
    fresh = EpisodeStore.create(store.path, SPEC, 10, {"top": HW, "wrist": HW}, overwrite=True)
    assert fresh.num_episodes == 0
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_stats_exact_and_strict(tmp_path):
    store = _new(tmp_path)
    eps = [_episode(5, 0), _episode(8, 1)]
    for ep in eps:
        store.append_episode(ep)
    with pytest.raises(KeyError, match="no stats saved"):
        EpisodeStore.open(store.path).stats
    store.compute_stats()
    stats = EpisodeStore.open(store.path).stats
    allact = np.concatenate([e["action"] for e in eps]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], allact.mean(0))
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(allact, 0.99, axis=0))
    assert set(stats) == {"action", "state"}


class _Frames(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return self.store.num_frames

    def __getitem__(self, i):
        return torch.from_numpy(self.store.read("images/top", i, i + 1)[0].copy())


def test_store_is_picklable_in_dataloader_workers(tmp_path):
    store = make_synthetic_store(tmp_path / "p.zarr", SPEC, n_episodes=2, episode_len=6, image_hw=HW)
    pickle.loads(pickle.dumps(store))
    ro = EpisodeStore.open(store.path)
    ref = torch.stack([_Frames(ro)[i] for i in range(len(_Frames(ro)))])
    loader = torch.utils.data.DataLoader(_Frames(ro), batch_size=4, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(got, ref)


def test_direct_frame_path_matches_zarr(tmp_path):
    store = make_synthetic_store(tmp_path / "d.zarr", SPEC, n_episodes=2, episode_len=5, image_hw=HW)
    ro = EpisodeStore.open(store.path)
    idx = np.array([9, 0, 4, 4, 7])
    assert ro._direct_frame_path("data/images/top") is not None
    fast = ro.read_frames("images/top", idx)
    ref = np.asarray(ro._array("data/images/top").get_orthogonal_selection((np.unique(idx),)))
    np.testing.assert_array_equal(fast, ref[np.searchsorted(np.unique(idx), idx)])
    ro._direct["data/images/top"] = None  # force the zarr path
    np.testing.assert_array_equal(ro.read_frames("images/top", idx), fast)
    zarr_slice = np.asarray(ro._array("data/images/top")[2:6])
    ro._direct.clear()  # back to the direct path
    np.testing.assert_array_equal(ro.read("images/top", 2, 6), zarr_slice)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_image_codecs_round_trip(tmp_path, codec):
    store = EpisodeStore.create(tmp_path / f"{codec}.zarr", SPEC, 10, {"top": HW, "wrist": HW}, image_codec=codec)
    ep = _episode(4)
    store.append_episode(ep)
    again = EpisodeStore.open(store.path)
    assert type(again._array("data/images/top").metadata.codecs[1]).__name__ == "BloscCodec"
    assert again._array("data/images/top").metadata.codecs[1].to_dict()["configuration"]["cname"] == codec
    assert again._direct_frame_path("data/images/top") is not None
    np.testing.assert_array_equal(again.read_episode(0)["images"]["top"], ep["images"]["top"])
    with pytest.raises(ValueError, match="image_codec"):
        EpisodeStore.create(tmp_path / "x.zarr", SPEC, 10, {"top": HW, "wrist": HW}, image_codec="png")


def test_corrupt_image_frame_is_one_clear_error(tmp_path):
    """Regression: frames are decoded straight into the output buffer; a truncated chunk file must not slip through."""
    store = _new(tmp_path)
    store.append_episode(_episode())
    chunk = store.path / "data" / "images" / "top" / "c" / "2" / "0" / "0" / "0"
    assert chunk.exists()
    chunk.write_bytes(chunk.read_bytes()[:20])
    again = EpisodeStore.open(store.path)
    np.testing.assert_array_equal(again.read_frames("images/top", np.array([0, 1])),
                                  store.read_frames("images/top", np.array([0, 1])))
    with pytest.raises(ValueError, match=r"corrupt store: images/top frame 2 cannot be decoded"):
        again.read_frames("images/top", np.array([1, 2]))


def test_chunk_files_with_wrong_sizes_are_clear_errors(tmp_path):
    """Regression: frames are read into a buffer longer than the chunk, so Blosc's header sizes are checked against the
    file; a file with trailing bytes, or cut after its header, is an error naming the frame."""
    store = _new(tmp_path)
    store.append_episode(_episode())
    chunk = store.path / "data" / "images" / "top" / "c" / "1" / "0" / "0" / "0"
    good = chunk.read_bytes()
    for bad in (good + b"x" * 40, good[:16], good[:-1], good[:8]):
        chunk.write_bytes(bad)
        with pytest.raises(ValueError, match=r"corrupt store: images/top frame 1 cannot be decoded"):
            EpisodeStore.open(store.path).read_frames("images/top", np.array([0, 1]))
    chunk.write_bytes(good)
    np.testing.assert_array_equal(EpisodeStore.open(store.path).read_frames("images/top", np.array([1])),
                                  store.read_frames("images/top", np.array([1])))
