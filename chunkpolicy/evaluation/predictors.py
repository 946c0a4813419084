"""Pieces every closed-loop chunk predictor shares (in-process policies, LeRobot policies, a policy server):

* :func:`observation_history` — the last ``T_obs`` ticks of a batch of envs' observations;
* :func:`do_nothing_predict_fn` — the baseline chunk that keeps each robot still;
* :func:`replace_invalid` — a head's failed samples (NaN / ``last_valid`` False) replaced by their do-nothing chunk.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from chunkpolicy.sim.base import Obs
from chunkpolicy.spaces import EmbodimentSpec

__all__ = ["observation_history", "do_nothing_predict_fn", "replace_invalid"]


def observation_history(T: int) -> tuple[deque[list[Obs]], Callable[[int, list[Obs]], None]]:
    """``(history, on_step)``: the last ``T`` ticks of a batch of envs' observations, the first tick repeated ``T``
    times at an episode start (``on_step(t, obs)`` is :meth:`EnvPool.rollout`'s per-tick hook)."""
    history: deque[list[Obs]] = deque(maxlen=T)

    def on_step(t: int, obs: list[Obs]) -> None:
        if t == 0:
            history.clear()
            history.extend([obs] * T)
        else:
            history.append(obs)

    return history, on_step


def replace_invalid(chunk: torch.Tensor, last_valid: torch.Tensor | None, obs: list[Obs], spec: EmbodimentSpec,
                     on_chunk: Callable[[np.ndarray], None] | None) -> torch.Tensor:
    """``chunk [B, H, A]`` with every sample that has NaN (or ``last_valid`` False) replaced by its env's do-nothing
    chunk; ``on_chunk`` gets the ``[B]`` mask of the replaced samples."""
    bad = torch.isnan(chunk).flatten(1).any(1).cpu().numpy()
    if last_valid is not None:
        lv = torch.as_tensor(last_valid).reshape(-1).cpu().numpy().astype(bool)
        if lv.shape != bad.shape:
            raise ValueError(f"head.last_valid: expected [{bad.shape[0]}] flags, got shape {tuple(lv.shape)}")
        bad |= ~lv
    if bad.any():
        still = do_nothing_predict_fn(spec, chunk.shape[1])([obs[i] for i in np.flatnonzero(bad)])
        chunk = chunk.clone()
        chunk[torch.as_tensor(bad, device=chunk.device)] = torch.as_tensor(still, dtype=chunk.dtype, device=chunk.device)
    if on_chunk is not None:
        on_chunk(bad)
    return chunk


def do_nothing_predict_fn(spec: EmbodimentSpec, horizon: int) -> Callable[..., np.ndarray]:
    """Baseline ``predict_fn``: chunks ``[B, H, A]`` that keep the robot still.

    An action dim with a same-named state dim is a target for that state (absolute, e.g. Push-T's agent position; or
    delta-able, e.g. ALOHA's joint positions, which only become deltas inside the policy) and holds the current state
    value; other dims (displacements, velocities, a gripper command without a state twin) are 0."""
    hold = [(i, spec.state_names.index(n)) for i, n in enumerate(spec.action_names) if n in spec.state_names]

    def predict(obs: list[Obs], **_: Any) -> np.ndarray:
        out = np.zeros((len(obs), horizon, spec.action_dim), dtype=np.float32)
        for b, o in enumerate(obs):
            for a, s in hold:
                out[b, :, a] = o["state"][s]
        return out

    return predict
