"""Exponential moving average of the trainable parameters (fp32 shadow), swapped in for validation and export.

``shadow ← d · shadow + (1 − d) · θ`` after every optimizer step with ``d = min(decay, (1 + n) / (10 + n))`` (``n`` =
updates so far): early on the average follows the weights closely instead of remembering the random init.
Frozen parameters are not tracked (they never change).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _sharded(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP shard)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.num_updates = float(decay), 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA: model has no parameters {missing[:5]}")
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the shadow towards the weights. ``skip``: a 0-d device tensor, 1 (or True) for a step whose update
        was skipped (the non-finite guard): the shadow then stays as it is, decided on the device without a host sync
        (the update counter, a host number, still advances)."""
        w: float | torch.Tensor = 1.0 - self.current_decay()
        shadows = [self.shadow[n] for n in self.names]
        params = [p.detach() for p in self._params(model)]
        if skip is not None:
            w = (1.0 - skip.to(shadows[0].device, torch.float32)) * w
        if all(p.dtype == torch.float32 and p.device == s.device for p, s in zip(params, shadows)):
            if isinstance(w, torch.Tensor) and not any(_sharded(p) for p in params):
                # a device weight goes as a list: passed as a number it is read on the host (a device sync a step)
                torch._foreach_lerp_(shadows, params, [w] * len(shadows))
            else:  # FSDP shards have no sharding rule for a list of weights: a number (one host read a step)
                torch._foreach_lerp_(shadows, params, float(w))
        else:
            for s, p in zip(shadows, params):
                s.lerp_(p.to(s.device, torch.float32), w)
        self.num_updates += 1

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    @contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model``; the trained weights are restored bit for bit."""
        params = self._params(model)
        with torch.no_grad():
            stash = [p.detach().clone() for p in params]
            for p, n in zip(params, self.names):
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(params, stash):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().contiguous().cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
        if missing or extra:
            raise KeyError(f"EMA state does not match the trainable parameters: missing {missing[:5]}, unexpected {extra[:5]}")
        for n in self.names:
            if state[n].shape != self.shadow[n].shape:
                raise ValueError(f"EMA state {n}: shape {tuple(state[n].shape)} != {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(state[n])
        self.num_updates = int(num_updates)
