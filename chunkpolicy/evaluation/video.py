"""Rollout videos: frames ``uint8 [T, h, w, 3]`` → MP4 (H.264 through PyAV via imageio), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chunkpolicy.atomic import atomic_file


def write_mp4(frames: Sequence[np.ndarray] | np.ndarray, path: str | os.PathLike, fps: float = 20.0) -> Path:
    """Encode ``frames`` (each ``uint8 [h, w, 3]``) to ``path``; h and w are padded to even sizes for yuv420p."""
    import imageio.v3 as iio

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"frames: expected uint8 [T, h, w, 3] with T >= 1, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_file(path) as tmp:
        iio.imwrite(tmp, arr, plugin="pyav", codec="libx264", fps=fps, out_pixel_format="yuv420p")
    return path
