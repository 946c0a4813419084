"""Normalization statistics and the one normalizer used by training and inference.

Stats are computed exactly from data (:func:`compute_stats`), stored per embodiment and key
(``stats[embodiment][key][stat] -> [n]`` in the robot's own dims), saved with stores and checkpoints, and applied in one
place, :class:`Normalizer`, inside the policy.

Modes (``[-1, 1]`` targets for the bounded ones):

* ``mean_std``: ``(x - mean) / std``
* ``min_max``: ``(x - (max + min)/2) / ((max - min)/2)``
* ``quantile``: ``(x - (q99 + q01)/2) / ((q99 - q01)/2)`` (not clipped: values outside [q01, q99] exceed ±1)
* ``identity``: no change (must be asked for; never a fallback)

Degenerate dims. A dim is *constant* when ``max - min <= eps`` (e.g. a fixed joint): it carries no information, normalizes
to exactly 0 and unnormalizes to its constant (mean / centre of the mode). A dim whose mode spread is below ``eps`` but
that is *not* constant (``quantile``: ``q01 == q99`` while ``min < max``, e.g. a gripper closed in 0.5% of the frames;
``mean_std``: ``std`` below ``eps`` with ``min < max``, which only happens numerically) is never erased: it falls back to
``min_max`` scaling (centre ``(max + min)/2``, half-range ``(max - min)/2``, so its values stay in [-1, 1] and round-trip
exactly) and the :class:`Normalizer` warns once per embodiment and key, naming the dims. Telling the two cases apart
needs ``min``/``max``: a mode-degenerate dim without them is an error. Dims outside the embodiment's mask are exactly 0
both ways. A missing embodiment, key or stat is an error, never a pass-through.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from chunkpolicy.spaces import UnifiedSpace

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
MODES = ("mean_std", "min_max", "quantile", "identity")
_NEEDS = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "quantile": ("q01", "q99"), "identity": ()}

KeyStats = dict[str, np.ndarray]  # stat name -> [n]
Stats = dict[str, KeyStats]  # key ("action", "state") -> KeyStats


def compute_stats(x: np.ndarray, field: str = "x") -> KeyStats:
    """Exact per-dim statistics of ``x`` ``[N, n]`` (float64): mean, std (population), min, max, q01, q99.

    Quantiles use linear interpolation (``numpy.quantile``); NaN/inf in ``x`` is an error naming ``field``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{field}: stats need a non-empty [N, n] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{field}: contains NaN or inf; cannot compute stats")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0), "q01": q01, "q99": q99}


