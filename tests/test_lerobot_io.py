"""LeRobot v3 interop on datasets this test creates with `lerobot` itself (image and video features)."""

import numpy as np
import pytest

pytest.importorskip("lerobot.datasets.lerobot_dataset", reason="needs the lerobot extra")

from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from chunkpolicy.cli import main as cli_main  # noqa: E402
from chunkpolicy.data.lerobot_io import export_lerobot, import_lerobot  # noqa: E402
from chunkpolicy.data.store import EpisodeStore  # noqa: E402


def _smooth_frames(T, h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(T):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = np.clip(255 - 6 * np.hypot(xx - cx, yy - cy), 0, 255)
        out.append(np.stack([r, np.full_like(r, 40 + 10 * t), 255 - r], -1).astype(np.uint8))
    return np.stack(out)


def _make_lerobot(root, use_videos, rng, episodes=(6, 9), hw=(32, 32)):
    kind = "video" if use_videos else "image"
    feats = {
        "action": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "gripper"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "observation.images.top": {"dtype": kind, "shape": (*hw, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/test", fps=10, features=feats, root=root, robot_type="toybot", use_videos=use_videos)
    written = []
    for e, T in enumerate(episodes):
        ep = {
            "action": rng.normal(size=(T, 3)).astype(np.float32),
            "state": rng.normal(size=(T, 4)).astype(np.float32),
            "images": _smooth_frames(T, *hw, rng),
            "task": f"task number {e % 2}",
        }
        for t in range(T):
            ds.add_frame({"action": ep["action"][t], "observation.state": ep["state"][t], "observation.images.top": ep["images"][t], "task": ep["task"]})
        ds.save_episode()
        written.append(ep)
    ds.finalize()
    return written


def test_image_dataset_import_export_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    written = _make_lerobot(tmp_path / "lr", False, rng)
    store = import_lerobot(tmp_path / "lr", tmp_path / "s.zarr", progress=False)
    assert store.spec.name == "toybot" and store.spec.action_names == ("x", "y", "gripper")
    assert store.spec.gripper_dims == ("gripper",) and store.cameras == ("top",) and store.fps == 10
    assert store.num_episodes == 2
    for i, ep in enumerate(written):
        got = store.read_episode(i)
        assert np.array_equal(got["action"], ep["action"]) and np.array_equal(got["state"], ep["state"])  # bit-exact
        assert np.array_equal(got["images"]["top"], ep["images"])  # PNG features are exact
        assert got["task"] == ep["task"]
    # export back and import again: still exact
    export_lerobot(store, tmp_path / "lr2", progress=False)
    again = import_lerobot(tmp_path / "lr2", tmp_path / "s2.zarr", progress=False)
    for i in range(2):
        a, b = store.read_episode(i), again.read_episode(i)
        assert np.array_equal(a["action"], b["action"]) and np.array_equal(a["images"]["top"], b["images"]["top"])
    # and LeRobot itself reads what we exported
    lr = LeRobotDataset("local/x", root=tmp_path / "lr2")
    assert lr.num_frames == 15 and np.array_equal(lr[7]["action"].numpy(), written[1]["action"][1])


def test_video_dataset_imports(tmp_path):
    rng = np.random.default_rng(1)
    written = _make_lerobot(tmp_path / "lv", True, rng)
    store = import_lerobot(tmp_path / "lv", tmp_path / "v.zarr", progress=False)
    for i, ep in enumerate(written):
        got = store.read_episode(i)
        assert np.array_equal(got["action"], ep["action"])
        img = got["images"]["top"]
        assert img.shape == ep["images"].shape and img.dtype == np.uint8
        err = np.abs(img.astype(np.int16) - ep["images"]).mean(axis=(1, 2, 3))
        assert err.max() < 12, err  # lossy AV1, but each frame matches its own source frame
        # frames are aligned: every decoded frame is closest to its own source frame
        d = np.abs(img[:, None].astype(np.int16) - ep["images"][None]).mean(axis=(2, 3, 4))
        assert (d.argmin(1) == np.arange(len(img))).all()


def test_cli_info_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(2)
    _make_lerobot(tmp_path / "lr", False, rng, episodes=(4,))
    assert cli_main(["data", "import-lerobot", str(tmp_path / "lr"), str(tmp_path / "c.zarr")]) == 0
    assert cli_main(["data", "info", str(tmp_path / "c.zarr")]) == 0
    out = capsys.readouterr().out
    assert "episodes    1" in out and "images/top" in out and "toybot" in out and "task number 0" in out
    assert cli_main(["data", "export-lerobot", str(tmp_path / "c.zarr"), str(tmp_path / "back")]) == 0
    assert EpisodeStore.open(tmp_path / "c.zarr").num_frames == 4
    assert cli_main(["data", "info", str(tmp_path / "nope.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a LeRobotDataset v3 directory"):
        import_lerobot(tmp_path, tmp_path / "x.zarr")
