"""Sinusoidal embedding of scalars (flow / diffusion time)."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars ``t [B]`` → ``[B, dim]`` with periods log-spaced in [min_period, max_period]."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    ang = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).to(t.dtype if t.is_floating_point() else torch.float32)
