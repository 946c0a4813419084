"""Cost of the per-chunk crc32c (store format v2) on the fast frame reader, isolated from everything else.

Builds one synthetic store (224x224 frames, lz4) and a copy with the very same compressed chunks minus their crc32c
(a format v1 store), then times ``EpisodeStore.read_frames`` on the same random frame indices, alternating between the
two so that load from other processes hits both alike; reports the best of ``--repeats`` rounds of process CPU time
per frame.

    python benchmarks/frame_checksum_cost.py [--size 224] [--frames 960] [--batch 64] [--repeats 15] [--content noise]

``--content synthetic`` (default): the data-loading benchmark's frames (mostly flat, chunks of a few KiB);
``noise``: uniform random pixels, which lz4 cannot compress: the largest chunk a frame can have, the worst case for a
checksum over the chunk bytes (real camera frames lie in between).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store


def _strip_checksums(src: Path, dst: Path) -> None:
    """Copy a v2 store as v1: every image chunk without its trailing 4-byte crc32c, codecs and version to match."""
    shutil.copytree(src, dst)
    for meta in dst.glob("data/images/*/zarr.json"):
        doc = json.loads(meta.read_text())
        doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]
        meta.write_text(json.dumps(doc))
        for chunk in meta.parent.glob("c/**/*"):
            if chunk.is_file():
                chunk.write_bytes(chunk.read_bytes()[:-4])
    root = dst / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["format_version"] = 1
    root.write_text(json.dumps(doc))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--frames", type=int, default=960)
    p.add_argument("--batch", type=int, default=64, help="frames per read_frames call")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--content", choices=("synthetic", "noise"), default="synthetic")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec("bench", action_dim=7, state_dim=8, cameras=("cam0",))
        store = make_synthetic_store(Path(tmp) / "v2.zarr", spec, n_episodes=8, episode_len=a.frames // 8,
                                     image_hw=(a.size, a.size), compute_stats=False)
        if a.content == "noise":
            store = EpisodeStore.create(store.path, spec, fps=10, image_shapes={"cam0": (a.size, a.size)}, overwrite=True)
            g = np.random.default_rng(1)
            for _ in range(8):
                T = a.frames // 8
                store.append_episode({"action": np.zeros((T, 7), np.float32), "state": np.zeros((T, 8), np.float32),
                                      "images": {"cam0": g.integers(0, 256, (T, a.size, a.size, 3), dtype=np.uint8)},
                                      "task": "noise"})
        v2 = store.path
        v1 = Path(tmp) / "v1.zarr"
        _strip_checksums(v2, v1)
        stores = {"crc32c (v2)": EpisodeStore.open(v2), "none (v1)": EpisodeStore.open(v1)}
        assert stores["crc32c (v2)"].checksummed and not stores["none (v1)"].checksummed
        rng = np.random.default_rng(0)
        idx = [rng.integers(0, a.frames, a.batch) for _ in range(20)]
        ref = {k: s.read_frames("images/cam0", idx[0]) for k, s in stores.items()}  # warm-up (page cache, imports)
        assert np.array_equal(*ref.values())
        sizes = [f.stat().st_size for f in (v2 / "data/images/cam0/c").glob("*/0/0/0")]
        best = {k: np.inf for k in stores}
        for _ in range(a.repeats):
            for k, s in stores.items():
                t = time.process_time()  # CPU time of this process: less disturbed by a busy machine than wall time
                for ix in idx:
                    s.read_frames("images/cam0", ix)
                best[k] = min(best[k], (time.process_time() - t) / (len(idx) * a.batch))
        us = {k: v * 1e6 for k, v in best.items()}
        print(f"{a.content} {a.size}x{a.size} frames, mean chunk {np.mean(sizes) / 1024:.1f} KiB (raw {a.size * a.size * 3 / 1024:.1f} KiB)")
        for k, v in us.items():
            print(f"  checksum {k:<12} {v:6.1f} us/frame CPU (read + verify + decode, best of {a.repeats})")
        c, n = us["crc32c (v2)"], us["none (v1)"]
        print(f"  crc32c costs {c - n:+.1f} us/frame ({(c / n - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
