"""LeRobotDataset v3 ↔ episode store, through the ``lerobot`` package (local ``root``, never the hub).

* Numeric features (``action``, ``observation.state``) are copied from the dataset's Arrow tables: bit-exact float32.
* ``image`` features are PNGs in parquet: decoded to uint8, exact.
* ``video`` features are decoded one episode at a time with lerobot's own decoder (lossy codec, so not exact).
* Feature ``names`` become the spec's dim names where the dataset has them (else ``action_0`` ...).

Safety (issue 14):

* **The data is the truth.** Episodes come from the data's ``episode_index`` column and row counts; ``meta/info.json``
  (``total_episodes``, ``total_frames``, ``fps``) and ``meta/episodes`` are cross-checked against it, and the fps against
  the ``timestamp`` diffs of every episode. A disagreement is an error naming the file and field, unless
  ``allow_metadata_mismatch=True`` (CLI ``--allow-metadata-mismatch``): then the data wins and a warning says what differed.
* **Local only.** Every file the metadata lists is checked to exist before lerobot is called (the error names the missing
  file), and lerobot runs with every hub call refused (``HF_HUB_OFFLINE`` and its download functions replaced).
* **Atomic.** Import and export write into a hidden sibling ``.NAME.partial-PID-*`` of the destination and rename it into
  place at the end; a failure or kill part-way leaves the destination absent (or, with ``overwrite``, the old one
  unchanged). Leftovers of killed runs are removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from chunkpolicy.atomic import _publish_mode, read_json
from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.spaces import EmbodimentSpec

IMAGE_PREFIX = "observation.images."
FPS_TOLERANCE_S = 1e-4  # lerobot's own default tolerance between timestamps and frame_index / fps


class LocalOnlyError(FileNotFoundError):
    """The import needed a file that is not on disk (it never downloads)."""


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


# -- staging: write next to the destination, rename at the end -----------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(dst: Path) -> None:
    """Remove ``.NAME.partial-PID-*`` siblings left by killed runs (their process is gone)."""
    if not dst.parent.is_dir():
        return
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        try:
            pid = int(p.name[len(f".{dst.name}.partial-"):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if p.name.endswith("-old") and not dst.exists():
            # killed between moving the old copy aside and moving the new one in: put the old one back
            os.replace(p, dst)
            warnings.warn(f"{dst}: restored the previous copy from an interrupted overwrite ({p.name})", stacklevel=3)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _check_destination(dst: Path, overwrite: bool) -> None:
    """Clean up after killed runs, then refuse an existing ``dst`` unless ``overwrite``."""
    _remove_stale_partials(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True, or --overwrite on the command line, to replace it)")


@contextlib.contextmanager
def _staged(dst: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a not-yet-existing path next to ``dst`` to build into; on success it replaces ``dst`` (an old one is
    removed only once the new one is in place), on any error it is deleted and ``dst`` is untouched."""
    _check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.is_dir():
            raise RuntimeError(f"{tmp}: nothing was written")
        _publish_mode(tmp, 0o777)
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} appeared while it was being written (pass overwrite=True to replace it)")
        if dst.exists():
            old = dst.with_name(f".{dst.name}.partial-{os.getpid()}-old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- local-only: no hub access while lerobot runs ------------------------------------------------------------------
@contextlib.contextmanager
def _offline(root: Path) -> Iterator[None]:
    """Run lerobot with every hub call refused: a file lerobot would fetch raises :class:`LocalOnlyError`."""
    import importlib

    def refuse(*args: Any, **kwargs: Any):
        pats = kwargs.get("allow_patterns")
        raise LocalOnlyError(
            f"{root}: lerobot asked to download {pats or 'files'} from the hub; import-lerobot reads local files only "
            "(a file the metadata lists is missing or unreadable)"
        )

    patches: list[tuple[Any, str, Any]] = []
    for mod_name, names in (
        ("lerobot.datasets.lerobot_dataset", ("snapshot_download", "get_safe_version", "HfApi")),
        ("lerobot.datasets.dataset_metadata", ("snapshot_download", "sync_bucket", "get_safe_version")),
    ):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for n in names:
            if hasattr(mod, n):
                patches.append((mod, n, refuse))
    for mod_name in ("huggingface_hub.constants", "datasets.config"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(mod, n):
                patches.append((mod, n, True))
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        os.environ.update({k: "1" for k in saved_env})
        for m, n, v in patches:
            setattr(m, n, v)
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- reading and checking the local files before lerobot sees them -------------------------------------------------
def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise LocalOnlyError(f"{path}: missing")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as e:
        raise ValueError(f"{path}: unreadable parquet ({e})") from None


def _check_schema(path: Path, feats: dict, rel: str) -> None:
    """Each non-video feature of info.json must be a column of the data file with its dtype/shape, and vice versa."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: unreadable parquet ({e})") from None
    cols = set(schema.names)
    for key, f in feats.items():
        if f.get("dtype") == "video":
            continue
        if key not in cols:
            raise ValueError(f"{rel}: feature {key!r} of meta/info.json is not a column of the data")
        t = schema.field(key).type
        shape = tuple(int(s) for s in f.get("shape", ()))
        if f.get("dtype") == "image":
            continue
        n = int(np.prod(shape)) if shape else 1
        if pa.types.is_fixed_size_list(t):
            got = t.list_size
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            col = pq.read_table(path, columns=[key]).column(key)
            lens = set(col.combine_chunks().value_lengths().to_pylist()) if len(col) else {n}
            got = lens.pop() if len(lens) == 1 else None
        else:
            got = 1
        if got != n:
            raise ValueError(
                f"{rel}: feature {key!r}: meta/info.json says shape {list(shape)}, the data has "
                f"{'rows of varying length' if got is None else f'{got} values per frame'} ({t})"
            )
    extra = sorted(cols - set(feats))
    if extra:
        raise ValueError(f"{rel}: columns {extra} are not features of meta/info.json")


def _scan(root: Path, allow_metadata_mismatch: bool, fps_tolerance_s: float) -> dict:
    """Read the metadata and the data's index columns with pyarrow (no lerobot, no network); cross-check them."""
    info_path = root / "meta" / "info.json"
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: expected a JSON object")
    for field in ("fps", "features", "data_path", "total_episodes", "total_frames"):
        if field not in info:
            raise ValueError(f"{info_path}: field {field!r} is missing")
    for extra in sorted((root / "meta").glob("*.json")):  # stats.json etc.: lerobot parses them without naming the file
        if extra.name != "info.json":
            read_json(extra)
    feats = info["features"]
    if (root / "meta" / "tasks.parquet").exists() or int(info.get("total_tasks", 1)) > 0:
        _read_parquet(root / "meta" / "tasks.parquet")

    ep_files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not ep_files:
        raise LocalOnlyError(f"{root / 'meta' / 'episodes'}: no episode metadata parquet files (meta/episodes/chunk-*/file-*.parquet)")
    import pyarrow as pa

    ep_tables = []
    for p in ep_files:
        t = _read_parquet(p)
        ep_tables.append(t.select([c for c in t.column_names if not c.startswith("stats/")]))
    ep_meta = pa.concat_tables(ep_tables, promote_options="default").to_pydict()

    # every file the metadata lists must be on disk
    video_keys = [k for k, f in feats.items() if f.get("dtype") == "video"]
    listed: dict[str, int] = {}
    for i, ep in enumerate(ep_meta.get("episode_index", [])):
        try:
            listed.setdefault(info["data_path"].format(chunk_index=ep_meta["data/chunk_index"][i], file_index=ep_meta["data/file_index"][i]), ep)
            for vk in video_keys:
                listed.setdefault(
                    info["video_path"].format(video_key=vk, chunk_index=ep_meta[f"videos/{vk}/chunk_index"][i], file_index=ep_meta[f"videos/{vk}/file_index"][i]),
                    ep,
                )
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"{root}: meta/episodes or meta/info.json lacks the file location of episode {ep} ({e!r})") from None
    for rel, ep in listed.items():
        if not (root / rel).is_file():
            raise LocalOnlyError(
                f"{root / rel}: missing (meta/episodes lists it for episode {ep}); import-lerobot reads local files only "
                "and never downloads"
            )

    data_files = sorted((root / "data").glob("*/*.parquet"))  # what lerobot loads
    if not data_files:
        raise LocalOnlyError(f"{root / 'data'}: no data parquet files")
    ep_idx, frame_idx, ts, rows_of_file = [], [], [], []
    for p in data_files:
        rel = str(p.relative_to(root))
        _check_schema(p, feats, rel)
        t = _read_parquet(p, ["episode_index", "frame_index", "timestamp"])
        ep_idx.append(t.column("episode_index").to_numpy())
        frame_idx.append(t.column("frame_index").to_numpy())
        ts.append(t.column("timestamp").to_numpy().astype(np.float64))
        rows_of_file.append(t.num_rows)
    ep_idx, frame_idx, ts = np.concatenate(ep_idx), np.concatenate(frame_idx), np.concatenate(ts)

    episodes, counts = np.unique(ep_idx, return_counts=True)
    problems: list[str] = []
    for ep in episodes:
        rows = np.flatnonzero(ep_idx == ep)
        if not np.array_equal(frame_idx[rows], np.arange(len(rows))):
            raise ValueError(f"{root}: episode {int(ep)}: frame_index is not 0..{len(rows) - 1} in row order in the data")
    if int(info["total_episodes"]) != len(episodes):
        problems.append(f"meta/info.json: total_episodes is {info['total_episodes']}, the data has {len(episodes)} episodes")
    if int(info["total_frames"]) != len(ep_idx):
        problems.append(f"meta/info.json: total_frames is {info['total_frames']}, the data has {len(ep_idx)} rows")
    meta_len = dict(zip(ep_meta.get("episode_index", []), ep_meta.get("length", [])))
    for ep, n in zip(episodes.tolist(), counts.tolist()):
        if ep not in meta_len:
            problems.append(f"meta/episodes: episode {ep} of the data is not listed")
        elif int(meta_len[ep]) != n:
            problems.append(f"meta/episodes: episode {ep} has length {meta_len[ep]}, the data has {n} frames")
    missing = sorted(set(meta_len) - set(episodes.tolist()))
    if missing:
        problems.append(f"meta/episodes: episodes {missing[:10]} have no frames in the data")

    # fps against the timestamps of every episode
    try:
        fps = float(info["fps"])
    except (TypeError, ValueError):
        fps = float("nan")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"{info_path}: field 'fps' must be a positive number, got {info['fps']!r}")
    diffs = {int(ep): np.diff(ts[ep_idx == ep]) for ep in episodes}
    nonempty = [d for d in diffs.values() if len(d)]
    all_d = np.concatenate(nonempty) if nonempty else np.zeros(0)
    data_fps = fps

    def first_off(period: float) -> tuple[int, int] | None:
        for ep, d in diffs.items():
            bad = np.flatnonzero(np.abs(d - period) > fps_tolerance_s)
            if len(bad):
                return ep, int(bad[0])
        return None

    off = first_off(1.0 / fps)
    if off is not None:
        ep, k = off
        med = float(np.median(all_d))
        data_fps = round(1.0 / med) if med > 0 and abs(1.0 / med - round(1.0 / med)) < 1e-3 else (1.0 / med if med > 0 else fps)
        what = (
            f"meta/info.json: fps is {info['fps']:g} (frames {1 / fps:.4g} s apart) but episode {ep} "
            f"has timestamps {diffs[ep][k]:.4g} s apart (frame {k} -> {k + 1})"
        )
        if med <= 0 or first_off(1.0 / data_fps) is not None:  # no single fps fits: irregular data, never ignored
            raise ValueError(f"{root}: {what}; the timestamps are irregular (median spacing {med:.4g} s)")
        problems.append(f"{what}; the data is {data_fps:g} fps")
    if problems:
        if not allow_metadata_mismatch:
            raise ValueError(
                f"{root}: the metadata disagrees with the data:\n  - " + "\n  - ".join(problems)
                + "\n(fix the dataset, or pass allow_metadata_mismatch=True / --allow-metadata-mismatch to import what the data holds)"
            )
        for p in problems:
            warnings.warn(f"{root}: {p}; importing what the data holds", stacklevel=3)
    return {
        "info": info,
        "episodes": episodes.tolist(),
        "fps": float(data_fps),
        "metadata_matches": not problems,
        "video_ok": set(episodes.tolist()) <= set(meta_len),
    }


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
    allow_metadata_mismatch: bool = False,
    fps_tolerance_s: float = FPS_TOLERANCE_S,
    progress: bool = True,
) -> EpisodeStore:
    """Import the LeRobotDataset v3 at ``root`` into a new episode store at ``out`` (local files only, atomic).

    Episodes are what the data holds; ``meta/info.json`` and ``meta/episodes`` must agree with it (else ``ValueError``
    naming the file and field, or a warning with ``allow_metadata_mismatch=True``). A missing local file raises
    :class:`LocalOnlyError` naming it; nothing is ever downloaded. ``out`` appears only once complete; ``overwrite``
    replaces an existing store only then."""
    LeRobotDataset = _require_lerobot()
    root, out = Path(root), Path(out)
    if not (root / "meta" / "info.json").exists():
        raise FileNotFoundError(f"{root}: not a LeRobotDataset v3 directory (no meta/info.json)")
    _check_destination(out, overwrite)  # before the (possibly long) checks
    scan = _scan(root, allow_metadata_mismatch, fps_tolerance_s)
    feats_info = scan["info"]["features"]
    for key in (action_key, state_key):
        if key not in feats_info:
            raise KeyError(f"{root}: feature {key!r} not in the dataset (features: {sorted(feats_info)})")
    fps = scan["fps"]

    from datasets.exceptions import DatasetGenerationError

    with _offline(root):
        try:
            ds = LeRobotDataset(
                repo_id or f"local/{root.name}", root=root, episodes=None if scan["metadata_matches"] else scan["episodes"]
            )
        except DatasetGenerationError as e:  # the schema check above should have named the feature already
            cause = e.__cause__ or e.__context__ or e
            raise ValueError(f"{root}: the data does not match the features of meta/info.json: {cause}") from e
    feats = ds.meta.features
    visual = [k for k, f in feats.items() if f["dtype"] in ("image", "video")]
    cams = list(camera_keys) if camera_keys is not None else visual
    unknown = [c for c in cams if c not in visual]
    if unknown:
        raise KeyError(f"{root}: camera features {unknown} not in the dataset (visual features: {visual})")
    if any(feats[k]["dtype"] == "video" for k in cams) and not scan["video_ok"]:
        raise ValueError(f"{root}: meta/episodes does not list every episode of the data, so their video frames cannot be found")
    cam_name = {k: k[len(IMAGE_PREFIX):] if k.startswith(IMAGE_PREFIX) else k for k in cams}
    a_dim, s_dim = int(np.prod(feats[action_key]["shape"])), int(np.prod(feats[state_key]["shape"]))
    spec = EmbodimentSpec(
        name=embodiment_name or (ds.meta.robot_type or root.name),
        action_names=_names(feats[action_key], "action"),
        state_names=_names(feats[state_key], "state"),
        cameras=tuple(cam_name[k] for k in cams),
        control_hz=float(fps),
        gripper_dims=tuple(n for n in _names(feats[action_key], "action") if "gripper" in n.lower()),
    )
    shapes = {}
    for k in cams:
        shp = feats[k]["shape"]
        hwc = shp if shp[-1] == 3 else (shp[1], shp[2], shp[0])  # names say (height, width, channels) in v3
        shapes[cam_name[k]] = (int(hwc[0]), int(hwc[1]))

    table = ds.hf_dataset.data  # Arrow table of the non-video columns
    actions = _column(table, action_key, a_dim)
    states = _column(table, state_key, s_dim)
    ep_index = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    frame_index = np.asarray(table.column("frame_index").to_numpy(), dtype=np.int64)
    task_index = np.asarray(table.column("task_index").to_numpy(), dtype=np.int64)
    for key, x in ((action_key, actions), (state_key, states)):  # before anything is written
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            r, d = (int(v) for v in bad[0])
            raise ValueError(
                f"{root}: {key} contains NaN or inf (first at episode {ep_index[r]}, frame {frame_index[r]}, dim {d}; "
                f"{len(np.unique(bad[:, 0]))} frames affected)"
            )
    tasks = ds.meta.tasks  # DataFrame indexed by task string
    task_of = {int(i): str(t) for t, i in zip(tasks.index, tasks["task_index"])}
    unknown_tasks = sorted(set(np.unique(task_index).tolist()) - set(task_of))
    if unknown_tasks:
        raise ValueError(f"{root}: task_index {unknown_tasks} of the data not in meta/tasks.parquet")

    from tqdm.auto import tqdm

    with _staged(out, overwrite=overwrite) as tmp:
        store = EpisodeStore.create(tmp, spec, fps=float(fps), image_shapes=shapes)
        for ep in tqdm(scan["episodes"], desc="import", unit="ep", disable=not progress):
            rows = np.flatnonzero(ep_index == ep)
            images = {}
            for k in cams:
                if feats[k]["dtype"] == "image":
                    images[cam_name[k]] = _decode_image_rows(ds, k, rows)
                else:
                    images[cam_name[k]] = _decode_video_episode(ds, k, ep, len(rows), fps)
            try:
                store.append_episode(
                    {"action": actions[rows], "state": states[rows], "images": images, "task": task_of[int(task_index[rows[0]])]}
                )
            except ValueError as e:
                raise ValueError(f"{root}: episode {ep}: {e}") from e
        store.compute_stats(save=True)
        del store
    return EpisodeStore.open(out, mode="a")


