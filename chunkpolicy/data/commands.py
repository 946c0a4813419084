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
    status = info.get("stats_status", "fresh" if info["has_stats"] else "none")
    lines.append("stats       " + {
        "fresh": f"saved, fresh (cover all {info['frames']} frames)",
        "stale": f"STALE: saved for {info.get('stats_frames')} frames, the store has {info['frames']} after an append "
                 f"or repair; recompute with `chunkpolicy data stats {info['path']}`",
        "unknown": "saved by an old (v1) store without a frame count; checked against the data when read",
        "none": "not computed (chunkpolicy data stats STORE)",
    }[status])
    lines.append(f"integrity   {'crc32c per chunk, every chunk written' if info.get('checksums') else 'no checksums (old store, format v1)'}"
                 f"; check with `chunkpolicy data verify {info['path']}`")
    lines.append(f"tasks       {len(info['tasks'])}")
    lines += [f"  - {t}" for t in info["tasks"]]
    return "\n".join(lines)


def cmd_stats(store_path: str | os.PathLike) -> None:
    store = EpisodeStore.open(store_path, mode="a")
    stats = store.compute_stats(save=True)
    print(f"saved exact stats for {sorted(stats)} over {store.num_frames} frames to {store.path}")


def cmd_verify(store_path: str | os.PathLike, *, repair: bool = False) -> int:
    """Check every chunk, shapes, the episode index, NaN/inf and stats freshness; print what is wrong. ``repair`` drops
    damaged tail episodes only. Returns the exit code: 0 healthy, 1 problems found (or left after a repair)."""
    from chunkpolicy.data.store_verify import verify_store

    report, dropped = verify_store(store_path, repair=repair)
    if dropped:
        print(f"repaired: dropped {dropped} damaged tail episode(s); {report.num_episodes} episodes kept")
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if report.ok:
        print(f"ok: {store_path}: {report.num_episodes} episodes, every chunk present and decodable")
        return 0
    hint = ""
    if not repair and report.damaged and not report.global_problems:
        hint = " (--repair drops damaged episodes only if they are a contiguous tail)"
    print(f"{store_path}: {len(report.problems)} problem(s){hint}")
    return 1


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
