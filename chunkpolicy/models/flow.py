"""The flow-matching convention, defined once (every flow head uses these functions).

τ = 0 is pure noise, τ = 1 is data:  ``x_τ = τ·a + (1 − τ)·ε``, target velocity ``u = a − ε``.
Training τ is skewed toward noise as in π0 (which draws its noise-time from Beta(1.5, 1) with t = 1 = noise; we
mirror it): ``τ = 1 − (0.999·s + 0.001)``, ``s ~ Beta(1.5, 1)``, so τ ∈ [0, 0.999].
Sampling integrates dx/dτ = v(x, τ) from τ = 0 to 1 with N Euler steps (default 10).
"""

from __future__ import annotations

from typing import Callable

import torch

DEFAULT_STEPS = 10


def sample_tau(batch: int, *, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Training flow times ``[B]`` skewed toward noise (see module docstring)."""
    # Beta(1.5, 1) by inverse CDF (F(s) = s^1.5), so a torch.Generator makes it reproducible.
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    s = u ** (1.0 / 1.5)
    return (1.0 - (0.999 * s + 0.001)).to(dtype)


def interpolate(actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``x_τ = τ·a + (1 − τ)·ε`` with ``tau [B]`` broadcast over ``[B, ...]``."""
    t = tau.reshape(-1, *([1] * (actions.ndim - 1))).to(actions.dtype)
    return t * actions + (1 - t) * noise


def target_velocity(actions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``u = a − ε`` (constant along the straight path)."""
    return actions - noise


def euler_integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, num_steps: int = DEFAULT_STEPS,
    guidance: Callable | None = None, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from τ = 0 (``noise``) to τ = 1 with ``num_steps`` Euler steps; ``velocity(x, tau[B])``.

    ``guidance(velocity, x, tau, t) -> v`` (see :data:`chunkpolicy.models.heads.base.Guidance`) replaces the plain
    velocity at every step; ``mask`` (broadcastable to ``x``, 0/1) is then re-applied to every update, since a
    guidance term may reach dims the velocity never writes. The τ grid is built on the device once, so the loop
    issues no host syncs. ``x`` and ``tau`` reach ``velocity`` in fp32 (a bf16 model casts them itself); the result
    is fp32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # the state and the flow time stay fp32 whatever the model's dtype: in bf16 each step would round x (~0.4 %), and
    # τ itself (0.7 → 0.699), which the time embedding's shortest periods (a few thousandths) turn into noise
    x, dt = noise.float(), 1.0 / num_steps
    taus = torch.arange(num_steps, device=noise.device, dtype=torch.float32) * dt
    for i in range(num_steps):
        t = taus[i].expand(noise.shape[0])
        if guidance is None:
            x = x + dt * velocity(x, t)
        else:
            v = guidance(velocity, x, i * dt, t)
            x = x + dt * (v if mask is None else v * mask)
    return x
