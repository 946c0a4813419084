"""The one interface every action head implements, and the head registry.

A head turns an encoded prefix (:class:`~chunkpolicy.models.backbone.PrefixOutput`) into a chunk of H normalized
unified actions ``[B, H, D]``:

* ``loss(backbone, prefix_out, batch, *, generator=None) -> {"loss": scalar, ...metrics}``; ``batch`` holds normalized ``actions
  [B, H, D]``, ``action_mask [B, D]``, ``action_is_pad [B, H]``; losses average only over valid entries.
* ``sample(backbone, prefix_out, batch, *, num_steps=None, generator=None, noise=None) -> [B, H, D]``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import fields, is_dataclass
from typing import Any, Callable

import torch
from torch import nn

HEADS = ("flow_expert", "dit", "tokens")
_REGISTRY: dict[str, tuple[type, type]] = {}


class ActionHead(nn.Module, ABC):
    """Base class; see the module docstring for the contract."""

    def __init__(self, cfg: Any, backbone: nn.Module, horizon: int, action_dim: int) -> None:
        super().__init__()
        self.cfg, self.horizon, self.action_dim = cfg, int(horizon), int(action_dim)

    @abstractmethod
    def loss(self, backbone: nn.Module, prefix_out: Any, batch: dict[str, Any], *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def sample(self, backbone: nn.Module, prefix_out: Any, batch: dict[str, Any], *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor: ...


def register_head(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _REGISTRY[name] = (cls, config_cls)
        return cls

    return deco


def _lookup(name: str) -> tuple[type, type]:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; heads: {list(HEADS)}")
    if name not in _REGISTRY:
        importlib.import_module(f"chunkpolicy.models.heads.{name}")
    return _REGISTRY[name]


def head_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """The head's config dataclass from a plain dict; unknown option names are errors."""
    _, cfg_cls = _lookup(name)
    options = dict(options or {})
    known = {f.name for f in fields(cfg_cls)} if is_dataclass(cfg_cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown options {unknown} for head {name!r}; options: {sorted(known)}")
    return cfg_cls(**options)


def build_head(name: str, cfg: Any, backbone: nn.Module, horizon: int, action_dim: int) -> ActionHead:
    cls, _ = _lookup(name)
    return cls(cfg, backbone, horizon, action_dim)
