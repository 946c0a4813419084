"""Delta ↔ absolute actions, defined once for the data pipeline and the policy.

With delta actions a chunk's delta-able action dims are stored relative to the chunk-start state:
``delta[k] = a[t + k] − s[t]`` for the state dim of the same name (see :meth:`EmbodimentSpec.delta_action_mask`:
grippers and absolute dims never become deltas). The data pipeline applies :meth:`DeltaActions.to_delta` to each
window; the policy applies :meth:`DeltaActions.to_absolute` to each predicted chunk (and ``to_delta`` to actions it is
given in robot units, e.g. real-time chunking's committed prefix). As openpi's ``DeltaActions`` / ``AbsoluteActions``,
the two directions are built from one table, so they cannot disagree.

Two layouts of the same table: :meth:`DeltaActions.for_spec` works in one robot's own dims (actions ``[..., H, A]``,
state ``[..., S]``); :meth:`DeltaActions.for_space` works in unified dims for a batch of embodiment ids (actions
``[B, H, D]``, state ``[B, D]``, ids ``[B]``). Tensors or NumPy arrays in, same type out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace


class DeltaActions(nn.Module):
    """``src [E, n]``: the state dim each action dim is relative to; ``on [E, n]``: whether it is (non-persistent
    buffers: they follow ``.to(device)`` and never enter a checkpoint)."""

    def __init__(self, src: np.ndarray, on: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("src", torch.as_tensor(src, dtype=torch.long), persistent=False)
        self.register_buffer("on", torch.as_tensor(on, dtype=torch.bool), persistent=False)

    @classmethod
    def for_spec(cls, spec: EmbodimentSpec) -> "DeltaActions":
        """Robot dims of one embodiment (use ``embodiment=0``, the default)."""
        mask = spec.delta_action_mask()
        src = np.array([[spec.state_names.index(n) if m else 0 for n, m in zip(spec.action_names, mask)]], dtype=np.int64)
        return cls(src.reshape(1, -1), mask[None])

    @classmethod
    def for_space(cls, space: UnifiedSpace) -> "DeltaActions":
        """Unified dims of every embodiment registered in ``space`` (rows = embodiment ids)."""
        src = np.zeros((len(space.embodiments), space.dim), dtype=np.int64)
        on = np.zeros((len(space.embodiments), space.dim), dtype=bool)
        for e, spec in enumerate(space.embodiments):
            a_u, s_u, mask = space.indices(e, "action"), space.indices(e, "state"), spec.delta_action_mask()
            for j, name in enumerate(spec.action_names):
                if mask[j]:
                    src[e, a_u[j]], on[e, a_u[j]] = int(s_u[spec.state_names.index(name)]), True
        return cls(src, on)

    def to_delta(self, actions: Any, state: Any, embodiment: Any = 0) -> Any:
        """Absolute ``actions [..., H, n]`` → deltas relative to the chunk-start ``state [..., S]``."""
        return self._shift(actions, state, embodiment, -1.0)

    def to_absolute(self, actions: Any, state: Any, embodiment: Any = 0) -> Any:
        """Inverse of :meth:`to_delta`."""
        return self._shift(actions, state, embodiment, 1.0)

    def _shift(self, actions: Any, state: Any, embodiment: Any, sign: float) -> Any:
        if isinstance(actions, np.ndarray):
            # copies: store reads may be read-only views, which torch.from_numpy refuses to wrap silently
            out = self._shift(torch.from_numpy(np.array(actions)), torch.from_numpy(np.array(state)), embodiment, sign)
            return out.numpy().astype(actions.dtype, copy=False)
        if actions.shape[-1] != self.src.shape[1]:
            raise ValueError(f"actions: last dim {actions.shape[-1]} does not match the delta table's {self.src.shape[1]}")
        emb = torch.as_tensor(embodiment, device=self.src.device)
        src, on = self.src[emb], self.on[emb]  # [..., n]
        state = state.to(actions.device)
        src, on = src.to(actions.device), on.to(actions.device)
        if src.ndim < state.ndim:  # one embodiment for a batch of states
            src, on = src.expand(*state.shape[:-1], -1), on.expand(*state.shape[:-1], -1)
        base = state.to(actions.dtype).gather(-1, src)
        return actions + sign * torch.where(on, base, torch.zeros_like(base)).unsqueeze(-2)