def stats_to_json(stats: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict:
    """Nested ``{embodiment: {key: {stat: list}}}`` (or ``{key: {stat: list}}``) with plain lists for JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: conv(w) for k, w in v.items()}
        return np.asarray(v, dtype=np.float64).tolist()

    return conv(stats)


def stats_from_json(d: Mapping) -> dict:
    """Inverse of :func:`stats_to_json`: lists become float64 arrays."""

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: conv(w) for k, w in v.items()}
        return np.asarray(v, dtype=np.float64)

    return conv(d)


class Normalizer(nn.Module):
    """Per-embodiment normalization in the unified space.

    Args:
        space: the unified space; every embodiment that will be normalized needs stats.
        stats: ``{embodiment name: {key: {stat: [n]}}}`` in robot dims (``n`` = that embodiment's dims of ``key``).
        modes: ``{key: mode}``, e.g. ``{"action": "quantile", "state": "mean_std"}``.
        eps: a dim with ``max - min <= eps`` is constant; a mode spread ``<= eps`` otherwise falls back to min/max.

    Keys map to spec kinds: ``"action"``/``"actions"`` use action dims, ``"state"`` state dims.
    """

    def __init__(
        self,
        space: UnifiedSpace,
        stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
        modes: Mapping[str, str],
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.space, self.modes, self.eps = space, dict(modes), float(eps)
        self.stats = stats_from_json(stats_to_json(stats))  # private float64 copy
        self._has_host: dict[str, list[bool]] = {}
        for key, mode in self.modes.items():
            if mode not in MODES:
                raise ValueError(f"normalization mode for {key!r} must be one of {MODES}, got {mode!r}")
            self._build(key, mode)

    @staticmethod
    def _kind(key: str) -> str:
        if key in ("action", "actions"):
            return "action"
        if key == "state":
            return "state"
        raise KeyError(f"no normalization defined for key {key!r} (expected 'action' or 'state')")

    def _build(self, key: str, mode: str) -> None:
        kind = self._kind(key)
        E, D = len(self.space.embodiments), self.space.dim
        offset, scale = np.zeros((E, D)), np.ones((E, D))
        live = np.zeros((E, D), dtype=bool)  # valid and non-degenerate
        valid = np.zeros((E, D), dtype=bool)
        has = np.zeros(E, dtype=bool)
        for e, spec in enumerate(self.space.embodiments):
            if spec.name not in self.stats or key not in self.stats[spec.name]:
                continue  # checked at use time: stats can be missing for embodiments never normalized
            ks = self.stats[spec.name][key]
            idx, n = self.space.indices(e, kind), len(spec.names(kind))
            for s in _NEEDS[mode]:
                if s not in ks:
                    raise KeyError(f"stats[{spec.name!r}][{key!r}] has no {s!r} (needed by mode {mode!r})")
                if ks[s].shape != (n,):
                    raise ValueError(f"stats[{spec.name!r}][{key!r}][{s!r}]: expected shape ({n},), got {ks[s].shape}")
                if not np.isfinite(ks[s]).all():
                    raise ValueError(f"stats[{spec.name!r}][{key!r}][{s!r}] contains NaN or inf")
            if mode == "mean_std":
                o, sc = ks["mean"], ks["std"]
            elif mode == "min_max":
                o, sc = (ks["max"] + ks["min"]) / 2, (ks["max"] - ks["min"]) / 2
            elif mode == "quantile":
                o, sc = (ks["q99"] + ks["q01"]) / 2, (ks["q99"] - ks["q01"]) / 2
            else:
                o, sc = np.zeros(n), np.ones(n)
            ok = sc > self.eps
            if mode != "identity" and not ok.all():
                o, sc, ok = self._fallback(spec, key, kind, mode, ks, o, sc, ok)
            offset[e, idx], scale[e, idx] = o, np.where(ok, sc, 1.0)
            live[e, idx], valid[e, idx], has[e] = ok, True, True
        to = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt)  # noqa: E731
        self.register_buffer(f"_{key}_offset", to(offset), persistent=False)
        self.register_buffer(f"_{key}_scale", to(scale), persistent=False)
        self.register_buffer(f"_{key}_live", to(live, torch.bool), persistent=False)
        self.register_buffer(f"_{key}_valid", to(valid, torch.bool), persistent=False)
        self.register_buffer(f"_{key}_has", to(has, torch.bool), persistent=False)
        self._has_host[key] = [bool(h) for h in has]  # host copy for the id checks (no device round trip)

    def _fallback(self, spec, key: str, kind: str, mode: str, ks: KeyStats, o, sc, ok):
        """Dims whose mode spread is ``<= eps``: constant ones (``max - min <= eps``) stay degenerate; the others are
        scaled by min/max (with one warning naming them) instead of being erased."""
        bad = ~ok
        missing = [s for s in ("min", "max") if s not in ks]
        if missing:
            names = [spec.names(kind)[i] for i in np.flatnonzero(bad)]
            raise KeyError(f"stats[{spec.name!r}][{key!r}] has no {missing[0]!r}: needed to tell whether dims {names} "
                           f"(spread <= eps under mode {mode!r}) are constant or only rarely change")
        for s in ("min", "max"):
            if ks[s].shape != sc.shape or not np.isfinite(ks[s]).all():
                raise ValueError(f"stats[{spec.name!r}][{key!r}][{s!r}]: expected {sc.shape[0]} finite values, got {ks[s]}")
        rng = ks["max"] - ks["min"]
        fb = bad & (rng > self.eps)
        if fb.any():
            names = [spec.names(kind)[i] for i in np.flatnonzero(fb)]
            spread = "q01 == q99" if mode == "quantile" else ("std <= eps" if mode == "mean_std" else "half-range <= eps")
            warnings.warn(
                f"normalizer: embodiment {spec.name!r}, key {key!r}, mode {mode!r}: dims {names} have {spread} but "
                f"min < max (rare values, e.g. a gripper that seldom closes); they use min/max scaling instead of being "
                f"normalized to a constant", UserWarning, stacklevel=4)
            o, sc = np.where(fb, (ks["max"] + ks["min"]) / 2, o), np.where(fb, rng / 2, sc)
        return o, sc, ok | fb

    def _params(self, key: str, embodiment: torch.Tensor, ndim: int, check: bool = True):
        if key not in self.modes:
            raise KeyError(f"no normalization mode for key {key!r}; configured: {sorted(self.modes)}")
        has = getattr(self, f"_{key}_has")
        if check:
            self.check_ids(key, embodiment)
        # with check=False the caller validated ids and stats already (keeps graphed inference free of host syncs)
        embodiment = torch.as_tensor(embodiment, dtype=torch.long, device=has.device)
        shape = (embodiment.shape[0],) + (1,) * (ndim - 2) + (-1,)
        return [getattr(self, f"_{key}_{p}")[embodiment].reshape(shape) for p in ("offset", "scale", "live", "valid")]

    def normalize(self, key: str, x: torch.Tensor, embodiment: torch.Tensor, check: bool = True) -> torch.Tensor:
        """``x`` ``[B, ..., D]`` unified robot units → normalized; invalid and degenerate dims are exactly 0.

        ``check=False`` skips the id/stats checks (they sync with the host); only after :meth:`check_ids`."""
        if x.shape[-1] != self.space.dim:
            raise ValueError(f"{key}: expected last dim {self.space.dim}, got shape {tuple(x.shape)}")
        offset, scale, live, _ = self._params(key, embodiment, x.ndim, check)
        y = (x - offset.to(x.dtype)) / scale.to(x.dtype)
        return torch.where(live, y, torch.zeros_like(y))

    def unnormalize(self, key: str, y: torch.Tensor, embodiment: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Inverse of :meth:`normalize`; degenerate dims return their constant, invalid dims exactly 0."""
        if y.shape[-1] != self.space.dim:
            raise ValueError(f"{key}: expected last dim {self.space.dim}, got shape {tuple(y.shape)}")
        offset, scale, live, valid = self._params(key, embodiment, y.ndim, check)
        x = torch.where(live, y * scale.to(y.dtype) + offset.to(y.dtype), offset.to(y.dtype).expand_as(y))
        return torch.where(valid, x, torch.zeros_like(x))

    def check_ids(self, key: str, embodiment: torch.Tensor | Sequence[int]) -> None:
        """Raise if any id is out of range or lacks ``key`` stats (the checks ``check=False`` skips). Host-side:
        at most one device→host copy of ``embodiment`` (none for a list or a CPU tensor)."""
        if key not in self.modes:
            raise KeyError(f"no normalization mode for key {key!r}; configured: {sorted(self.modes)}")
        ids, has_host = torch.as_tensor(embodiment).long().reshape(-1).tolist(), self._has_host[key]
        if any(not 0 <= i < len(has_host) for i in ids):
            raise KeyError(f"embodiment ids {ids} outside the {len(has_host)} registered embodiments")
        names = sorted({self.space.embodiments[i].name for i in ids if not has_host[i]})
        if names:
            raise KeyError(f"no {key!r} stats for embodiment(s) {names}")

    def to_dict(self) -> dict[str, Any]:
        return {"modes": dict(self.modes), "eps": self.eps, "stats": stats_to_json(self.stats)}

    @classmethod
    def from_dict(cls, space: UnifiedSpace, d: Mapping[str, Any]) -> "Normalizer":
        for k in ("modes", "stats"):
            if k not in d:
                raise KeyError(f"normalizer dict has no {k!r}")
        return cls(space, d["stats"], d["modes"], eps=float(d.get("eps", 1e-6)))
