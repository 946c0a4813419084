"""Real-time chunking (RTC): start the next chunk while the current one runs, and inpaint its first steps.

While chunk k executes, chunk k+1 is sampled from the observation at the switch tick. The ``d`` actions that run during
the inference delay come from chunk k (they are already committed), so chunk k+1 is sampled with *guidance* toward
chunk k's remaining actions: weights ``W_i`` are 1 on the first ``d`` steps (frozen), decay softly over the rest of the
overlap and are 0 on the last ``s`` steps (the execution horizon, which chunk k never covered). At each Euler step
(τ: 0 noise → 1 data, our flow convention) the one-step estimate ``x̂₁ = x + (1 − τ)·v(x, τ)`` is pulled toward the
target with a vector–Jacobian product through the velocity network:

    v ← v + min(β, (1 − τ) / (τ · r²_τ)) · (∂x̂₁/∂x)ᵀ [W ⊙ (target − x̂₁)],   r²_τ = (1 − τ)² / (τ² + (1 − τ)²)

Works with any head that exposes ``velocity(backbone, prefix_out, x, tau)`` (``flow_expert``; ``dit`` with the flow
objective). :class:`RealTimeChunking` is the executor; :func:`rtc_predict_fn` makes the policy side.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.runtime.executors import ChunkExecutor, PredictFn, register_executor


def rtc_weights(horizon: int, delay: int, exec_horizon: int) -> np.ndarray:
    """Guidance weights ``[H]``: 1 for ``i < d``, exponentially decaying for ``d ≤ i < H − s``, 0 for ``i ≥ H − s``."""
    H, d, s = horizon, delay, exec_horizon
    if not (0 <= d <= H - s and 1 <= s <= H):
        raise ValueError(f"rtc: need 0 <= delay <= H - exec_horizon and 1 <= exec_horizon <= H, got H={H}, d={d}, s={s}")
    w = np.zeros(H)
    w[:d] = 1.0
    for i in range(d, H - s):
        c = (H - s - i) / (H - s - d + 1)
        w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


def guided_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    action_mask: torch.Tensor,
    num_steps: int = 10,
    beta: float = 5.0,
) -> torch.Tensor:
    """Euler integration τ: 0 → 1 with RTC guidance toward ``target [B, H, D]`` (normalized unified actions).

    ``weights [H]`` from :func:`rtc_weights`; ``action_mask [B, D]``: invalid dims stay exactly 0."""
    m = action_mask.bool()[:, None, :].to(noise.dtype)
    w = weights.to(noise)[None, :, None] * m
    x, dt = noise * m, 1.0 / num_steps
    for i in range(num_steps):
        tau = i * dt
        t = torch.full((x.shape[0],), tau, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = velocity(xg, t) * m
            x1 = xg + (1.0 - tau) * v
            err = w * (target - x1.detach())
            (g,) = torch.autograd.grad(x1, xg, grad_outputs=err)
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        k = beta if tau == 0 else min(beta, (1 - tau) / (tau * r2))
        x = (x + dt * (v.detach() + k * g)) * m
    return x.detach()


def rtc_predict_fn(policy: ChunkPolicy, beta: float = 5.0, num_steps: int | None = None,
                   exec_horizon: int | None = None, generator: torch.Generator | None = None) -> PredictFn:
    """``predict_fn(obs, prefix=None, prefix_len=0) -> [B, H, A]`` (robot units) for :class:`RealTimeChunking`.

    ``obs`` is a batch-schema observation of one embodiment; ``prefix [B, H', A]`` is the previous chunk's remaining
    actions (robot units), aligned with the new chunk's first steps; ``prefix_len`` the frozen delay ``d``."""
    head = policy.head
    if not hasattr(head, "velocity"):
        raise ValueError(f"rtc needs a flow head with velocity(); {policy.config.head!r} has none")
    steps = num_steps or getattr(head.cfg, "num_steps", 10)

    @torch.no_grad()
    def predict(obs: dict, prefix: Any = None, prefix_len: int = 0) -> torch.Tensor:
        if prefix is None:
            return policy.predict_chunk(obs, num_steps=steps, generator=generator)
        policy.validate(obs, training=False)
        inp = policy.prepare_inputs(obs)
        emb, H, D = inp["embodiment"], policy.config.horizon, policy.space.dim
        e = int(emb[0])
        prev = torch.as_tensor(np.asarray(prefix), dtype=torch.float32, device=policy.device)
        n = prev.shape[1]
        s = exec_horizon if exec_horizon is not None else H - n
        target = torch.zeros(prev.shape[0], H, D, device=policy.device)
        target[:, :n] = policy.normalizer.normalize("action", policy.space.pad(prev, e, "action"), emb)
        w = torch.as_tensor(rtc_weights(H, int(prefix_len), s), device=policy.device)
        w[n:] = 0.0
        pout, _ = policy._encode(inp, inp["image_mask"], inp["attention_mask"])
        noise = torch.randn(prev.shape[0], H, D, generator=generator, device=policy.device)
        x = guided_sample(lambda z, t: head.velocity(policy.backbone, pout, z, t), noise, target, w, inp["action_mask"], steps, beta)
        return policy.space.unpad(policy.normalizer.unnormalize("action", x, emb), e, "action")

    return predict


class RealTimeChunking(ChunkExecutor):
    """Execute ``s`` actions per chunk; the next chunk is requested ``d`` ticks before the switch would be late.

    At tick ``t`` with ``(t mod s) == 0`` (after the first chunk) the policy is called with ``prefix`` = the current
    chunk's actions from this tick on and ``prefix_len = d``. The first ``d`` actions of the new period are still taken
    from the old chunk (on a robot they run while the model computes), the rest from the new chunk.
    """

    name = "rtc"

    def __init__(self, s: int = 8, d: int = 2) -> None:
        if s < 1 or d < 0 or d > s:
            raise ValueError(f"rtc: need exec horizon s >= 1 and 0 <= delay d <= s, got s={s}, d={d}")
        self.s, self.d = int(s), int(d)
        super().__init__()

    def spec(self) -> str:
        return f"{self.name}:{self.s},{self.d}"

    def _reset(self) -> None:
        self._old: np.ndarray | None = None
        self._new: np.ndarray | None = None
        self._start = 0  # tick at which the current period started

    def _act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        if self._new is None:  # first chunk: nothing to inpaint
            self._new = self._predict(t, obs, predict_fn)
            self._start = t
            if self._new.shape[1] < self.s + self.d:
                raise ValueError(f"rtc: chunk horizon H={self._new.shape[1]} < s + d = {self.s + self.d}")
        elif t - self._start == self.s:
            self._old = self._new
            prefix = self._old[:, self.s :]
            self._new = self._predict(t, obs, predict_fn, prefix=prefix, prefix_len=self.d)
            self._start = t
        i = t - self._start
        if self._old is not None and i < self.d:  # still inside the inference delay: the committed actions run
            return self._old[:, self.s + i]
        return self._new[:, i]


register_executor(RealTimeChunking.name, RealTimeChunking)
