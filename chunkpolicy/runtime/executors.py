"""Chunk executors: what runs on the robot each control tick, given a policy that predicts chunks of H actions.

Every executor has the same interface::

    ex = make_executor("open_loop:8")          # or OpenLoop(8), TemporalEnsemble(0.01), ...
    ex.reset()
    obs = env.reset(seed)
    for t in range(max_steps):
        action = ex.act(t, obs, predict_fn)     # calls predict_fn(obs) only when it needs a new chunk
        obs, reward, done, info = env.step(action)

``predict_fn(obs)`` returns one chunk ``[H, A]`` in robot units, or ``[B, H, A]`` for ``B`` environments stepping in
lockstep (then ``act`` returns ``[B, A]``). NumPy arrays and torch tensors are both accepted; ``act`` always returns a
float32 NumPy array. ``obs`` is passed through untouched, so it can be anything ``predict_fn`` understands (a list of
env observations, a ready batch dict, ...). Ticks must be consecutive from 0 after ``reset`` (a skipped or repeated tick
raises), so an executor never silently drifts out of step with the environment.

Adding an executor: subclass :class:`ChunkExecutor`, implement ``_reset`` and ``_act``, and call
:func:`register_executor`; override :meth:`ChunkExecutor.will_predict` when the ticks at which it calls the policy
are known ahead (a simulator then renders camera frames only for those ticks). Executors that need more from the
policy than an observation pass extra keyword arguments to ``predict_fn``: :class:`RealTimeChunking` (``rtc``)
conditions the next chunk on the actions that will already have run during the inference delay,
``predict_fn(obs, prefix=..., prefix_len=d)``; the policy side decides how to honour them (in process
:func:`chunkpolicy.runtime.rtc.rtc_predict_fn`, which needs torch; over the wire
:class:`chunkpolicy.serving.client.PolicyClient`). :meth:`ChunkExecutor._predict` is the one place that calls the
policy, validates the chunk and counts calls.

This module imports only numpy, so every executor, ``rtc`` included, runs on a robot computer without torch.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable

import numpy as np

PredictFn = Callable[..., Any]

__all__ = [
    "ChunkExecutor",
    "OpenLoop",
    "TemporalEnsemble",
    "RealTimeChunking",
    "ensemble_weights",
    "register_executor",
    "available_executors",
    "make_executor",
    "check_executor",
]


def _to_numpy(chunk: Any) -> np.ndarray:
    if hasattr(chunk, "detach"):  # torch.Tensor without importing torch here
        chunk = chunk.detach().float().cpu().numpy()
    return np.asarray(chunk, dtype=np.float64)


class ChunkExecutor(ABC):
    """Base class: tick bookkeeping, chunk validation and call counting.

    Attributes:
        num_predictions: how many times ``predict_fn`` was called since :meth:`reset`.
        predicted: whether the last :meth:`act` called ``predict_fn``.
        prediction_ticks: the ticks at which ``predict_fn`` was called since :meth:`reset`.
    """

    name: str = "executor"
    # head capabilities (names of HeadCapabilities flags) the policy must declare for this executor to work
    needs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    # -- public ---------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every chunk; the next tick must be 0."""
        self._tick = 0
        self._batched: bool | None = None  # shape of the first chunk fixes B and A until the next reset
        self._batch: int | None = None
        self._action_dim: int | None = None
        self.num_predictions = 0
        self.predicted = False
        self.prediction_ticks: list[int] = []
        self._reset()

    def act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        """Action for control tick ``t``: float32 ``[A]``, or ``[B, A]`` when ``predict_fn`` returns ``[B, H, A]``."""
        if int(t) != self._tick:
            raise ValueError(
                f"{self.name}: expected tick {self._tick} (ticks run 0, 1, 2, ... after reset()), got t={t}"
            )
        self.predicted = False
        action = self._act(self._tick, obs, predict_fn)
        self._tick += 1
        action = np.asarray(action, dtype=np.float32)
        return action if self._batched else action[0]

    @property
    def tick(self) -> int:
        """The tick the next :meth:`act` call must pass."""
        return self._tick

    def will_predict(self, t: int) -> bool:
        """Whether ``act(t)`` will call ``predict_fn``, judged from the ticks acted on so far (``t >= tick``).

        Never False for a tick at which it will predict; True when the executor cannot tell (the default: every
        tick). Callers use it to skip work for observations the policy will not see (rendering frames)."""
        if int(t) < self._tick:
            raise ValueError(f"{self.name}: will_predict({t}) asks about a tick already acted on (next tick {self._tick})")
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"

    def spec(self) -> str:
        """The string :func:`make_executor` turns back into this executor."""
        return self.name

    # -- for subclasses -------------------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        """Return the action ``[B, A]`` (always batched inside) for tick ``t``."""

    def _predict(self, t: int, obs: Any, predict_fn: PredictFn, **kwargs: Any) -> np.ndarray:
        """Call the policy and return its chunk as float64 ``[B, H, A]`` (B=1 for an unbatched policy)."""
        chunk = _to_numpy(predict_fn(obs, **kwargs))
        if chunk.ndim not in (2, 3):
            raise ValueError(f"{self.name}: predict_fn must return [H, A] or [B, H, A], got shape {chunk.shape}")
        batched = chunk.ndim == 3
        chunk = chunk if batched else chunk[None]
        if self._batched is None:
            self._batched, self._batch, self._action_dim = batched, chunk.shape[0], chunk.shape[2]
        elif (batched, chunk.shape[0], chunk.shape[2]) != (self._batched, self._batch, self._action_dim):
            want = f"[{self._batch}, H, {self._action_dim}]" if self._batched else f"[H, {self._action_dim}]"
            raise ValueError(f"{self.name}: predict_fn returned shape {chunk.shape[int(not batched):]} "
                             f"after earlier chunks of shape {want}")
        if chunk.shape[1] < 1:
            raise ValueError(f"{self.name}: predict_fn returned an empty chunk (H=0)")
        if not np.isfinite(chunk).all():
            raise ValueError(f"{self.name}: predict_fn returned NaN or inf at tick {t}")
        self.num_predictions += 1
        self.predicted = True
        self.prediction_ticks.append(t)
        return chunk


