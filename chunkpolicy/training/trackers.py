"""Experiment trackers for training runs: TensorBoard and Weights & Biases through ``accelerate``'s tracker classes.

    python train.py --config configs/tiny_flow.yaml 'train.log_with=[tensorboard, wandb]'

``train.log_with`` lists the trackers (empty: none, the default; ``metrics.jsonl`` and ``loss.png`` are always
written). Each is an ``accelerate.tracking`` tracker started on the main process only:

* ``tensorboard``: event files under ``<run dir>/tensorboard/<run name>/`` (``tensorboard --logdir <run dir>/tensorboard``).
* ``wandb``: **offline unless the user says otherwise**: ``WANDB_MODE`` defaults to ``offline`` here, so a run never
  talks to the network unless ``WANDB_MODE=online`` is set; files go to ``<run dir>/wandb/`` (``wandb sync`` uploads
  them later). The wandb run id is derived from the run dir, so a resumed run appends to the same wandb run.

What is logged: every numeric field of each ``train`` record of ``metrics.jsonl`` as ``train/<field>``
(``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/samples_per_s``, the guard's counters, nested numeric
fields such as health statistics as ``train/<field>/<key>``), each ``val`` record as ``val/loss``, at its optimizer
step; the experiment config once at the start (flattened, as hyperparameters).
A tracker whose package is missing is an error at start-up naming ``train.log_with`` and the package to install
(extra ``trackers``), never a silent no-op.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from chunkpolicy.config import TRACKERS, check_trackers

__all__ = ["TRACKERS", "Trackers", "check_trackers"]


_KINDS = ("train", "val")  # metrics.jsonl record kinds that are scalars of a step
_RENAME = {"val/val_loss": "val/loss"}


def _numbers(rec: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Numeric leaves of a record (bools and the bookkeeping keys ``kind`` / ``step`` left out) as ``prefix/key``."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k in ("kind", "step") or isinstance(v, bool) or v is None:
            continue
        key = f"{prefix}/{k}"
        if isinstance(v, (int, float)):
            out[_RENAME.get(key, key)] = float(v)
        elif isinstance(v, Mapping):
            out.update(_numbers(v, key))
    return out


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config → ``{"train.lr": 1e-3, ...}`` with TensorBoard-hparam types (lists and None become strings)."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flat(v, key))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The started trackers of one run (none on non-main processes, or when ``log_with`` is empty).

    Args:
        log_with: tracker names (``train.log_with``).
        run_dir: the training run directory (tracker files go below it).
        config: the experiment config, logged once as hyperparameters.
        is_main: only the main process logs.
    """

    def __init__(self, log_with: Sequence[str] | None, run_dir: str | os.PathLike,
                 config: Mapping[str, Any] | None = None, *, is_main: bool = True) -> None:
        self.names = check_trackers(log_with)
        self.run_dir = Path(run_dir)
        self.trackers: list[Any] = []
        if not is_main or not self.names:
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        run_name = self.run_dir.resolve().name or "run"
        for name in self.names:
            if name == "tensorboard":
                t = TensorBoardTracker(run_name, self.run_dir / "tensorboard")
            else:
                os.environ.setdefault("WANDB_MODE", "offline")  # never online unless the user asked for it
                os.environ.setdefault("WANDB_SILENT", "true")
                wdir = self.run_dir / "wandb"
                wdir.mkdir(parents=True, exist_ok=True)
                run_id = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
                t = WandBTracker("chunkpolicy", name=run_name, id=run_id, resume="allow", dir=str(self.run_dir))
            t.start()
            self.trackers.append(t)
        if config is not None:
            flat = _flat(config)
            for t in self.trackers:
                t.store_init_configuration(flat if t.name == "tensorboard" else dict(config))

    def log_record(self, rec: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record (``train`` / ``val``; other kinds are not scalars of a step)."""
        if not self.trackers:
            return
        kind = str(rec.get("kind"))
        if kind not in _KINDS or "step" not in rec:
            return
        values = _numbers(rec, kind)
        if values:
            for t in self.trackers:
                t.log(values, step=int(rec["step"]))

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []
