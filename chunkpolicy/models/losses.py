"""Masked losses shared by every head: average only over valid dims and non-padded steps."""

from __future__ import annotations

import torch


def step_dim_weights(action_mask: torch.Tensor, action_is_pad: torch.Tensor) -> torch.Tensor:
    """float ``[B, H, D]``: 1 where the dim is valid (``action_mask [B, D]``) and the step is real
    (``~action_is_pad [B, H]``), else 0."""
    return ((~action_is_pad.bool())[:, :, None] & action_mask.bool()[:, None, :]).float()


def masked_mean(per_element: torch.Tensor, action_mask: torch.Tensor, action_is_pad: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_element [B, H, D]`` over valid entries only.

    Uses ``torch.where`` rather than multiplication so NaN/inf or huge values sitting in padded entries cannot leak
    into the loss or its gradient (their gradient is exactly zero).
    """
    w = step_dim_weights(action_mask, action_is_pad).to(per_element.dtype)
    vals = torch.where(w > 0, per_element, torch.zeros_like(per_element))
    return vals.sum() / w.sum().clamp_min(1.0)
