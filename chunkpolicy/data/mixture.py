"""Cross-embodiment mixtures: several chunk-window datasets in one, with per-dataset sampling weights.

Dataset ``i`` with ``n_i`` windows is drawn with probability ``p_i ∝ w_i · n_i**alpha`` (defaults ``w_i = 1``,
``alpha = 1``: plain concatenation; ``alpha = 0``: weights only; π0 used ``alpha = 0.43``), then a window uniformly
within it. All items share the unified dim D, the camera slots (padded to the largest camera count, mask False) and
the image size, so they collate into one batch; every sample carries its embodiment id and masks.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from chunkpolicy.data.windows import ChunkWindowDataset


class MixtureDataset(torch.utils.data.Dataset):
    """Concatenation of :class:`ChunkWindowDataset` s with sampling probabilities (see module docstring)."""

    def __init__(
        self,
        datasets: Sequence[ChunkWindowDataset],
        weights: Sequence[float] | None = None,
        alpha: float | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        self.datasets = list(datasets)
        first = self.datasets[0]
        for i, d in enumerate(self.datasets):
            for attr in ("horizon", "n_obs_steps", "delta_actions"):
                if getattr(d, attr) != getattr(first, attr):
                    raise ValueError(f"datasets[{i}].{attr}={getattr(d, attr)} differs from datasets[0] ({getattr(first, attr)})")
            if d.space is not first.space and d.space.to_dict() != first.space.to_dict():
                raise ValueError(f"datasets[{i}] uses a different unified space")
            if d.image_size != first.image_size:
                raise ValueError(
                    f"datasets[{i}].image_size={d.image_size} differs from datasets[0] ({first.image_size}); "
                    "build all datasets with the same image_size"
                )
            if len(d) == 0:
                raise ValueError(f"datasets[{i}] ({d.store.path}) has no windows")
        n_cam = max(d.n_cameras for d in self.datasets)
        for d in self.datasets:  # pad camera slots to the largest count
            d.n_cameras = n_cam
            d._image_mask = torch.arange(n_cam) < len(d.cameras)
        w = np.ones(len(self.datasets)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.datasets),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights: expected {len(self.datasets)} non-negative finite numbers (not all 0), got {weights!r}")
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        p = w * self.sizes.astype(np.float64) ** self.alpha
        self.probs = p / p.sum()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index → ``(dataset index, local index)``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return d, int(i - self.offsets[d])

    def __getitem__(self, i: int) -> dict[str, Any]:
        d, j = self.locate(int(i))
        return self.datasets[d][j]


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Weighted sampler over a :class:`MixtureDataset` (or any dataset, with a single weight).

    Deterministic given ``(seed, epoch)``; each epoch yields ``num_samples`` global indices. Resumable: the trainer
    records how many samples of the current epoch it consumed and restores them with :meth:`load_state_dict`, so a
    resumed run sees exactly the same order (the sampler itself cannot know what a prefetching DataLoader consumed).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int | None = None, seed: int = 0) -> None:
        self.dataset = dataset
        self.num_samples = int(num_samples if num_samples is not None else len(dataset))  # type: ignore[arg-type]
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        self.seed, self.epoch, self.position = int(seed), 0, 0

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        ds = self.dataset
        if isinstance(ds, MixtureDataset):
            which = rng.choice(len(ds.sizes), size=self.num_samples, p=ds.probs)
            local = np.floor(rng.random(self.num_samples) * ds.sizes[which]).astype(np.int64)
            return ds.offsets[which] + local
        return rng.integers(0, len(ds), size=self.num_samples)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.position
        idx = self._draw(epoch)
        # the next iteration starts a fresh epoch unless the trainer restores a position
        self.epoch, self.position = epoch + 1, 0
        for k in range(start, self.num_samples):
            yield int(idx[k])

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = int(epoch), int(position)

    def state_dict(self, epoch: int | None = None, position: int | None = None) -> dict[str, int]:
        """``{"seed", "epoch", "position"}``; pass what the trainer consumed (epoch, samples into it)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch if epoch is None else int(epoch),
            "position": self.position if position is None else int(position),
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "epoch", "position"):
            if k not in state:
                raise KeyError(f"sampler state has no {k!r}")
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(f"sampler state num_samples={state['num_samples']} != {self.num_samples}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
