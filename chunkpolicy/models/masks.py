"""Attention masks: the blockwise-causal boolean mask over ``[prefix | state | actions]`` blocks, and its additive
(0 / -inf) forms for attention kernels that take a bias."""

from __future__ import annotations

import torch


def blockwise_mask(q_valid: torch.Tensor, q_block: torch.Tensor, k_valid: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, Lq, Lk]``: query i may attend key j iff key j is valid and ``block[j] <= block[i]``.

    Blocks order the sequence (prefix 0 → state 1 → actions 2): bidirectional within a block, causal across blocks.
    An invalid query attends only to itself-equivalent valid keys of its block; a query with no valid key at all is
    given one (its own position when Lq == Lk) so SDPA never returns NaN for padding rows.
    """
    m = (k_block[:, None, :] <= q_block[:, :, None]) & k_valid[:, None, :]
    empty = ~m.any(-1)  # no data-dependent branch: the function stays free of host syncs (CUDA-graph safe)
    m = m | (empty[:, :, None] & torch.eye(m.shape[1], m.shape[2], dtype=torch.bool, device=m.device)[None])
    return m[:, None]


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """bool attention mask → additive fp32 bias (0 where allowed, -inf elsewhere), same shape."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