class OpenLoop(ChunkExecutor):
    """Run the first ``k`` actions of each chunk, then predict again (π0, Diffusion Policy).

    The policy is called at ticks 0, k, 2k, ... . ``k=None`` runs each whole chunk (k = H of the first chunk).
    A chunk shorter than ``k`` is an error.
    """

    name = "open_loop"

    def __init__(self, k: int | None = None) -> None:
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"open_loop: k must be a positive int (actions run per chunk) or None, got {k!r}")
        self.k = None if k is None else int(k)
        super().__init__()

    def spec(self) -> str:
        return self.name if self.k is None else f"{self.name}:{self.k}"

    def _reset(self) -> None:
        self._chunk: np.ndarray | None = None
        self._pos = 0

    def will_predict(self, t: int) -> bool:
        super().will_predict(t)
        if self._chunk is None:  # the next act predicts; after it, every k ticks (k=None: the horizon, unknown yet)
            return t == self._tick or self.k is None or (t - self._tick) % self.k == 0
        k = self.k if self.k is not None else self._chunk.shape[1]
        nxt = self._tick + k - self._pos  # the tick at which this chunk runs out
        # k=None: later chunks may have another horizon, so beyond the next prediction every tick may be one
        return t == nxt or (t > nxt and (self.k is None or (t - nxt) % k == 0))

    def _act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        k = self.k if self.k is not None else (self._chunk.shape[1] if self._chunk is not None else None)
        if self._chunk is None or self._pos >= k:
            self._chunk = self._predict(t, obs, predict_fn)
            self._pos = 0
            k = self.k if self.k is not None else self._chunk.shape[1]
            if self._chunk.shape[1] < k:
                raise ValueError(f"open_loop: chunk horizon H={self._chunk.shape[1]} is shorter than k={k}")
        action = self._chunk[:, self._pos]
        self._pos += 1
        return action


