"""Deterministic synthetic episodes (smooth trajectories + images that depend on the state) for tests and benchmarks."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.spaces import EmbodimentSpec


def make_spec(
    name: str = "synthetic",
    action_dim: int = 4,
    state_dim: int = 6,
    cameras: Sequence[str] = ("top",),
    control_hz: float = 10.0,
    gripper: bool = True,
) -> EmbodimentSpec:
    """A spec whose first ``min(action_dim, state_dim) - 1`` action dims share names with state dims (delta-able)
    and whose last action dim is a gripper (when ``gripper``)."""
    n_joint = action_dim - 1 if gripper else action_dim
    actions = [f"joint_{i}" for i in range(n_joint)] + (["gripper"] if gripper else [])
    states = [f"joint_{i}" for i in range(min(n_joint, state_dim))]
    states += [f"state_{i}" for i in range(len(states), state_dim)]
    return EmbodimentSpec(
        name=name,
        action_names=tuple(actions),
        state_names=tuple(states),
        cameras=tuple(cameras),
        control_hz=control_hz,
        gripper_dims=("gripper",) if gripper else (),
    )


def synthetic_episode(spec: EmbodimentSpec, length: int, image_hw: tuple[int, int], rng: np.random.Generator, task: str) -> dict:
    """One episode: sinusoidal joint targets, state = lagged actions, images with a bright square that follows state."""
    t = np.arange(length, dtype=np.float64)[:, None]
    freq = rng.uniform(0.05, 0.3, size=(1, spec.action_dim))
    phase = rng.uniform(0, 2 * np.pi, size=(1, spec.action_dim))
    action = np.sin(freq * t + phase) * rng.uniform(0.5, 2.0, size=(1, spec.action_dim))
    state = np.zeros((length, spec.state_dim))
    k = min(spec.action_dim, spec.state_dim)
    state[:, :k] = np.roll(action[:, :k], 1, axis=0)
    state[0, :k] = action[0, :k]
    if spec.state_dim > k:
        state[:, k:] = rng.normal(size=(1, spec.state_dim - k)) + 0.01 * t
    h, w = image_hw
    images = {}
    for ci, cam in enumerate(spec.cameras):
        base = rng.integers(0, 60, size=(1, h, w, 3), dtype=np.uint8)
        frames = np.repeat(base, length, axis=0)
        cy = ((np.tanh(state[:, 0]) + 1) / 2 * (h - 4)).astype(int)
        cx = ((np.tanh(state[:, min(1, spec.state_dim - 1)] + ci) + 1) / 2 * (w - 4)).astype(int)
        for i in range(length):
            frames[i, cy[i] : cy[i] + 4, cx[i] : cx[i] + 4] = 255
        images[cam] = frames
    return {"action": action.astype(np.float32), "state": state.astype(np.float32), "images": images, "task": task}


def make_synthetic_store(
    path: str | os.PathLike,
    spec: EmbodimentSpec | None = None,
    n_episodes: int = 4,
    episode_len: int | Sequence[int] = 20,
    image_hw: tuple[int, int] = (32, 32),
    seed: int = 0,
    tasks: Sequence[str] = ("pick up the cube", "push the block"),
    overwrite: bool = True,
    compute_stats: bool = True,
) -> EpisodeStore:
    """Create a store at ``path`` with ``n_episodes`` deterministic episodes (lengths cycle through ``episode_len``)."""
    spec = spec or make_spec()
    rng = np.random.default_rng(seed)
    lens = [episode_len] * n_episodes if isinstance(episode_len, int) else [episode_len[i % len(episode_len)] for i in range(n_episodes)]
    store = EpisodeStore.create(path, spec, fps=spec.control_hz, image_shapes={c: image_hw for c in spec.cameras}, overwrite=overwrite)
    for i, n in enumerate(lens):
        store.append_episode(synthetic_episode(spec, n, image_hw, rng, tasks[i % len(tasks)]), seed=seed * 100003 + i)
    if compute_stats:
        store.compute_stats(save=True)
    return store
