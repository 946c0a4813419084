"""Chunk-window loading speed: our zarr episode store vs the same episodes as a LeRobotDataset (image and video).

For each (cameras ∈ {1, 3}) × (T_obs ∈ {1, 2}) × (DataLoader workers ∈ {0, 2}) at 224×224 and H=50, loads shuffled
batches after a warm-up and reports samples/s and samples/s per worker (workers=0 counts as one worker: the main
process). LeRobot is read with ``delta_timestamps`` giving the same observation history and action horizon. The
``ceiling`` format returns one prepared sample of ours for every index (no reads): the most that collation and the
worker transfer allow for batches of that size on this machine. Ours and the ceiling collate with
:func:`chunkpolicy.data.collate.collate_windows`, as the trainer does; LeRobot with PyTorch's default.

    python benchmarks/data_loading.py --out results.json            # full (several minutes on 2 cores)
    python benchmarks/data_loading.py --quick --out /tmp/q.json      # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from chunkpolicy.data.collate import collate_windows
from chunkpolicy.data.lerobot_io import IMAGE_PREFIX, export_lerobot
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.data.windows import ChunkWindowDataset
from chunkpolicy.spaces import UnifiedSpace


class _LeRobotWindows(torch.utils.data.Dataset):
    """LeRobotDataset wrapped so its items collate (drops the string task the same way our prompt is a string)."""

    def __init__(self, root: Path, fps: int, horizon: int, n_obs: int, cams: list[str]) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        obs_ts = [-(n_obs - 1 - i) / fps for i in range(n_obs)]
        delta = {"action": [i / fps for i in range(horizon)], "observation.state": obs_ts}
        delta.update({IMAGE_PREFIX + c: obs_ts for c in cams})
        self.ds = LeRobotDataset("local/bench", root=root, delta_timestamps=delta)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]


class _Constant(torch.utils.data.Dataset):
    """One prepared sample of ``dataset`` returned for every index: no reading or decoding at all, so its loader rate
    is the ceiling that batching and the worker → main-process transfer (shared memory) allow on this machine."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.sample, self.n = dataset[0], len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.sample


def _rate(dataset: torch.utils.data.Dataset, workers: int, batch: int, min_batches: int, min_time: float,
          collate_fn=None) -> float:
    """Samples/s of shuffled batches (sampled with replacement, so one iterator never runs dry), timed after a warm-up
    that fills every worker's prefetch queue, over at least ``min_batches`` batches and ``min_time`` seconds: a fast
    loader otherwise finishes its timed batches before start-up effects (worker spawn, first file opens) are over."""
    g = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**7, generator=g)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
        multiprocessing_context="spawn" if workers else None, collate_fn=collate_fn,
    )
    it = iter(loader)
    for _ in range(2 * max(workers, 1) + 1):  # default prefetch_factor 2 per worker
        next(it)
    n, t = 0, time.perf_counter()
    while n < min_batches or time.perf_counter() - t < min_time:
        next(it)
        n += 1
    dt = time.perf_counter() - t
    del it, loader
    return n * batch / dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data_loading.json")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--episode-len", type=int, default=120)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches, at least")
    p.add_argument("--min-time", type=float, default=3.0, help="timed seconds per setting, at least")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--formats", default="ours,ceiling,lerobot-image,lerobot-video")
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.episode_len, args.size, args.batch, args.batches, args.min_time = 2, 60, 64, 8, 2, 0.2
    workers = [int(w) for w in args.workers.split(",")]
    formats = args.formats.split(",")
    H, fps = 50, 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n_cam in (1, 3):
            cams = ["top", "wrist", "side"][:n_cam]
            spec = make_spec(f"bench{n_cam}", action_dim=7, state_dim=8, cameras=cams, control_hz=fps)
            t = time.perf_counter()
            store = make_synthetic_store(tmp / f"s{n_cam}.zarr", spec, args.episodes, args.episode_len, (args.size, args.size), seed=n_cam)
            print(f"[setup] store {n_cam} cam: {store.num_frames} frames in {time.perf_counter() - t:.1f}s", flush=True)
            roots = {}
            for fmt in formats:
                if fmt.startswith("lerobot"):
                    t = time.perf_counter()
                    roots[fmt] = export_lerobot(store, tmp / f"{fmt}{n_cam}", use_videos=fmt.endswith("video"), progress=False)
                    print(f"[setup] {fmt} {n_cam} cam exported in {time.perf_counter() - t:.1f}s", flush=True)
            space = UnifiedSpace(32, "pad", embodiments=[spec])
            for n_obs in (1, 2):
                for fmt in formats:
                    if fmt in ("ours", "ceiling"):
                        ds = ChunkWindowDataset(store.path, space, horizon=H, n_obs_steps=n_obs)
                        ds = _Constant(ds) if fmt == "ceiling" else ds
                    else:
                        ds = _LeRobotWindows(roots[fmt], fps, H, n_obs, cams)
                    for w in workers:
                        collate = collate_windows if fmt in ("ours", "ceiling") else None  # ours: as the trainer loads
                        r = _rate(ds, w, args.batch, args.batches, args.min_time, collate)
                        row = {"format": fmt, "cameras": n_cam, "n_obs": n_obs, "workers": w,
                               "samples_per_s": round(r, 1), "per_worker": round(r / max(w, 1), 1)}
                        rows.append(row)
                        print(f"{fmt:<14} cams={n_cam} T_obs={n_obs} workers={w}: {r:8.1f} samples/s ({r / max(w, 1):.1f}/worker)", flush=True)
    # speed-up over LeRobot video, per worker, matched settings
    key = lambda r: (r["cameras"], r["n_obs"], r["workers"])  # noqa: E731
    video = {key(r): r["per_worker"] for r in rows if r["format"] == "lerobot-video"}
    for r in rows:
        if r["format"] == "ours" and key(r) in video:
            r["x_vs_lerobot_video"] = round(r["per_worker"] / video[key(r)], 1)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": commit,
            "episodes": args.episodes, "episode_len": args.episode_len, "image": args.size, "H": H, "batch": args.batch,
            "min_batches": args.batches, "min_time_s": args.min_time}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| format | cams | T_obs | workers | samples/s | per worker | × LeRobot video |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['cameras']} | {r['n_obs']} | {r['workers']} | {r['samples_per_s']} | {r['per_worker']} | {r.get('x_vs_lerobot_video', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
