"""What the trainer carries from step to step (:class:`TrainState`) and its round trip through a checkpoint.

:func:`save_train_state` writes a checkpoint's ``training_state/`` (counters, data position, scheduler, optimizer,
EMA, the non-finite guard's counters under ``extra["guard"]``, the training time); :func:`load_train_state` puts it
back into a freshly built :class:`TrainState`, after checking that the checkpoint fits this run. The file format is
:mod:`chunkpolicy.training.checkpoint`'s; the model export beside it is the trainer's ``export_fn``.

FSDP runs (``train.distributed=fsdp``) use :func:`save_sharded_train_state` / :func:`load_sharded_train_state`: the
same ``state.json`` (with ``extra["sharded"] = true``), the tensors in ``training_state/sharded/`` as a
``torch.distributed.checkpoint`` directory (:mod:`chunkpolicy.training.fsdp`) instead of the safetensors files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from chunkpolicy.data.mixture import MixtureSampler
from chunkpolicy.training.checkpoint import STATE_DIR, TrainingState, load_rng, read_training_state, write_training_state
from chunkpolicy.training.ema import EMA
from chunkpolicy.training.optim import (
    optimizer_state_from_tensors, optimizer_state_to_tensors, plain_numbers, schedule_of, set_lrs,
)

__all__ = ["TrainState", "load_train_state", "save_train_state", "load_sharded_train_state", "save_sharded_train_state"]


@dataclass
class TrainState:
    """What :meth:`Trainer.build_state` creates before the loop, and the counters the loop advances: with the model's
    weights and the random streams, everything a checkpoint saves and a resumed run restores."""

    device: torch.device
    graphed: bool  # train.cuda_graph: each step replays one CUDA graph
    wrapper: nn.Module  # what an eager step calls: accelerate's (DDP, autocast) wrapper of LossModule(model)
    optimizer: Any
    scheduler: Any
    ema: EMA | None
    sampler: MixtureSampler
    val_loader: Any  # fixed validation batches (None without a validation set)
    graph: Any = None  # the GraphedTrainStep, captured on the first batch (it needs the batch shapes)
    trainable: list[nn.Parameter] = field(default_factory=list)
    n_trainable: int = 0
    n_params: int = 0
    step: int = 0  # optimizer steps done
    epoch: int = 0  # sampler epoch
    position: int = 0  # micro-batches of this process consumed in the epoch
    samples_seen: int = 0
    elapsed_before: float = 0.0  # wall time of the earlier sessions of the run
    train_time_before: float = 0.0  # training time (validation / checkpoints excluded) of the earlier sessions
    resumed_from: Path | None = None
    skip_count: Any = None  # device: steps skipped by the non-finite guard, whole run
    skip_streak: Any = None  # device: consecutive skipped steps up to now
    recent_skips: Any = None  # device [log_every]: skip flag of step n at n % log_every, since the last train record
    rollbacks: int = 0


def load_train_state(st: TrainState, ckpt: Path, trainable: dict[str, nn.Parameter], *, world: int, rank: int,
                     ema_decay: float) -> None:
    """Restore checkpoint ``ckpt`` into ``st`` (in place), the ``trainable`` parameters (by name) and this process's
    random generators; the learning rates are set from the restored schedule."""
    state, saved, opt_t, opt_meta, ema = read_training_state(ckpt)
    _check_layout(ckpt, state, world, sharded=False)
    missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
    if missing or extra:
        raise ValueError(f"{ckpt}: trainable parameters differ from this run's model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (was posttrain.mode changed?)")
    with torch.no_grad():
        for n, p in trainable.items():
            if p.shape != saved[n].shape:
                raise ValueError(f"{ckpt}: {n} has shape {tuple(saved[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(saved[n])
    st.optimizer.load_state_dict(optimizer_state_from_tensors(opt_t, opt_meta))
    st.scheduler.load_state_dict(state.scheduler)
    if st.ema is not None:
        if ema is None:
            raise ValueError(f"{ckpt}: has no EMA state but train.ema_decay={ema_decay}")
        st.ema.load_state_dict(ema, state.ema_updates)
    _restore_counters(st, state, ckpt, rank)


def _check_layout(ckpt: Path, state: TrainingState, world: int, *, sharded: bool) -> None:
    if state.world_size != world:
        raise ValueError(f"{ckpt}: saved with {state.world_size} processes, resuming with {world}; "
                         "exact data-order resume needs the same number")
    if bool(state.extra.get("sharded", False)) != sharded:
        raise ValueError(f"{ckpt}: its training state is {'sharded (FSDP)' if not sharded else 'not sharded'}; "
                         f"resume it with train.distributed={'fsdp' if not sharded else 'ddp'}")


def _restore_counters(st: TrainState, state: TrainingState, ckpt: Path, rank: int) -> None:
    """Counters, schedule, guard state, learning rates and this process's RNGs from ``state``."""
    st.step, st.epoch, st.position = state.step, state.epoch, state.position
    st.samples_seen, st.elapsed_before = state.samples_seen, state.elapsed_s
    guard = state.extra.get("guard", {})
    st.train_time_before = float(state.extra.get("train_time_s", state.elapsed_s))
    st.rollbacks = int(guard.get("rollbacks", 0))
    st.skip_count.fill_(float(guard.get("skipped_steps", 0)))
    st.skip_streak.fill_(float(guard.get("skip_streak", 0)))
    schedule_of(st.scheduler).scale = float(guard.get("lr_scale", 1.0))
    set_lrs(st.optimizer, st.scheduler)
    load_rng(ckpt / STATE_DIR, rank)


