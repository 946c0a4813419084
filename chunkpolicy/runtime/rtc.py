"""Real-time chunking (RTC): start the next chunk while the current one runs, and inpaint its first steps.

While chunk k executes, chunk k+1 is sampled from the observation at the switch tick. The ``d`` actions that run during
the inference delay come from chunk k (they are already committed), so chunk k+1 is sampled with *guidance* toward
chunk k's remaining actions: weights ``W_i`` are 1 on the first ``d`` steps (frozen), decay softly over the rest of the
overlap and are 0 on the last ``s`` steps (the execution horizon, which chunk k never covered). At each Euler step
(τ: 0 noise → 1 data, our flow convention) the one-step estimate ``x̂₁ = x + (1 − τ)·v(x, τ)`` is pulled toward the
target with a vector–Jacobian product through the velocity network:

    v ← v + min(β, (1 − τ) / (τ · r²_τ)) · (∂x̂₁/∂x)ᵀ [W ⊙ (target − x̂₁)],   r²_τ = (1 − τ)² / (τ² + (1 − τ)²)

:class:`RTCGuidance` is this rule as a guidance hook of the policy's one sampling loop (:meth:`ChunkPolicy.infer`,
eager or captured in a CUDA graph by :class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy`); it works with any head
that declares ``caps.velocity`` (``flow_expert``; ``dit`` with the flow objective). The target is the previous chunk
mapped into the model's space by :meth:`ChunkPolicy.preprocess_actions` (normalized; relative to the new chunk-start
state with delta actions). :func:`rtc_predict_fn` makes the policy side. The executor,
:class:`~chunkpolicy.runtime.executors.RealTimeChunking` (``rtc``), is torch-free and lives in
:mod:`chunkpolicy.runtime.executors` (re-exported here), so a robot computer runs it without this module.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch

from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.runtime.executors import PredictFn, RealTimeChunking

__all__ = ["rtc_weights", "RTCGuidance", "rtc_target", "rtc_predict_fn", "RealTimeChunking"]


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


class RTCGuidance:
    """The RTC guidance hook for :meth:`ChunkPolicy.infer` / ``head.sample`` (see the module docstring).

    ``target [B, H, D]``: the previous chunk's remaining actions in the policy's normalized model space
    (:func:`rtc_target`); ``weights [H]``: :func:`rtc_weights`. Both are read at call time, so a CUDA graph captured
    with this hook replays with whatever was copied into them (:meth:`set`)."""

    def __init__(self, target: torch.Tensor, weights: torch.Tensor, beta: float = 5.0) -> None:
        self.target, self.weights, self.beta = target, weights, float(beta)

    def set(self, target: torch.Tensor, weights: torch.Tensor) -> None:
        """Copy new values into the hook's tensors in place (what a captured graph reads)."""
        self.target.copy_(target)
        self.weights.copy_(weights)

    def __call__(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, tau: float,
                 t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = velocity(xg, t)
            x1 = xg + (1.0 - tau) * v
            w = self.weights.to(x.dtype)[None, :, None]
            err = w * (self.target.to(x.dtype) - x1.detach())  # the vector-Jacobian product needs the velocity's dtype
            (g,) = torch.autograd.grad(x1, xg, grad_outputs=err)
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        k = self.beta if tau == 0 else min(self.beta, (1 - tau) / (tau * r2))
        return v.detach() + k * g


def rtc_target(policy: ChunkPolicy, prefix: Any, inputs: Mapping[str, torch.Tensor], exec_horizon: int | None,
               prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized unified ``target [B, H, D]`` and guidance ``weights [H]`` for the previous chunk's remaining actions
    ``prefix [B, H', A]`` (robot units) and the new observation's :meth:`ChunkPolicy.prepare_inputs` output (one
    embodiment). The target goes through :meth:`ChunkPolicy.preprocess_actions`: with delta actions it is made
    relative to the new chunk-start state, exactly as the model's output will be."""
    H, D, dev = policy.config.horizon, policy.space.dim, policy.device
    e = int(inputs["embodiment"][0])
    prev = torch.as_tensor(np.asarray(prefix), dtype=torch.float32, device=dev)
    n = prev.shape[1]
    if n > H:
        raise ValueError(f"rtc: prefix has {n} steps, more than the horizon H={H}")
    s = exec_horizon if exec_horizon is not None else H - n
    actions = torch.zeros(prev.shape[0], H, D, device=dev)
    actions[:, :n] = policy.space.pad(prev, e, "action")
    target = policy.preprocess_actions(actions, inputs)
    w = torch.as_tensor(rtc_weights(H, int(prefix_len), s), device=dev)
    w[n:] = 0.0  # steps the previous chunk never covered
    return target, w


def rtc_predict_fn(policy: ChunkPolicy, beta: float = 5.0, num_steps: int | None = None,
                   exec_horizon: int | None = None, generator: torch.Generator | None = None,
                   cuda_graph: bool = False, graph_cache: dict | None = None) -> PredictFn:
    """``predict_fn(obs, prefix=None, prefix_len=0) -> [B, H, A]`` (robot units) for :class:`RealTimeChunking`.

    ``obs`` is a batch-schema observation of one embodiment; ``prefix [B, H', A]`` is the previous chunk's remaining
    actions (robot units), aligned with the new chunk's first steps; ``prefix_len`` the frozen delay ``d``.
    ``cuda_graph``: replay both kinds of chunk from CUDA graphs captured on the first call of each for each batch
    shape; ``graph_cache``: a dict that keeps them across predict functions of the same policy (e.g. every batch of
    an evaluation in one process), else they live as long as this function."""
    if not policy.head.caps.velocity:
        raise ValueError(f"rtc needs a head with a flow velocity (flow_expert, or dit with objective=flow); "
                         f"{type(policy.head).__name__} has none")
    steps = num_steps or policy.head.cfg.num_steps
    graphs: dict[Any, Any] = graph_cache if graph_cache is not None else {}

    @torch.no_grad()
    def predict(obs: dict, prefix: Any = None, prefix_len: int = 0) -> torch.Tensor:
        if prefix is None:
            if not cuda_graph:
                return policy.predict_chunk(obs, num_steps=steps, generator=generator)
            from chunkpolicy.runtime.graphs import CudaGraphPolicy, shape_key

            key = ("plain", steps, shape_key(obs))
            if key not in graphs:
                graphs[key] = CudaGraphPolicy(policy, obs, num_steps=steps)
            e = int(torch.as_tensor(obs["embodiment"])[0])
            return policy.space.unpad(graphs[key](obs, generator=generator), e, "action")
        inp = policy.prepare_inputs(obs, policy.validate(obs, training=False))
        target, w = rtc_target(policy, prefix, inp, exec_horizon, prefix_len)
        noise = torch.randn(target.shape, generator=generator, device=policy.device)
        if cuda_graph:
            from chunkpolicy.runtime.graphs import CudaGraphPolicy, shape_key

            key = ("guided", steps, beta, shape_key(obs))
            if key not in graphs:
                hook = RTCGuidance(torch.zeros_like(target), torch.zeros_like(w), beta)
                graphs[key] = CudaGraphPolicy(policy, obs, num_steps=steps, guidance=hook)
            graphs[key].guidance.set(target, w)
            out = graphs[key](obs, noise=noise)
        else:
            out = policy.infer(inp, noise.float(), steps,
                               guidance=RTCGuidance(target, w, beta))
        return policy.space.unpad(out, int(inp["embodiment"][0]), "action")

    return predict