def ensemble_weights(n: int, m: float) -> np.ndarray:
    """Normalised temporal-ensembling weights for ``n`` chunks covering one tick, **oldest first**.

    ``w_i = exp(-m·i) / Σ_j exp(-m·j)`` with ``i = 0`` the oldest prediction (ACT's convention: for ``m > 0`` older
    predictions weigh more; ``m = 0`` is a plain mean; ``m < 0`` favours the newest).
    """
    w = np.exp(-float(m) * np.arange(n, dtype=np.float64))
    return w / w.sum()


class TemporalEnsemble(ChunkExecutor):
    """Predict every tick; send the weighted mean of every chunk that covers the current tick (ACT).

    A chunk predicted at tick ``s`` with horizon ``H`` covers ticks ``s .. s+H-1`` and proposes ``chunk[t - s]`` for
    tick ``t``. With the ``n`` covering chunks ordered **oldest first** (``i = 0`` is the oldest prediction), the action
    is ``Σ_i w_i · a_i`` with ``w_i = exp(-m·i) / Σ_j exp(-m·j)``. This is ACT's convention: with ``m > 0`` *older*
    predictions weigh *more*; ACT uses ``m = 0.01``. Larger ``m`` trusts the oldest chunk more, ``m = 0`` averages.
    """

    name = "temporal_ensemble"

    def __init__(self, m: float = 0.01) -> None:
        if isinstance(m, bool) or not isinstance(m, (int, float, np.floating, np.integer)) or not math.isfinite(m):
            raise ValueError(f"temporal_ensemble: m must be a finite number, got {m!r}")
        self.m = float(m)
        super().__init__()

    def spec(self) -> str:
        return f"{self.name}:{self.m:g}"

    def _reset(self) -> None:
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (start tick, [B, H, A]), oldest first

    def _act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        self._chunks.append((t, self._predict(t, obs, predict_fn)))
        # drop chunks that no longer cover t (a filter, not a pop from the left: horizons may differ between calls)
        self._chunks = deque((s, c) for s, c in self._chunks if s + c.shape[1] > t)
        proposals = [c[:, t - s] for s, c in self._chunks]  # oldest first; the newest always covers t
        w = ensemble_weights(len(proposals), self.m)
        return np.tensordot(w, np.stack(proposals), axes=1)


class RealTimeChunking(ChunkExecutor):
    """Execute ``s`` actions per chunk; the next chunk is requested ``d`` ticks before the switch would be late.

    At tick ``t`` with ``(t mod s) == 0`` (after the first chunk) the policy is called with ``prefix`` = the current
    chunk's actions from this tick on and ``prefix_len = d``. The first ``d`` actions of the new period are still taken
    from the old chunk (on a robot they run while the model computes), the rest from the new chunk. Needs a chunk
    horizon ``H >= s + d`` and a policy that honours ``prefix``/``prefix_len`` (guided flow sampling,
    :mod:`chunkpolicy.runtime.rtc`); ``d`` may be changed between switches (the serving client sets it from the
    measured latency).
    """

    name = "rtc"
    needs = ("velocity",)  # guidance steers a flow sampler

    def __init__(self, s: int = 8, d: int = 2) -> None:
        if s < 1 or d < 0 or d > s:
            raise ValueError(f"rtc: need exec horizon s >= 1 and 0 <= delay d <= s, got s={s}, d={d}")
        self.s, self.d = int(s), int(d)
        super().__init__()

    def spec(self) -> str:
        return f"{self.name}:{self.s},{self.d}"

    def _reset(self) -> None:
        self._old: np.ndarray | None = None
        self._new: np.ndarray | None = None
        self._start = 0  # tick at which the current period started

    def will_predict(self, t: int) -> bool:
        super().will_predict(t)
        start = self._tick if self._new is None else self._start  # a period starts at each prediction
        return (t - start) % self.s == 0 and (t > start or self._new is None)

    def _act(self, t: int, obs: Any, predict_fn: PredictFn) -> np.ndarray:
        if self._new is None:  # first chunk: nothing to inpaint
            self._new = self._predict(t, obs, predict_fn)
            self._start = t
            if self._new.shape[1] < self.s + self.d:
                raise ValueError(f"rtc: chunk horizon H={self._new.shape[1]} < s + d = {self.s + self.d}")
        elif t - self._start == self.s:
            self._old = self._new
            prefix = self._old[:, self.s :]
            self._new = self._predict(t, obs, predict_fn, prefix=prefix, prefix_len=self.d)
            self._start = t
        i = t - self._start
        if self._old is not None and i < self.d:  # still inside the inference delay: the committed actions run
            return self._old[:, self.s + i]
        return self._new[:, i]


