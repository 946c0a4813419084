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
from typing import Any, Callable, Mapping

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
    target = target.to(noise.dtype)  # the vector-Jacobian product needs the velocity's dtype
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


def rtc_infer(policy: ChunkPolicy, inputs: Mapping[str, torch.Tensor], noise: torch.Tensor, target: torch.Tensor,
              weights: torch.Tensor, num_steps: int, beta: float = 5.0, fused: Mapping[str, list] | None = None) -> torch.Tensor:
    """Guided chunk ``[B, H, D]`` in robot units (unified space) from :meth:`ChunkPolicy.prepare_inputs` output,
    ``noise [B, H, D]``, the previous chunk's actions as normalized unified ``target [B, H, D]`` and ``weights [H]``.

    Like :meth:`ChunkPolicy.infer` it issues no host syncs, so :class:`CudaGraphRTC` can capture it (vector-Jacobian
    products included). ``fused``: :meth:`ChunkPolicy.fused_layers` snapshots."""
    head, fused = policy.head, fused or {}
    pout, _ = policy._encode(inputs, inputs["image_mask"], inputs["attention_mask"], layers=fused.get("backbone"),
                             hidden=policy._head_reads_hidden, vision_layers=fused.get("vision"))
    kw: dict[str, Any] = {}
    if hasattr(head, "suffix_cache"):  # flow_expert: per-chunk constants once; the guided steps need gradients, so no KV buffers
        kw = {"cache": head.suffix_cache(policy.backbone, pout, buffers=False), **({"layers": fused["head"]} if "head" in fused else {})}
    x = guided_sample(lambda z, t: head.velocity(policy.backbone, pout, z, t, **kw), noise, target, weights,
                      inputs["action_mask"], num_steps, beta)
    return policy.normalizer.unnormalize("action", x.float(), inputs["embodiment"], check=False)


def rtc_target(policy: ChunkPolicy, prefix: Any, embodiment: torch.Tensor, exec_horizon: int | None, prefix_len: int):
    """Normalized unified ``target [B, H, D]`` and guidance ``weights [H]`` for the previous chunk's remaining actions
    ``prefix [B, H', A]`` (robot units) of embodiment ids ``embodiment [B]`` (one embodiment)."""
    H, D, dev = policy.config.horizon, policy.space.dim, policy.device
    e = int(embodiment[0])
    prev = torch.as_tensor(np.asarray(prefix), dtype=torch.float32, device=dev)
    n = prev.shape[1]
    s = exec_horizon if exec_horizon is not None else H - n
    target = torch.zeros(prev.shape[0], H, D, device=dev)
    target[:, :n] = policy.normalizer.normalize("action", policy.space.pad(prev, e, "action"), embodiment)
    w = torch.as_tensor(rtc_weights(H, int(prefix_len), s), device=dev)
    w[n:] = 0.0
    return target, w


def rtc_predict_fn(policy: ChunkPolicy, beta: float = 5.0, num_steps: int | None = None,
                   exec_horizon: int | None = None, generator: torch.Generator | None = None,
                   cuda_graph: bool = False) -> PredictFn:
    """``predict_fn(obs, prefix=None, prefix_len=0) -> [B, H, A]`` (robot units) for :class:`RealTimeChunking`.

    ``obs`` is a batch-schema observation of one embodiment; ``prefix [B, H', A]`` is the previous chunk's remaining
    actions (robot units), aligned with the new chunk's first steps; ``prefix_len`` the frozen delay ``d``.
    ``cuda_graph``: replay both kinds of chunk from CUDA graphs captured on the first call of each (fixed shapes)."""
    head = policy.head
    if not hasattr(head, "velocity"):
        raise ValueError(f"rtc needs a flow head with velocity(); {policy.config.head!r} has none")
    steps = num_steps or getattr(head.cfg, "num_steps", 10)
    graphs: dict[str, Any] = {}

    @torch.no_grad()
    def predict(obs: dict, prefix: Any = None, prefix_len: int = 0) -> torch.Tensor:
        if prefix is None:
            if not cuda_graph:
                return policy.predict_chunk(obs, num_steps=steps, generator=generator)
            if "plain" not in graphs:
                from chunkpolicy.runtime.graphs import CudaGraphPolicy

                graphs["plain"] = CudaGraphPolicy(policy, obs, num_steps=steps)
            e = int(torch.as_tensor(obs["embodiment"])[0])
            return policy.space.unpad(graphs["plain"](obs, generator=generator), e, "action")
        inp = policy.prepare_inputs(obs, policy.validate(obs, training=False))
        emb = inp["embodiment"]
        target, w = rtc_target(policy, prefix, emb, exec_horizon, prefix_len)
        noise = torch.randn(target.shape, generator=generator, device=policy.device)
        if cuda_graph:
            if "guided" not in graphs:
                graphs["guided"] = CudaGraphRTC(policy, obs, num_steps=steps, beta=beta)
            out = graphs["guided"](obs, target, w, noise)
        else:
            out = rtc_infer(policy, inp, noise.to(policy.backbone.state_proj.weight.dtype), target, w, steps, beta)
        return policy.space.unpad(out, int(emb[0]), "action")

    return predict


class CudaGraphRTC:
    """:func:`rtc_infer` replayed from one CUDA graph (prefix, every step's forward and vector-Jacobian product) for
    observations shaped like ``example``; fused-projection weight snapshots as in
    :class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy`."""

    def __init__(self, policy: ChunkPolicy, example: Mapping[str, Any], num_steps: int = 10, beta: float = 5.0,
                 fuse: bool = True, warmup: int = 2, compile: bool = False) -> None:
        """``compile``: ``torch.compile`` the prefix and velocity functions inside the graph, as ``CudaGraphPolicy``
        does (the velocity compiles with its backward, for the vector-Jacobian products)."""
        from chunkpolicy.runtime.graphs import capture, compile_policy_methods, compiled_methods

        self.policy = policy.eval()
        policy.validate(example, training=False)
        dt = policy.backbone.state_proj.weight.dtype
        with torch.no_grad():
            self.inputs = {k: v.clone() for k, v in policy.prepare_inputs(example).items()}
            B, H, D = self.inputs["embodiment"].shape[0], policy.config.horizon, policy.space.dim
            self.noise, self.target = torch.zeros(B, H, D, device=policy.device, dtype=dt), torch.zeros(B, H, D, device=policy.device)
            self.weights = torch.zeros(H, device=policy.device, dtype=torch.float64)
            self.fused = policy.fused_layers() if fuse else None
            self.compiled = compile_policy_methods(policy) if compile else {}
            with compiled_methods(policy, self.compiled):
                self.graph, self.out = capture(lambda: rtc_infer(policy, self.inputs, self.noise, self.target, self.weights,
                                                                 num_steps, beta, self.fused), warmup)

    @torch.no_grad()
    def __call__(self, observation: Mapping[str, Any], target: torch.Tensor, weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Guided chunk ``[B, H, D]`` (robot units, unified); arguments as for :func:`rtc_infer`."""
        from chunkpolicy.runtime.graphs import load_inputs

        load_inputs(self.policy, observation, self.inputs)
        self.target.copy_(target)
        self.weights.copy_(weights)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()


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