def _decode_image_rows(ds: Any, key: str, rows: np.ndarray) -> np.ndarray:
    """PNG-in-parquet frames → uint8 ``[T, h, w, 3]`` (exact)."""
    raw = ds.hf_dataset.with_format(None).select(rows.tolist())[key]  # PIL images, no torch transform
    return np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in raw])


def _decode_video_episode(ds: Any, key: str, ep: int, length: int, fps: float) -> np.ndarray:
    """All frames of one episode from the dataset's video file (lerobot's decoder) → uint8 ``[T, h, w, 3]``."""
    from lerobot.datasets.video_utils import decode_video_frames

    meta = ds.meta.episodes[ep]
    start = float(meta[f"videos/{key}/from_timestamp"])
    ts = [start + i / fps for i in range(length)]
    path = ds.root / ds.meta.get_video_file_path(ep, key)
    if not path.is_file():
        raise LocalOnlyError(f"{path}: missing (video of {key!r}, episode {ep})")
    frames = decode_video_frames(path, ts, ds.tolerance_s, None, return_uint8=True)  # None: lerobot picks its backend
    frames = frames.reshape(length, *frames.shape[-3:])  # [T, 3, h, w]
    return frames.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)


def export_lerobot(
    store_path: str | os.PathLike | EpisodeStore,
    root: str | os.PathLike,
    *,
    repo_id: str | None = None,
    use_videos: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write every episode of a store to a new LeRobotDataset v3 at ``root``.

    ``root`` must not exist unless ``overwrite``; the dataset is built next to it and renamed into place at the end, so a
    failure or kill part-way leaves ``root`` absent (or the old dataset unchanged)."""
    LeRobotDataset = _require_lerobot()
    store = store_path if isinstance(store_path, EpisodeStore) else EpisodeStore.open(store_path)
    root = Path(root)
    _check_destination(root, overwrite)
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
    from tqdm.auto import tqdm

    with _staged(root, overwrite=overwrite) as tmp, _offline(root):
        ds = LeRobotDataset.create(
            repo_id or f"local/{spec.name}", fps=int(store.fps), features=feats, root=tmp, robot_type=spec.name, use_videos=use_videos
        )
        try:
            for i in tqdm(range(store.num_episodes), desc="export", unit="ep", disable=not progress):
                ep = store.read_episode(i)
                for t in range(len(ep["action"])):
                    frame = {"action": ep["action"][t], "observation.state": ep["state"][t], "task": ep["task"]}
                    for cam in spec.cameras:
                        frame[IMAGE_PREFIX + cam] = ep["images"][cam][t]
                    ds.add_frame(frame)
                ds.save_episode()
        except BaseException:
            # lerobot's writers flush on garbage collection, which would recreate the removed staging folder: close now
            with contextlib.suppress(Exception):
                ds.finalize()
            raise
        ds.finalize()
    return root
