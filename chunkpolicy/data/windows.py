"""Chunk windows: a torch ``Dataset`` over an :class:`EpisodeStore` that yields the batch schema.

Sample for frame ``t`` of an episode spanning ``[s, e)``:

* observation history: frames ``t-T_obs+1 .. t`` (oldest first), clamped at ``s`` by repeating the first frame;
* action chunk: steps ``t .. t+H-1``; steps ``>= e`` repeat the last action and are flagged in ``action_is_pad``;
* everything mapped into the unified space (robot units; the policy normalizes), with validity masks;
* images as uint8 ``[N, T_obs, 3, h, w]`` (the model scales them to [0, 1]).

Delta actions (optional): action dims in ``spec.delta_action_mask()`` become ``a[t+k] - s[t]`` for the state dim of the
same name; grippers and absolute dims stay absolute. The conversion is :class:`~chunkpolicy.delta_actions.DeltaActions`, the same object the policy inverts it with.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.delta_actions import DeltaActions
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import UnifiedSpace


_cv2: Any = None


def _split(hwc: np.ndarray, planes: list[np.ndarray]) -> None:
    """Write the channels of a uint8 ``[h, w, 3]`` frame into three contiguous ``[h, w]`` planes, in place."""
    global _cv2
    if _cv2 is None:  # imported on first use: processes that never read images do not pay for it
        import cv2

        if torch.utils.data.get_worker_info() is not None:
            # a DataLoader worker is one of several processes: OpenCV's own thread pool only oversubscribes the
            # cores (2 workers on 2 cores: 20% more samples/s with one thread)
            cv2.setNumThreads(1)
        _cv2 = cv2
    _cv2.split(np.ascontiguousarray(hwc), planes)


class ChunkWindowDataset(torch.utils.data.Dataset):
    """One sample per frame of the selected episodes of a store (see the module docstring).

    Args:
        store: an :class:`EpisodeStore` or its path.
        space: unified space; the store's embodiment must be registered in it.
        horizon: chunk length H.
        n_obs_steps: observation history T_obs.
        cameras: store cameras to use, in order (default: all of the spec's).
        n_cameras: camera slots N >= len(cameras); extra slots are zero images with ``image_mask`` False.
        image_size: ``(h, w)`` to resize frames to (bilinear, antialiased); None keeps the stored size.
        delta_actions: yield delta actions (see module docstring).
        episodes: episode indices to use (train/val splits); default all.
    """

    def __init__(
        self,
        store: EpisodeStore | str | os.PathLike,
        space: UnifiedSpace,
        horizon: int,
        n_obs_steps: int = 1,
        cameras: Sequence[str] | None = None,
        n_cameras: int | None = None,
        image_size: tuple[int, int] | None = None,
        delta_actions: bool = False,
        episodes: Sequence[int] | None = None,
    ) -> None:
        self.store = store if isinstance(store, EpisodeStore) else EpisodeStore.open(store)
        spec = self.store.spec
        if horizon < 1 or n_obs_steps < 1:
            raise ValueError(f"horizon and n_obs_steps must be >= 1, got {horizon}, {n_obs_steps}")
        try:
            self.embodiment_id = space.id_of(spec.name)
        except KeyError:
            raise KeyError(
                f"{self.store.path}: embodiment {spec.name!r} is not registered in the unified space "
                f"(registered: {[s.name for s in space.embodiments]}); call space.register(store.spec)"
            ) from None
        if space.spec(spec.name) != spec:
            raise ValueError(f"{self.store.path}: embodiment {spec.name!r} differs from the spec registered in the space")
        self.space, self.spec, self.horizon, self.n_obs_steps = space, spec, int(horizon), int(n_obs_steps)
        self.cameras = tuple(spec.cameras if cameras is None else cameras)
        unknown = [c for c in self.cameras if c not in spec.cameras]
        if unknown:
            raise KeyError(f"{self.store.path}: cameras {unknown} not in the store (has {list(spec.cameras)})")
        self.n_cameras = len(self.cameras) if n_cameras is None else int(n_cameras)
        if self.n_cameras < len(self.cameras):
            raise ValueError(f"n_cameras={self.n_cameras} < {len(self.cameras)} cameras used")
        sizes = {self.store.image_shape(c) for c in self.cameras}
        if image_size is None and len(sizes) > 1:
            raise ValueError(f"{self.store.path}: cameras have different sizes {sorted(sizes)}; set image_size")
        self.image_size = tuple(image_size) if image_size is not None else (next(iter(sizes)) if sizes else None)
        self.delta_actions = bool(delta_actions)
        self.deltas = DeltaActions.for_spec(spec)
        self.episodes = np.arange(self.store.num_episodes) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
        if self.episodes.size and (self.episodes.min() < 0 or self.episodes.max() >= self.store.num_episodes):
            raise IndexError(f"episodes: indices outside [0, {self.store.num_episodes})")
        bounds = np.array([self.store.episode_range(int(e)) for e in self.episodes], dtype=np.int64).reshape(-1, 2)
        lengths = bounds[:, 1] - bounds[:, 0]
        self._ep_of = np.repeat(np.arange(len(self.episodes)), lengths)
        self._frame = np.concatenate([np.arange(s, e) for s, e in bounds]) if len(bounds) else np.zeros(0, np.int64)
        self._bounds = bounds
        # masks and constants are the same for every sample: build once
        self._action_mask = torch.from_numpy(space.mask(spec.name, "action"))
        self._state_mask = torch.from_numpy(space.mask(spec.name, "state"))
        delta = np.zeros(space.dim, dtype=bool)
        if self.delta_actions:
            delta[space.indices(spec.name, "action")[self.deltas.on[0].numpy()]] = True
        self._delta_mask = torch.from_numpy(delta)
        self._image_mask = torch.arange(self.n_cameras) < len(self.cameras)

    def __len__(self) -> int:
        return len(self._frame)

    def _indices(self, i: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        t = int(self._frame[i])
        s, e = self._bounds[self._ep_of[i]]
        obs = np.maximum(t - np.arange(self.n_obs_steps - 1, -1, -1), s)
        act = t + np.arange(self.horizon)
        is_pad = act >= e
        return t, obs, np.minimum(act, e - 1), is_pad

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i = i % len(self)
        t, obs, act, is_pad = self._indices(i)
        state = self.store.read_frames("state", obs)  # [T_obs, S]
        actions = self.store.read_frames("action", act)  # [H, A]
        if self.delta_actions:
            actions = self.deltas.to_delta(actions, self.store.read_frames("state", np.array([t]))[0])
        sample: dict[str, Any] = {
            "images": self._images(obs),
            "image_mask": self._image_mask.clone(),
            "state": torch.from_numpy(self.space.pad(np.ascontiguousarray(state, dtype=np.float32), self.embodiment_id, "state")),
            "state_mask": self._state_mask.clone(),
            "actions": torch.from_numpy(self.space.pad(np.ascontiguousarray(actions, dtype=np.float32), self.embodiment_id, "action")),
            "action_mask": self._action_mask.clone(),
            "action_is_pad": torch.from_numpy(is_pad),
            "prompt": self.store.episode_task(int(self.episodes[self._ep_of[i]])),
            "embodiment": torch.tensor(self.embodiment_id, dtype=torch.long),
            "control_hz": torch.tensor(self.spec.control_hz, dtype=torch.float32),
        }
        if self.delta_actions:
            sample["delta_mask"] = self._delta_mask.clone()
        return sample

    def _images(self, obs: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, T_obs, 3, h, w]``; empty camera slots are zeros.

        Frames stay uint8 until the model (4x less memory to copy between DataLoader workers and to the GPU than
        float32); the backbone scales them to [0, 1]."""
        h, w = self.image_size if self.image_size is not None else (1, 1)
        shape = (self.n_cameras, self.n_obs_steps, 3, h, w)
        # only empty camera slots need zeroing
        out = torch.empty(shape, dtype=torch.uint8) if len(self.cameras) == self.n_cameras else torch.zeros(shape, dtype=torch.uint8)
        planes = out.numpy()
        for ci, cam in enumerate(self.cameras):
            hwc = self.store.read_frames(f"images/{cam}", obs)  # [T_obs, h0, w0, 3]
            if hwc.shape[1:3] == (h, w):
                for t in range(len(obs)):  # HWC -> CHW: OpenCV's SIMD split is ~6x faster than a strided torch copy
                    _split(hwc[t], list(planes[ci, t]))
                continue
            frames = torch.from_numpy(hwc).permute(0, 3, 1, 2)
            frames = F.interpolate(frames.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            out[ci] = frames.round_().clamp_(0, 255).to(torch.uint8)
        return out

    def numeric_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (non-padded) action step and every state this dataset yields, in robot dims:
        ``(actions [M, A], states [N, S])`` — what the normalizer should be fitted on (deltas included)."""
        acts, states = [], []
        for s, e in self._bounds:
            a = self.store.read("action", int(s), int(e))
            st = self.store.read("state", int(s), int(e))
            states.append(st)
            if not self.delta_actions:
                acts.append(a)
                continue
            for t in range(e - s):  # every step of every window starting at t
                chunk = a[t : t + self.horizon]
                acts.append(self.deltas.to_delta(chunk, st[t]))
        return np.concatenate(acts), np.concatenate(states)


def window_stats(dataset: ChunkWindowDataset) -> dict[str, dict[str, np.ndarray]]:
    """Exact stats (robot dims) of what ``dataset`` yields: ``{"action": ..., "state": ...}``.

    Without delta actions this equals the store's stats over the selected episodes (each frame counted once).
    """
    acts, states = dataset.numeric_windows()
    out = {"action": compute_stats(acts, field="action")}
    if states.shape[1]:
        out["state"] = compute_stats(states, field="state")
    return out
