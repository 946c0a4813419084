"""The one interface every action head implements, what a head declares it can do, and the open head registry.

A head turns an encoded prefix (:class:`~chunkpolicy.models.prefix.PrefixOutput`) into a chunk of H normalized
unified actions ``[B, H, D]``:

* ``loss(backbone, prefix_out, batch, *, generator=None) -> {"loss": scalar, ...metrics}``; ``batch`` holds normalized
  ``actions [B, H, D]``, ``action_mask [B, D]``, ``action_is_pad [B, H]``; losses average only over valid entries.
* ``sample(backbone, prefix_out, batch, *, num_steps=None, generator=None, noise=None, layers=None, guidance=None)
  -> [B, H, D]``. A sample whose chunk could not be produced (an invalid token decode) is NaN on its valid dims,
  never a made-up action; ``last_valid`` then says which samples were produced.

Optional abilities are declared, not probed: :meth:`ActionHead.capabilities` returns a :class:`HeadCapabilities`
for a head config (so a config can be checked before any weights exist), and the matching methods below have defaults
that raise. Callers ask ``head.caps.velocity``, never ``hasattr(head, "velocity")``.

Registry: ``@register_head(name)`` on the head class; its config dataclass is ``chunkpolicy.models.heads.configs``'
registered config of the same name. Built-in heads are imported on first use; a third-party head registers itself
when its module is imported.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from chunkpolicy.normalize import MODES

# built-in heads: name -> module that registers it (imported lazily: a head pulls in its own dependencies)
BUILTIN_HEADS = {
    "flow_expert": "chunkpolicy.models.heads.flow_expert",
    "dit": "chunkpolicy.models.heads.dit",
    "tokens": "chunkpolicy.models.heads.tokens",
}
_REGISTRY: dict[str, type] = {}

# A guidance hook steers a flow sampler: ``guidance(velocity, x, tau, t) -> v`` returns the velocity to integrate at
# noisy chunk ``x [B, H, D]``, flow time ``tau`` (a Python float, the same for the batch) and ``t [B]`` (its tensor),
# given the head's ``velocity(x, t) -> [B, H, D]``. Real-time chunking (:mod:`chunkpolicy.runtime.rtc`) is one.
Guidance = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, float, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeadCapabilities:
    """What a head can do (defaults: the least).

    velocity: exposes a flow velocity ``v(x, τ)`` and honours a ``guidance`` hook in :meth:`ActionHead.sample`
        (needed by real-time chunking).
    sync_free_sample: ``sample`` issues no host syncs, so a whole chunk can be captured in a CUDA graph.
    sync_free_loss: ``loss`` issues no host syncs, so a whole training step can be captured in a CUDA graph.
    reads_prefix_hidden: reads the prefix's last hidden states (else only per-layer keys/values, and the backbone
        skips its last layer's unused work).
    compile_layers / fused_layers: :meth:`ActionHead.compile_layers` / :meth:`ActionHead.fused_layers` do something.
    needs_data_fit: must be fitted on normalized training chunks (:meth:`ActionHead.fit_to_data`) before training;
        the fitted state travels in :meth:`ActionHead.state_files`.
    may_fail: ``sample`` can fail for some samples (NaN chunk, ``last_valid`` False).
    action_norms: the action normalizations the head can represent.
    prefix_state_token: the backbone's prefix ends with a state token (``Backbone.state_proj``). False when the
        head embeds the state itself (it then reads the normalized ``state [B, D]`` from its batch) or when the
        state is not a token at all (π0.5 writes it into the prompt).
    embeds_state: the head reads the normalized, masked ``state [B, D]`` (last observation step) from the batch
        given to ``loss`` / ``sample`` and embeds it itself.
    """

    velocity: bool = False
    sync_free_sample: bool = False
    sync_free_loss: bool = False
    reads_prefix_hidden: bool = True
    compile_layers: bool = False
    fused_layers: bool = False
    needs_data_fit: bool = False
    may_fail: bool = False
    action_norms: tuple[str, ...] = MODES
    prefix_state_token: bool = True
    embeds_state: bool = False


class ActionHead(nn.Module, ABC):
    """Base class; see the module docstring for the contract."""

    reserved_token_base: int | None = None  # first backbone vocabulary id the head reserves for itself (tokens head)
    reserved_token_end: int | None = None  # one past its last reserved id
    # None: the prompt tokenizer must not reach the reserved ids; a regex: the head overwrites tokenizer ids whose
    # tokens all match it (least-used ids, e.g. PaliGemma's <loc> tokens), which the policy checks
    reserved_token_pattern: str | None = None
    inference_methods: tuple[str, ...] = ()  # hot methods of sampling worth torch.compile-ing (runtime.graphs)

    def __init__(self, cfg: Any, backbone: nn.Module, horizon: int, action_dim: int) -> None:
        super().__init__()
        self.cfg, self.horizon, self.action_dim = cfg, int(horizon), int(action_dim)
        self.caps = type(self).capabilities(cfg)
        self.last_valid: torch.Tensor | None = None  # [B] bool after sample() when caps.may_fail

    # -- declared abilities ---------------------------------------------------------------------------------------
    @classmethod
    def capabilities(cls, cfg: Any) -> HeadCapabilities:
        """What a head with config ``cfg`` can do; override in subclasses."""
        return HeadCapabilities()

    # -- required -------------------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, backbone: nn.Module, prefix_out: Any, batch: dict[str, Any], *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def sample(self, backbone: nn.Module, prefix_out: Any, batch: dict[str, Any], *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               layers: Sequence[Any] | None = None, guidance: Guidance | None = None) -> torch.Tensor: ...

    # -- optional (declared in capabilities) ----------------------------------------------------------------------
    def velocity(self, backbone: nn.Module, prefix_out: Any, x: torch.Tensor, tau: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Flow velocity ``[B, H, D]`` at noisy chunk ``x [B, H, D]``, flow time ``tau [B]`` (``caps.velocity``)."""
        raise NotImplementedError(f"{type(self).__name__} has no flow velocity")

    def compile_layers(self, **compile_kw: Any) -> None:
        """``torch.compile`` the head's per-layer training work (``caps.compile_layers``); a no-op by default."""

    def fused_layers(self) -> list:
        """Inference snapshots of the head's Gemma layers (``caps.fused_layers``)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused layers")

    def fp32_modules(self) -> list[nn.Module]:
        """Submodules whose parameters keep their fp32 values when the policy is cast to bf16 / fp16
        (``ChunkPolicy.to(dtype)``); the head casts their inputs and outputs itself. None by default."""
        return []

    def fit_to_data(self, chunks: Sequence[np.ndarray]) -> None:
        """Fit data-dependent state on normalized training chunks, each ``[H, d]`` of one sample's valid dims
        (``caps.needs_data_fit``)."""
        raise NotImplementedError(f"{type(self).__name__} needs no fitting")

    def is_fitted(self) -> bool:
        """Whether :meth:`fit_to_data` has run (or its state was loaded); always True for heads that need no fit."""
        return True

    def state_files(self) -> dict[str, str]:
        """Non-tensor state saved with the checkpoint under ``head/`` (file name → text)."""
        return {}

    def load_state_files(self, files: dict[str, str]) -> None:
        """Inverse of :meth:`state_files`."""


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make an :class:`ActionHead` subclass buildable as ``name``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, ActionHead)):
            raise TypeError(f"register_head({name!r}): {cls!r} is not an ActionHead subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register_head: {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return deco


def available_heads() -> list[str]:
    return sorted(set(BUILTIN_HEADS) | set(_REGISTRY))


def head_class(name: str) -> type:
    """The head class registered as ``name`` (built-ins are imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN_HEADS:
        importlib.import_module(BUILTIN_HEADS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown head {name!r}; heads: {available_heads()}")
    return _REGISTRY[name]


def build_head(name: str, cfg: Any, backbone: nn.Module, horizon: int, action_dim: int) -> ActionHead:
    return head_class(name)(cfg, backbone, horizon, action_dim)