def save_train_state(state_dir: Path, st: TrainState, trainable: dict[str, nn.Parameter], *, world: int,
                     micro_batch: int, session_start: float, train_time: Callable[[], float]) -> None:
    """Write ``st`` into ``state_dir`` (main process only; the random generators are saved per process by
    :func:`~chunkpolicy.training.checkpoint.save_rng`). ``micro_batch``: samples per micro-batch over all processes
    (the sampler's position is in samples); ``session_start``: ``perf_counter`` time this session began;
    ``train_time()``: training seconds of the run so far."""
    opt_t, opt_meta = optimizer_state_to_tensors(st.optimizer.state_dict())
    state = _training_state(st, world=world, micro_batch=micro_batch, session_start=session_start,
                            train_time=train_time)
    write_training_state(state_dir, state, trainable, opt_t, opt_meta,
                         st.ema.state_dict() if st.ema is not None else None)


def _training_state(st: TrainState, *, world: int, micro_batch: int, session_start: float,
                    train_time: Callable[[], float]) -> TrainingState:
    return TrainingState(
        step=st.step, epoch=st.epoch, position=st.position, samples_seen=st.samples_seen,
        world_size=world, scheduler=plain_numbers(st.scheduler.state_dict()),
        ema_updates=st.ema.num_updates if st.ema is not None else 0,
        elapsed_s=st.elapsed_before + (time.perf_counter() - session_start),
        extra={"sampler": st.sampler.state_dict(st.epoch, st.position * micro_batch),
               "train_time_s": train_time(),
               "guard": {"lr_scale": schedule_of(st.scheduler).scale, "rollbacks": st.rollbacks,
                         "skipped_steps": int(st.skip_count.item()), "skip_streak": int(st.skip_streak.item())}},
    )


def save_sharded_train_state(state_dir: Path, st: TrainState, model: nn.Module, trainable: list[str], *, world: int,
                             micro_batch: int, session_start: float, train_time: Callable[[], float],
                             is_main: bool) -> None:
    """FSDP: every process writes its shards of the trainable parameters (``trainable``: their names in ``model``),
    the optimizer state and the EMA shadow into ``state_dir/sharded`` (collective); then process 0 writes
    ``state.json``, last, so its presence still marks a complete state (the other arguments as in
    :func:`save_train_state`)."""
    from chunkpolicy.training.fsdp import SHARDED_DIR, save_sharded

    save_sharded(state_dir / SHARDED_DIR, model, getattr(st.optimizer, "optimizer", st.optimizer), trainable,
                 st.ema.shadow if st.ema is not None else None)
    if is_main:
        state = _training_state(st, world=world, micro_batch=micro_batch, session_start=session_start,
                                train_time=train_time)
        state.extra["sharded"] = True
        write_training_state(state_dir, state, None, None, None, None)


def load_sharded_train_state(st: TrainState, ckpt: Path, model: nn.Module, trainable: list[str], *, world: int,
                             rank: int, ema_decay: float) -> None:
    """FSDP: restore checkpoint ``ckpt`` (written by :func:`save_sharded_train_state`) into ``st`` and the sharded
    ``model`` (in place; collective)."""
    from chunkpolicy.training.checkpoint import read_state_json
    from chunkpolicy.training.fsdp import SHARDED_DIR, load_sharded

    state = read_state_json(ckpt)
    _check_layout(ckpt, state, world, sharded=True)
    load_sharded(ckpt / STATE_DIR / SHARDED_DIR, model, getattr(st.optimizer, "optimizer", st.optimizer), trainable,
                 st.ema.shadow if st.ema is not None else None, what=f"{ckpt} (train.ema_decay={ema_decay})")
    st.scheduler.load_state_dict(state.scheduler)
    if st.ema is not None:
        st.ema.num_updates = int(state.ema_updates)
    _restore_counters(st, state, ckpt, rank)
