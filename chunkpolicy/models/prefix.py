"""The prefix contract between the backbone and the heads: :class:`Prefix` (embedded tokens before the transformer)
and :class:`PrefixOutput` (encoded once per chunk: hidden states and per-layer keys/values).

Layout (P tokens): ``[image tokens (N cams × T_obs frames) | text tokens | state token]``, blocks 0 (images + text) and
1 (state); see :meth:`chunkpolicy.models.backbone.Backbone.embed_prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prefix:
    """Embedded prefix before the transformer: ``embeds [B, P, W]``, ``valid [B, P]`` (bool), ``block [B, P]``
    (0 = images + text, 1 = state), ``positions [B, P]`` (RoPE positions, counting valid tokens only)."""

    embeds: torch.Tensor
    valid: torch.Tensor
    block: torch.Tensor
    positions: torch.Tensor


@dataclass
class PrefixOutput:
    """Encoded prefix, computed once per chunk.

    ``hidden [B, P, W]`` final-norm hidden states (None when the caller asked for keys/values only); ``valid [B, P]``;
    ``kv`` one ``(key, value)`` per LM layer, each ``[B, kv_heads, P, head_dim]`` after RoPE (empty for the ``siglip``
    variant); ``next_position [B]`` the RoPE position of the first suffix token.
    """

    hidden: torch.Tensor | None
    valid: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next_position: torch.Tensor | None = None
