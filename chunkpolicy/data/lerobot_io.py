"""LeRobotDataset v3 ↔ episode store, through the ``lerobot`` package (local ``root``, never the hub).

* Numeric features (``action``, ``observation.state``) are copied from the dataset's Arrow tables: bit-exact float32.
* ``image`` features are PNGs in parquet: decoded to uint8, exact.
* ``video`` features are decoded one episode at a time with lerobot's own decoder (lossy codec, so not exact).
* Feature ``names`` become the spec's dim names where the dataset has them (else ``action_0`` ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.spaces import EmbodimentSpec

IMAGE_PREFIX = "observation.images."


def _require_lerobot():
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as e:  # optional dependency: say how to get it
        raise ImportError("LeRobot interop needs the `lerobot` extra: pip install 'chunkpolicy[lerobot]'") from e
    return LeRobotDataset


def _names(feature: dict, prefix: str) -> tuple[str, ...]:
    n = int(np.prod(feature["shape"]))
    names = feature.get("names")
    if isinstance(names, dict):  # e.g. {"motors": [...]}
        names = next(iter(names.values()), None) if len(names) == 1 else None
    if isinstance(names, (list, tuple)) and len(names) == n and len(set(map(str, names))) == n:
        return tuple(str(x) for x in names)
    return tuple(f"{prefix}_{i}" for i in range(n))


def _column(table: Any, key: str, dim: int) -> np.ndarray:
    col = table.column(key).combine_chunks()
    flat = col.flatten() if hasattr(col, "flatten") else col
    arr = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
    return arr.reshape(len(col), dim)


def import_lerobot(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    embodiment_name: str | None = None,
    action_key: str = "action",
    state_key: str = "observation.state",
    camera_keys: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EpisodeStore:
    """Import the LeRobotDataset v3 at ``root`` into a new episode store at ``out``."""
    LeRobotDataset = _require_lerobot()
    root = Path(root)
    if not (root / "meta" / "info.json").exists():
        raise FileNotFoundError(f"{root}: not a LeRobotDataset v3 directory (no meta/info.json)")
    ds = LeRobotDataset(repo_id or f"local/{root.name}", root=root)
    feats = ds.meta.features
    for key in (action_key, state_key):
        if key not in feats:
            raise KeyError(f"{root}: feature {key!r} not in the dataset (features: {sorted(feats)})")
    visual = [k for k, f in feats.items() if f["dtype"] in ("image", "video")]
    cams = list(camera_keys) if camera_keys is not None else visual
    unknown = [c for c in cams if c not in visual]
    if unknown:
        raise KeyError(f"{root}: camera features {unknown} not in the dataset (visual features: {visual})")
    cam_name = {k: k[len(IMAGE_PREFIX):] if k.startswith(IMAGE_PREFIX) else k for k in cams}
    a_dim, s_dim = int(np.prod(feats[action_key]["shape"])), int(np.prod(feats[state_key]["shape"]))
    spec = EmbodimentSpec(
        name=embodiment_name or (ds.meta.robot_type or root.name),
        action_names=_names(feats[action_key], "action"),
        state_names=_names(feats[state_key], "state"),
        cameras=tuple(cam_name[k] for k in cams),
        control_hz=float(ds.meta.fps),
        gripper_dims=tuple(n for n in _names(feats[action_key], "action") if "gripper" in n.lower()),
    )
    shapes = {}
    for k in cams:
        shp = feats[k]["shape"]
        hwc = shp if shp[-1] == 3 else (shp[1], shp[2], shp[0])  # names say (height, width, channels) in v3
        shapes[cam_name[k]] = (int(hwc[0]), int(hwc[1]))
    store = EpisodeStore.create(out, spec, fps=float(ds.meta.fps), image_shapes=shapes, overwrite=overwrite)

    table = ds.hf_dataset.data  # Arrow table of the non-video columns
    actions = _column(table, action_key, a_dim)
    states = _column(table, state_key, s_dim)
    ep_index = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    task_index = np.asarray(table.column("task_index").to_numpy(), dtype=np.int64)
    tasks = ds.meta.tasks  # DataFrame indexed by task string
    task_of = {int(i): str(t) for t, i in zip(tasks.index, tasks["task_index"])}

    from tqdm.auto import tqdm

    for ep in tqdm(range(ds.meta.total_episodes), desc="import", unit="ep", disable=not progress):
        rows = np.flatnonzero(ep_index == ep)
        if len(rows) == 0:
            continue
        images = {}
        for k in cams:
            if feats[k]["dtype"] == "image":
                images[cam_name[k]] = _decode_image_rows(ds, k, rows)
            else:
                images[cam_name[k]] = _decode_video_episode(ds, k, ep, len(rows))
        store.append_episode(
            {"action": actions[rows], "state": states[rows], "images": images, "task": task_of[int(task_index[rows[0]])]}
        )
    store.compute_stats(save=True)
    return store


def _decode_image_rows(ds: Any, key: str, rows: np.ndarray) -> np.ndarray:
    """PNG-in-parquet frames → uint8 ``[T, h, w, 3]`` (exact)."""
    raw = ds.hf_dataset.with_format(None).select(rows.tolist())[key]  # PIL images, no torch transform
    return np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in raw])


def _decode_video_episode(ds: Any, key: str, ep: int, length: int) -> np.ndarray:
    """All frames of one episode from the dataset's video file (lerobot's decoder) → uint8 ``[T, h, w, 3]``."""
    from lerobot.datasets.video_utils import decode_video_frames

    meta = ds.meta.episodes[ep]
    start = float(meta[f"videos/{key}/from_timestamp"])
    ts = [start + i / ds.meta.fps for i in range(length)]
    path = ds.root / ds.meta.get_video_file_path(ep, key)
    frames = decode_video_frames(path, ts, ds.tolerance_s, None, return_uint8=True)  # None: lerobot picks its backend
    frames = frames.reshape(length, *frames.shape[-3:])  # [T, 3, h, w]
    return frames.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)


def export_lerobot(
    store_path: str | os.PathLike | EpisodeStore,
    root: str | os.PathLike,
    *,
    repo_id: str | None = None,
    use_videos: bool = False,
    progress: bool = True,
) -> Path:
    """Write every episode of a store to a new LeRobotDataset v3 at ``root`` (must not exist)."""
    LeRobotDataset = _require_lerobot()
    store = store_path if isinstance(store_path, EpisodeStore) else EpisodeStore.open(store_path)
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    spec = store.spec
    if float(store.fps) != int(store.fps):
        raise ValueError(f"LeRobotDataset needs an integer fps; the store has {store.fps}")
    feats: dict[str, dict] = {
        "action": {"dtype": "float32", "shape": (spec.action_dim,), "names": list(spec.action_names)},
        "observation.state": {"dtype": "float32", "shape": (spec.state_dim,), "names": list(spec.state_names)},
    }
    for cam in spec.cameras:
        h, w = store.image_shape(cam)
        feats[IMAGE_PREFIX + cam] = {
            "dtype": "video" if use_videos else "image",
            "shape": (h, w, 3),
            "names": ["height", "width", "channels"],
        }
    ds = LeRobotDataset.create(
        repo_id or f"local/{spec.name}", fps=int(store.fps), features=feats, root=root, robot_type=spec.name, use_videos=use_videos
    )
    from tqdm.auto import tqdm

    for i in tqdm(range(store.num_episodes), desc="export", unit="ep", disable=not progress):
        ep = store.read_episode(i)
        for t in range(len(ep["action"])):
            frame = {"action": ep["action"][t], "observation.state": ep["state"][t], "task": ep["task"]}
            for cam in spec.cameras:
                frame[IMAGE_PREFIX + cam] = ep["images"][cam][t]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root