# -- registry --------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[ChunkExecutor]] = {}


def register_executor(name: str, cls: type[ChunkExecutor]) -> None:
    """Make ``cls`` available to :func:`make_executor` as ``name``; its ``__init__`` parameters become the spec args."""
    if not (isinstance(cls, type) and issubclass(cls, ChunkExecutor)):
        raise TypeError(f"register_executor: {cls!r} is not a ChunkExecutor subclass")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"register_executor: {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls


def available_executors() -> list[str]:
    return sorted(_REGISTRY)


def _convert(name: str, param: str, raw: str, hint: Any) -> Any:
    """Turn one spec string into the type the executor's ``__init__`` annotates."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return None
    for typ in [o for o in options if o is not type(None)]:
        try:
            if typ is bool:
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(raw)
            if typ is float:
                return float(raw)
            if typ is str or typ is Any:
                return raw
        except ValueError:
            continue
    want = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"executor {name!r}: {param} must be {want}, got {raw!r}")


def check_executor(spec: str | ChunkExecutor, caps: Any, head_name: str = "this") -> ChunkExecutor:
    """The executor for ``spec`` if a head with capabilities ``caps`` (a
    :class:`~chunkpolicy.models.heads.base.HeadCapabilities`) can drive it; else one ``ValueError`` naming what is
    missing. Call it at start-up, before any simulator or robot runs."""
    ex = make_executor(spec)
    missing = [n for n in ex.needs if not getattr(caps, n)]
    if missing:
        raise ValueError(f"executor {ex.spec()!r} needs a head with {', '.join(missing)}; the {head_name} head has none "
                         "(real-time chunking needs flow_expert, or dit with objective=flow)")
    return ex


def make_executor(spec: str | ChunkExecutor) -> ChunkExecutor:
    """Build an executor from ``"name"``, ``"name:v1,v2"`` or ``"name:key=value,..."``.

    Examples: ``"open_loop:8"`` (run 8 actions per chunk), ``"open_loop"`` (run whole chunks),
    ``"temporal_ensemble:0.01"``, ``"temporal_ensemble:m=0.1"``, ``"rtc:8,2"`` (real-time chunking, s=8, d=2).
    An executor instance is returned as it is.
    """
    if isinstance(spec, ChunkExecutor):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"executor spec must be a non-empty string like 'open_loop:8', got {spec!r}")
    name, _, argstr = spec.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name not in _REGISTRY:
        raise ValueError(f"unknown executor {name!r} in {spec!r}; known: {available_executors()} "
                         "(spec format 'name' or 'name:arg,...', e.g. 'open_loop:8', 'temporal_ensemble:0.01')")
    cls = _REGISTRY[name]
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    hints = typing.get_type_hints(cls.__init__)
    args: dict[str, Any] = {}
    pieces = [a.strip() for a in argstr.split(",")] if argstr.strip() else []
    for pos, piece in enumerate(pieces):
        if "=" in piece:
            key, _, raw = piece.partition("=")
            key = key.strip()
            if key not in {p.name for p in params}:
                raise ValueError(f"executor {name!r}: unknown argument {key!r}; arguments: {[p.name for p in params]}")
        else:
            if pos >= len(params):
                raise ValueError(f"executor {name!r} takes at most {len(params)} arguments "
                                 f"({[p.name for p in params]}), got {len(pieces)} in {spec!r}")
            key, raw = params[pos].name, piece
        if key in args:
            raise ValueError(f"executor {name!r}: argument {key!r} given twice in {spec!r}")
        args[key] = _convert(name, key, raw.strip(), hints.get(key, str))
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in args]
    if missing:
        raise ValueError(f"executor {name!r}: missing arguments {missing} in {spec!r}")
    return cls(**args)


register_executor(OpenLoop.name, OpenLoop)
register_executor(TemporalEnsemble.name, TemporalEnsemble)
register_executor(RealTimeChunking.name, RealTimeChunking)
