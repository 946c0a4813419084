"""Action tokenizers for the discrete autoregressive baseline: normalized chunks ``[H, d]`` ↔ token ids.

Inputs are normalized actions (q01/q99 → [-1, 1]) of one sample's *valid* dims; values outside [-1, 1] are clipped.

* :class:`BinTokenizer` — RT-2 / OpenVLA: 256 uniform bins over [-1, 1], one token per (step, dim), time-major.
  Round-trip error ≤ 1/256 (half a bin) for inputs in [-1, 1].
* :class:`MuLawTokenizer` — Gato-style μ-law companding ``y = sign(x)·log(1 + μ|x|)/log(1 + μ)`` (μ = 100), which maps
  [-1, 1] onto all of [-1, 1], then 1024 uniform bins over [-1, 1]: finer near 0, every bin reachable.
  Round-trip error ≤ (1/1024)·max|dx/dy| = ln(1 + μ)·(1 + μ)/(μ·1024) = 0.00455 for inputs in [-1, 1] (the slope is
  largest at |x| = 1; ≤ 0.0005 for |x| < 0.1, mean 0.00115 over uniform x vs 0.00195 for 256 plain bins).
  Gato's own denominator ``log(1 + Mμ)`` (M = 256) is meant for unnormalized inputs: on normalized ones it reaches only
  |y| ≤ 0.455, i.e. 466 of the 1024 bins, with a 2.5× larger error bound (0.0100). A saved tokenizer dict that has
  ``m`` (written before this fix) loads with that old meaning, so old checkpoints decode exactly as they were trained.
* :class:`FASTTokenizer` — FAST: per-dim orthonormal DCT over time, scale by γ (10) and round, flatten low
  frequencies first across dims, then BPE (``tokenizers``) trained on a dataset's chunks. Rounding error is ≤ 0.5/γ per
  coefficient, so each dim's L2 error over the chunk is ≤ 0.5·sqrt(H)/γ (and so is every element's error).

``decode`` never turns a bad sequence into silent zeros: it returns ``(actions, valid)`` and ``valid`` is False for a
sequence of the wrong length or with ids outside the tokenizer.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import scipy.fft


class ActionTokenizer:
    name = "base"
    vocab_size: int

    def encode(self, chunk: np.ndarray) -> list[int]:
        raise NotImplementedError

    def decode(self, tokens: Sequence[int], horizon: int, dim: int) -> tuple[np.ndarray, bool]:
        raise NotImplementedError

    def max_tokens(self, horizon: int, dim: int) -> int:
        return horizon * dim

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


def _check_chunk(chunk: np.ndarray) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2:
        raise ValueError(f"actions: expected one chunk [H, d], got shape {chunk.shape}")
    if not np.isfinite(chunk).all():
        raise ValueError("actions: contains NaN or inf")
    return np.clip(chunk, -1.0, 1.0)


class BinTokenizer(ActionTokenizer):
    name = "bins"

    def __init__(self, n_bins: int = 256) -> None:
        self.n_bins = self.vocab_size = int(n_bins)

    def _to_bins(self, y: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((y + 1.0) / 2.0 * self.n_bins), 0, self.n_bins - 1).astype(np.int64)

    def _from_bins(self, idx: np.ndarray) -> np.ndarray:
        return -1.0 + (idx + 0.5) * (2.0 / self.n_bins)

    def encode(self, chunk: np.ndarray) -> list[int]:
        return self._to_bins(_check_chunk(chunk)).reshape(-1).tolist()

    def decode(self, tokens: Sequence[int], horizon: int, dim: int) -> tuple[np.ndarray, bool]:
        t = np.asarray(list(tokens), dtype=np.int64)
        if t.size != horizon * dim or (t.size and (t.min() < 0 or t.max() >= self.n_bins)):
            return np.zeros((horizon, dim)), False
        return self._from_bins(t).reshape(horizon, dim), True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_bins": self.n_bins}


class MuLawTokenizer(BinTokenizer):
    """μ-law companding over [-1, 1] then uniform bins. ``m`` (legacy, only from old saved dicts) restores Gato's
    ``log(1 + mμ)`` denominator, under which normalized inputs reach only the central bins (see the module docstring)."""

    name = "mulaw"

    def __init__(self, mu: float = 100.0, n_bins: int = 1024, m: float | None = None) -> None:
        super().__init__(n_bins)
        if not mu > 0:
            raise ValueError(f"mulaw mu must be > 0, got {mu}")
        self.mu, self.m = float(mu), (None if m is None else float(m))
        self._log = math.log((self.m if self.m is not None else 1.0) * self.mu + 1.0)

    def encode(self, chunk: np.ndarray) -> list[int]:
        x = _check_chunk(chunk)
        y = np.sign(x) * np.log(np.abs(x) * self.mu + 1.0) / self._log
        return self._to_bins(y).reshape(-1).tolist()

    def decode(self, tokens: Sequence[int], horizon: int, dim: int) -> tuple[np.ndarray, bool]:
        y, ok = super().decode(tokens, horizon, dim)
        if not ok:
            return y, False
        return np.sign(y) * (np.exp(np.abs(y) * self._log) - 1.0) / self.mu, True

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "mu": self.mu, "n_bins": self.n_bins}
        return d if self.m is None else {**d, "m": self.m}


class FASTTokenizer(ActionTokenizer):
    """Fit with :meth:`fit` on normalized training chunks before use; its BPE model travels in :meth:`to_dict`."""

    name = "fast"
    MAX_COEFF = 255  # |round(γ·coefficient)| is clipped here; inputs in [-1, 1] stay far below for H ≤ 650

    def __init__(self, scale: float = 10.0, vocab_size: int = 1024, bpe_json: str | None = None) -> None:
        self.scale, self.vocab_size = float(scale), int(vocab_size)
        if self.vocab_size <= 2 * self.MAX_COEFF + 1:
            raise ValueError(f"FAST vocab_size must exceed the {2 * self.MAX_COEFF + 1} base symbols, got {vocab_size}")
        self._bpe = None
        if bpe_json is not None:
            from tokenizers import Tokenizer

            self._bpe = Tokenizer.from_str(bpe_json)

    @staticmethod
    def _char(v: int) -> str:
        return chr(0x4E00 + v + FASTTokenizer.MAX_COEFF)  # one printable code point per integer

    def _coeff_string(self, chunk: np.ndarray) -> str:
        x = _check_chunk(chunk)
        c = scipy.fft.dct(x, type=2, norm="ortho", axis=0)  # [H, d], row k = frequency k
        q = np.clip(np.rint(c * self.scale), -self.MAX_COEFF, self.MAX_COEFF).astype(np.int64)
        return "".join(self._char(int(v)) for v in q.reshape(-1))  # low frequencies first, across dims

    def fit(self, chunks: Sequence[np.ndarray]) -> "FASTTokenizer":
        from tokenizers import Tokenizer, models, trainers

        alphabet = [self._char(v) for v in range(-self.MAX_COEFF, self.MAX_COEFF + 1)]
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, initial_alphabet=alphabet, show_progress=False, special_tokens=[])
        tok.train_from_iterator((self._coeff_string(c) for c in chunks), trainer=trainer)
        self._bpe = tok
        return self

    @property
    def fitted(self) -> bool:
        return self._bpe is not None

    def _need_fit(self) -> Any:
        if self._bpe is None:
            raise RuntimeError("FAST tokenizer is not fitted: call fit(normalized training chunks) first")
        return self._bpe

    def encode(self, chunk: np.ndarray) -> list[int]:
        return list(self._need_fit().encode(self._coeff_string(chunk)).ids)

    def decode(self, tokens: Sequence[int], horizon: int, dim: int) -> tuple[np.ndarray, bool]:
        bpe = self._need_fit()
        pieces = [bpe.id_to_token(int(t)) for t in tokens]
        if any(p is None for p in pieces):
            return np.zeros((horizon, dim)), False
        s = "".join(pieces)
        if len(s) != horizon * dim:
            return np.zeros((horizon, dim)), False
        q = np.array([ord(ch) - 0x4E00 - self.MAX_COEFF for ch in s], dtype=np.float64)
        if np.any(np.abs(q) > self.MAX_COEFF):
            return np.zeros((horizon, dim)), False
        x = scipy.fft.idct(q.reshape(horizon, dim) / self.scale, type=2, norm="ortho", axis=0)
        return x, True

    def max_tokens(self, horizon: int, dim: int) -> int:
        return horizon * dim  # BPE never makes a sequence longer than its characters

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "vocab_size": self.vocab_size,
                "bpe_json": self._bpe.to_str() if self._bpe is not None else None}


TOKENIZERS = {"bins": BinTokenizer, "mulaw": MuLawTokenizer, "fast": FASTTokenizer}


def make_action_tokenizer(name: str, **kw: Any) -> ActionTokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown action tokenizer {name!r}; tokenizers: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kw)


def tokenizer_from_dict(d: dict[str, Any]) -> ActionTokenizer:
    d = dict(d)
    return make_action_tokenizer(d.pop("name"), **d)


def tokenizer_to_json(tok: ActionTokenizer) -> str:
    return json.dumps(tok.to_dict())
