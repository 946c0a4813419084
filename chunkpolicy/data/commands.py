"""What the ``chunkpolicy data ...`` subcommands do (the CLI parses arguments and calls these)."""

from __future__ import annotations

import os
import time

from chunkpolicy.data.store import EpisodeStore


def data_info(store_path: str | os.PathLike) -> str:
    """A readable report of a store: episodes, frames, keys with shapes/dtypes, embodiment, fps, tasks."""
    info = EpisodeStore.open(store_path).info()
    emb = info["embodiment"]
    lines = [
        f"store       {info['path']}  (format v{info['format_version']})",
        f"episodes    {info['episodes']}",
        f"frames      {info['frames']}"
        + (f"  (length min/mean/max {info['episode_length']['min']}/{info['episode_length']['mean']:.1f}/{info['episode_length']['max']})" if info["episode_length"] else ""),
        f"fps         {info['fps']:g}",
        f"embodiment  {emb['name']}: {len(emb['action_names'])} action dims, {len(emb['state_names'])} state dims, "
        f"cameras {emb['cameras']}, {emb['control_hz']:g} Hz",
        f"  actions   {', '.join(emb['action_names'])}",
        f"  state     {', '.join(emb['state_names'])}",
        f"  grippers  {', '.join(emb['gripper_dims']) or '-'}",
        "keys",
    ]
    for k, v in info["keys"].items():
        lines.append(f"  {k:<24} {v['dtype']:<8} {tuple(v['shape'])}")
    lines.append(f"stats       {'saved' if info['has_stats'] else 'not computed (chunkpolicy data stats STORE)'}")
    lines.append(f"tasks       {len(info['tasks'])}")
    lines += [f"  - {t}" for t in info["tasks"]]
    return "\n".join(lines)


def cmd_stats(store_path: str | os.PathLike) -> None:
    store = EpisodeStore.open(store_path, mode="a")
    stats = store.compute_stats(save=True)
    print(f"saved exact stats for {sorted(stats)} over {store.num_frames} frames to {store.path}")


def cmd_import_lerobot(
    root: str,
    out: str,
    *,
    repo_id: str | None = None,
    embodiment_name: str | None = None,
    overwrite: bool = False,
    allow_metadata_mismatch: bool = False,
) -> EpisodeStore:
    from chunkpolicy.data.lerobot_io import import_lerobot

    t = time.perf_counter()
    store = import_lerobot(
        root, out, repo_id=repo_id, embodiment_name=embodiment_name, overwrite=overwrite,
        allow_metadata_mismatch=allow_metadata_mismatch,
    )
    print(f"imported {store.num_episodes} episodes / {store.num_frames} frames from {root} into {out} "
          f"in {time.perf_counter() - t:.1f}s (embodiment {store.spec.name!r}, cameras {list(store.cameras)})")
    return store


def cmd_export_lerobot(
    store: str, root: str, *, repo_id: str | None = None, use_videos: bool = False, overwrite: bool = False
) -> None:
    from chunkpolicy.data.lerobot_io import export_lerobot

    t = time.perf_counter()
    src = EpisodeStore.open(store)
    export_lerobot(src, root, repo_id=repo_id, use_videos=use_videos, overwrite=overwrite)
    print(f"exported {src.num_episodes} episodes / {src.num_frames} frames from {store} to {root} "
          f"({'video' if use_videos else 'image'} features) in {time.perf_counter() - t:.1f}s")
