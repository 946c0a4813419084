"""The training loop, on ``accelerate``: the same code on CPU, one GPU, or DDP over several (``accelerate launch``).

It trains any module with ``compute_loss(batch) -> {"loss": scalar, ...}`` (a :class:`ChunkPolicy`, or a stand-in in
tests). Per optimizer step: ``grad_accum`` micro-batches (bf16 autocast when ``mixed_precision="bf16"``), gradient
clipping, AdamW, warmup + cosine schedule, EMA update. ``train.compile`` compiles the model's layers;
``train.cuda_graph`` (one GPU, ``grad_accum=1``, fixed batch shapes) replays forward, backward, clipping and a
capturable fused AdamW as one CUDA graph (:class:`~chunkpolicy.training.graphed_step.GraphedTrainStep`; measured in
BENCHMARKS.md: 1.8x the eager samples/s for the pi0-size preset at batch 8, 7.6x for the small preset through this
trainer). Validation loss uses the EMA weights, a fixed set of held-out batches and a fixed noise seed (so successive
evaluations are comparable, and the training RNG is not touched).

Data order: a :class:`~chunkpolicy.data.mixture.MixtureSampler` draws a global index stream per epoch; every process
takes its slice of each global batch. The trainer counts the micro-batches it consumed, so a checkpoint records the
exact position (whatever the DataLoader prefetched) and a resumed run continues with the same batches, the same RNG
states, optimizer, scheduler and EMA: its losses equal the uninterrupted run's bit for bit (same machine and settings).

Structure: :meth:`Trainer.fit` = :meth:`~Trainer.build_state` (a :class:`TrainState`: model placement, optimizer,
schedule, EMA, sampler, counters, the resumed checkpoint) → :meth:`~Trainer.train_step` per optimizer step (eager and
CUDA-graph steps differ only in :meth:`~Trainer._micro_step`) → logging / validation / checkpoint cadence → summary.

Precision (``train.precision``): ``fp32`` (default) keeps fp32 weights (master weights) and fp32 AdamW moments, the
forward/backward computed in bf16 under ``mixed_precision=bf16``; a model handed over in another dtype is cast to fp32.
``bf16`` (opt-in fast path) casts the parameters to bf16, so AdamW keeps bf16 moments too (PyTorch's AdamW keeps its
state in the parameters' dtype) and there is no fp32 copy: faster and smaller, but updates below bf16's resolution are
lost, which drifts over long runs.

Non-finite guard: a step whose loss (any micro-batch) or gradient norm is not finite is skipped: the fused AdamW gets
a device-side ``found_inf`` flag (eager and CUDA-graph steps alike; the kernel then leaves weights, moments and step
counts untouched) and the EMA update is multiplied by the same flag, so no host sync is added per step. The skipped
steps still consume their batches and advance the schedule. A device-side counter of skipped steps and of the current
streak is read with the loss at each ``train`` record (``skipped``, ``skipped_total``): that read is the only sync,
so a streak is noticed up to ``log_every`` steps late (harmless: skipped steps change nothing). When the streak has
reached ``train.max_bad_steps`` at a record (or a checkpoint finds non-finite weights), the run rolls back to its latest
checkpoint (weights, optimizer, EMA, data position, RNG) with the learning rate × ``train.rollback_lr_factor``
(a ``rollback`` record; the factor is kept in later checkpoints, so a resumed run continues exactly); without a
checkpoint it continues from the current weights (the last good step's) with the lower rate. After
``train.max_rollbacks`` rollbacks it stops (:class:`TrainingDiverged`, after ``summary.json``), leaving the last good
weights on disk: checkpoints are only written from finite weights. An optimizer that is not fused (non-float
parameters) falls back to reading the flag on the host each step.

Time budget: ``train.max_minutes`` ends the run once its training time (all sessions; validation, checkpoint and
rollback time not counted, start-up not counted) reaches the budget, with a final train record, validation and
checkpoint; ``summary.json`` says why the run stopped (``stopped``: steps | max_minutes | stop_after | non_finite).
``train.schedule_over=time`` runs the cosine decay over that budget instead of ``train.steps``.

Outputs in the run dir: ``config.yaml``, ``metrics.jsonl`` (one JSON record per log/validation event),
``checkpoints/step_XXXXXX/`` (see :mod:`chunkpolicy.training.checkpoint`), ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from chunkpolicy.atomic import atomic_file
from chunkpolicy.data.mixture import MixtureSampler
from chunkpolicy.models.attention import training_attention_backends
from chunkpolicy.training.checkpoint import (
    STATE_DIR, CheckpointManager, TrainingState, load_rng, read_training_state, save_rng, write_training_state,
)
from chunkpolicy.training.diagnostics import HEALTH_KEYS, optimizer_health, probe_step
from chunkpolicy.training.ema import EMA
from chunkpolicy.training.distributed import LossModule, ShardedBatchSampler, make_accelerator, to_device, unused_parameters
from chunkpolicy.training.optim import (
    LRSchedule, build_optimizer, build_scheduler, optimizer_state_from_tensors, optimizer_state_to_tensors, plain_numbers,
    schedule_of, set_lr,
    tensor_lrs,
)

__all__ = ["Trainer", "TrainState", "StepOutput", "TrainingDiverged", "LossModule", "ShardedBatchSampler", "make_accelerator", "to_device",
           "unused_parameters", "default_export", "print_summary", "KILL_ENV", "POISON_ENV"]

KILL_ENV = "CHUNKPOLICY_TEST_KILL_AFTER_CKPT"  # test hook: SIGKILL this process right after checkpoint <step>
# test hook: before step <step>, one weight of the first trainable parameter becomes inf (a runaway weight, the same in
# eager and CUDA-graph steps: the graph reads the parameter in place); the guard must skip, roll back and recover
POISON_ENV = "CHUNKPOLICY_TEST_POISON_WEIGHT_AT_STEP"


def default_export(model: nn.Module, path: Path) -> None:
    """``model.save_pretrained(path)`` if it has one, else its state dict as ``path/model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


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


@dataclass
class StepOutput:
    """What :meth:`Trainer.train_step` returns; tensors stay on the device (reading them is a host sync)."""

    losses: list[torch.Tensor]  # the detached loss of each micro-batch
    grad_norm: torch.Tensor | None  # pre-clipping gradient norm
    lr: float  # the learning rate the step used (from the schedule, not read from the device)
    skipped: torch.Tensor | None = None  # 0-d float on the device: 1.0 if the non-finite guard skipped the update


@dataclass
class _Session:
    """Bookkeeping of one :meth:`Trainer.fit` call: timing, the loss summed on the device since the last ``train``
    record, the latest results."""

    start_step: int
    t_start: float
    t_log: float  # start of the current logging interval (moved forward by validation and checkpoint time)
    step_log: int
    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    pbar: Any
    n_good: torch.Tensor | None = None  # device: micro-batch losses summed into loss_sum (those of skipped steps are not)
    skips_at_log: float = 0.0  # skip_count at the last train record
    n_loss: int = 0
    lr: float = float("nan")
    last_train: float = float("nan")
    last_val: float | None = None
    last_ckpt: Path | None = None
    overhead: float = 0.0  # seconds in validation, checkpoints and rollbacks
    t_first_step: float | None = None  # when the first step of the session returned (host time)
    t_last_step: float | None = None
    stopped: str = "steps"  # why the loop ended: steps | max_minutes | stop_after | non_finite
    message: str = ""


class TrainingDiverged(FloatingPointError):
    """The non-finite guard gave up (``train.max_rollbacks`` rollbacks used); raised after ``summary.json``."""


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Trainer:
    """Args:
        model: module with ``compute_loss(batch)``; parameters with ``requires_grad=False`` stay frozen.
        train_set / val_set: map-style datasets yielding batch-schema dicts (val may be None).
        cfg: a :class:`~chunkpolicy.config.TrainConfig` (steps, batch size, lr, ..., output_dir).
        run_dir: defaults to ``cfg.output_dir``.
        resume: continue from the latest checkpoint of the run dir (a fresh start if there is none); without it, a
            run dir that already has checkpoints is an error.
        export_fn: ``(model, path)`` writes the deployable model into ``path`` (default :func:`default_export`); called
            with the EMA weights swapped in.
        config_dict: the full experiment config, saved as ``config.yaml``.
        data_num_workers: DataLoader workers.
        stop_after: end this session after that step (with a checkpoint there), e.g. for time-sliced jobs; the
            schedule still runs to ``cfg.steps`` when resumed.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: torch.utils.data.Dataset,
        val_set: torch.utils.data.Dataset | None,
        cfg: Any,
        *,
        run_dir: str | os.PathLike | None = None,
        resume: bool = False,
        accelerator: Any = None,
        export_fn: Callable[[nn.Module, Path], None] | None = None,
        config_dict: Mapping[str, Any] | None = None,
        data_num_workers: int = 0,
        collate_fn: Callable | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.cfg, self.model, self.train_set, self.val_set = cfg, model, train_set, val_set
        self.acc = accelerator or make_accelerator(cfg)
        from accelerate.utils import DistributedType

        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(f"{self.acc.distributed_type}: only single-process and DDP runs are supported")
        self.run_dir = Path(run_dir or cfg.output_dir)
        self.resume = resume
        self.export_fn = export_fn or default_export
        self.config_dict = dict(config_dict) if config_dict is not None else None
        self.num_workers, self.collate_fn = int(data_num_workers), collate_fn
        self.stop_after = stop_after
        self.manager = CheckpointManager(self.run_dir, cfg.keep_last)
        self.is_main = self.acc.is_main_process
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.global_batch = cfg.batch_size * self.world * cfg.grad_accum
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.t_created = time.perf_counter()
        # host batches of the current logging interval (step, [micro-batches]): a step the guard skipped is replayed
        # from them by the non-finite probe; the latest step's batch for the periodic probe
        self._recent_batches: deque[tuple[int, list]] = deque(maxlen=cfg.log_every)
        self._probes_done = 0
        latest = self.manager.latest()
        if latest is not None and not resume:
            raise FileExistsError(f"{self.run_dir} already has checkpoints (latest {latest.name}); pass --resume to "
                                  "continue that run, or set train.output_dir to a new directory")

    # -- data -----------------------------------------------------------------------------------------------------
    def _loader(self, dataset, batch_sampler, persistent: bool = False) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=self.num_workers, collate_fn=self.collate_fn,
            pin_memory=self.acc.device.type == "cuda", persistent_workers=persistent and self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.seed),  # keeps loader seeding off the global RNG
        )

    def _train_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever; each pass over the loader is one sampler epoch, started at the recorded position
        (the batch sampler reads the sampler's epoch/position when the pass begins)."""
        st, micro = self.state, self.cfg.batch_size * self.world
        loader = self._loader(self.train_set, ShardedBatchSampler(st.sampler, self.cfg.batch_size, self.world, self.rank),
                              persistent=True)
        while True:
            st.sampler.set_epoch(st.epoch, st.position * micro)
            for batch in loader:
                st.position += 1
                yield batch
            st.epoch, st.position = st.epoch + 1, 0

    def _val_loader(self):
        if self.val_set is None or len(self.val_set) == 0:  # type: ignore[arg-type]
            return None
        bs, n = self.cfg.batch_size, self.cfg.val_batches
        idx = list(MixtureSampler(self.val_set, num_samples=n * bs * self.world, seed=self.cfg.seed + 1))
        batches = [idx[(b * self.world + self.rank) * bs : (b * self.world + self.rank + 1) * bs] for b in range(n)]
        return self._loader(self.val_set, batches)

    # -- state ----------------------------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def build_state(self) -> TrainState:
        """Everything the loop needs, built in a fixed order (the order is part of exact resume: the seeds are set
        after everything that draws from the RNGs at build time, the checkpoint is loaded last): the model on the
        device (DDP's unused-parameter probe, ``train.compile``), optimizer, schedule, accelerate's wrapping, EMA, the
        data sampler, validation batches, seeds, then on ``--resume`` the latest checkpoint's state."""
        if self.acc.device.type == "cuda":
            training_attention_backends()  # no cuDNN attention in training: its backward made NaNs (issue 15)
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.acc
        dev = acc.device
        self.model.to(dev)
        self._apply_precision()
        self.model.train()
        if self.world > 1 and getattr(cfg, "find_unused_parameters", None) is None and acc.ddp_handler is not None:
            unused = self.unused_parameters()
            acc.ddp_handler.find_unused_parameters = bool(unused)
            if unused and self.is_main:
                print(f"DDP: {len(unused)} trainable parameters get no gradient from this loss (e.g. {unused[:3]}); "
                      "find_unused_parameters=True")
        graphed = bool(getattr(cfg, "cuda_graph", False))
        if graphed:
            self._check_cuda_graph(dev)
        if getattr(cfg, "compile", False):
            if not hasattr(self.model, "compile_layers"):
                raise ValueError(f"train.compile: {type(self.model).__name__} has no compile_layers()")
            self.model.compile_layers()
        optimizer = build_optimizer(self.model, cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay, capturable=graphed)
        over = getattr(cfg, "schedule_over", "steps")
        budget = self._budget_s()
        schedule = LRSchedule(cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr, over=over, budget_s=budget,
                              clock=self._train_time if over == "time" else None)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr, schedule=schedule)
        if graphed:  # the graph replaces accelerate's backward/step; one process, so there is nothing to wrap
            wrapper: nn.Module = self.model
        else:
            wrapper, optimizer = acc.prepare(LossModule(self.model), optimizer)
        ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        micro = cfg.batch_size * self.world
        n_samples = max(1, len(self.train_set) // micro) * micro  # type: ignore[arg-type]
        sampler = MixtureSampler(self.train_set, num_samples=n_samples, seed=cfg.seed)
        st = TrainState(device=dev, graphed=graphed, wrapper=wrapper, optimizer=optimizer, scheduler=scheduler, ema=ema,
                        sampler=sampler, val_loader=self._val_loader(), skip_count=torch.zeros((), device=dev),
                        skip_streak=torch.zeros((), device=dev), recent_skips=torch.zeros(cfg.log_every, device=dev))
        self.state = st
        set_seed(cfg.seed, device_specific=True)  # training noise differs per process, data order does not
        ckpt = self.manager.latest() if self.resume else None
        if ckpt is not None:
            self._load(st, ckpt)
            st.resumed_from = ckpt
        if graphed:  # after loading: a checkpoint's learning rates come back as numbers
            tensor_lrs(st.optimizer, dev)
        self._truncate_metrics(st.step)  # drop records past the checkpoint (or of a run that never saved one)
        if ckpt is not None and self.is_main:
            print(f"resumed from {ckpt} (step {st.step}, epoch {st.epoch}, batch {st.position} of the epoch)")
        elif ckpt is None and self.resume and self.is_main:
            print(f"--resume: no checkpoint in {self.manager.dir}; starting from step 0")
        st.trainable = list(self._trainable().values())
        st.n_trainable = sum(p.numel() for p in st.trainable)
        st.n_params = sum(p.numel() for p in self.model.parameters())
        if self.is_main:
            print(f"training {st.n_trainable:,} of {st.n_params:,} parameters on {self.world} × {dev.type} "
                  f"(weights and AdamW moments: {self._precision()}, mixed precision: {cfg.mixed_precision}); global batch {self.global_batch} "
                  f"= {cfg.batch_size} × {self.world} processes × {cfg.grad_accum} accumulation")
        return st

    def _load(self, st: TrainState, ckpt: Path) -> None:
        state, trainable, opt_t, opt_meta, ema = read_training_state(ckpt)
        if state.world_size != self.world:
            raise ValueError(f"{ckpt}: saved with {state.world_size} processes, resuming with {self.world}; "
                             "exact data-order resume needs the same number")
        own = self._trainable()
        missing, extra = sorted(set(own) - set(trainable)), sorted(set(trainable) - set(own))
        if missing or extra:
            raise ValueError(f"{ckpt}: trainable parameters differ from this run's model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]} (was posttrain.mode changed?)")
        with torch.no_grad():
            for n, p in own.items():
                if p.shape != trainable[n].shape:
                    raise ValueError(f"{ckpt}: {n} has shape {tuple(trainable[n].shape)}, model has {tuple(p.shape)}")
                p.copy_(trainable[n])
        st.optimizer.load_state_dict(optimizer_state_from_tensors(opt_t, opt_meta))
        st.scheduler.load_state_dict(state.scheduler)
        if st.ema is not None:
            if ema is None:
                raise ValueError(f"{ckpt}: has no EMA state but train.ema_decay={self.cfg.ema_decay}")
            st.ema.load_state_dict(ema, state.ema_updates)
        st.step, st.epoch, st.position = state.step, state.epoch, state.position
        st.samples_seen, st.elapsed_before = state.samples_seen, state.elapsed_s
        guard = state.extra.get("guard", {})
        st.train_time_before = float(state.extra.get("train_time_s", state.elapsed_s))
        st.rollbacks = int(guard.get("rollbacks", 0))
        st.skip_count.fill_(float(guard.get("skipped_steps", 0)))
        st.skip_streak.fill_(float(guard.get("skip_streak", 0)))
        schedule_of(st.scheduler).scale = float(guard.get("lr_scale", 1.0))
        self._set_lrs()
        load_rng(ckpt / STATE_DIR, self.rank)

    def save_checkpoint(self) -> Path:
        acc, st = self.acc, self.state
        acc.wait_for_everyone()
        tmp = self.manager.dir / f".step_{st.step:06d}.tmp"
        if self.is_main:
            tmp = self.manager.temp_dir(st.step)
            with st.ema.apply_to(self.model) if st.ema is not None else nullcontext():
                self.export_fn(self.model, tmp)
            opt_t, opt_meta = optimizer_state_to_tensors(st.optimizer.state_dict())
            state = TrainingState(
                step=st.step, epoch=st.epoch, position=st.position, samples_seen=st.samples_seen,
                world_size=self.world, scheduler=plain_numbers(st.scheduler.state_dict()),
                ema_updates=st.ema.num_updates if st.ema is not None else 0,
                elapsed_s=st.elapsed_before + (time.perf_counter() - self.session.t_start),
                extra={"sampler": st.sampler.state_dict(st.epoch, st.position * self.cfg.batch_size * self.world),
                       "train_time_s": self._train_time(),
                       "guard": {"lr_scale": schedule_of(st.scheduler).scale, "rollbacks": st.rollbacks,
                                 "skipped_steps": int(st.skip_count.item()), "skip_streak": int(st.skip_streak.item())}},
            )
            write_training_state(tmp / STATE_DIR, state, {n: p for n, p in self._trainable().items()}, opt_t, opt_meta,
                                 st.ema.state_dict() if st.ema is not None else None)
        acc.wait_for_everyone()
        save_rng(tmp / STATE_DIR, self.rank)
        acc.wait_for_everyone()
        final = self.manager.dir / f"step_{st.step:06d}"
        if self.is_main:
            self.manager.commit(st.step, tmp)
            self._plot()
            self._plotted_at = st.step
        acc.wait_for_everyone()
        if os.environ.get(KILL_ENV) == str(st.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def _check_cuda_graph(self, dev: torch.device) -> None:
        cfg = self.cfg
        if dev.type != "cuda":
            raise ValueError(f"train.cuda_graph: needs a CUDA device; this run is on {dev.type}")
        if self.world != 1:
            raise ValueError(f"train.cuda_graph: one process only (DDP communicates outside the graph); this run has {self.world}")
        if cfg.grad_accum != 1:
            raise ValueError(f"train.cuda_graph: needs train.grad_accum=1, got {cfg.grad_accum}")
        if not (hasattr(self.model, "prepare_train_inputs") and hasattr(self.model, "loss_from_inputs")):
            raise ValueError(f"train.cuda_graph: {type(self.model).__name__} has no prepare_train_inputs/loss_from_inputs")

    def _micro_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Forward and backward of one micro-batch, and clipping + the optimizer step when the accumulation window
        closes; returns the detached loss, and the gradient norm and skip flag (1.0: a loss of the window or the
        gradient norm was not finite, the update was skipped) when this call closed the window. The one place where
        eager and CUDA-graph steps differ: a graphed step replays forward, backward, clipping, the guard and AdamW
        from a graph captured on the first call (one micro-batch per step, checked)."""
        st, acc, cfg = self.state, self.acc, self.cfg
        if st.graphed:
            if st.graph is None:
                from chunkpolicy.training.graphed_step import GraphedTrainStep

                st.graph = GraphedTrainStep(self.model, st.optimizer, batch, max_grad_norm=cfg.grad_clip or None,
                                            autocast=cfg.mixed_precision == "bf16")
            out = st.graph(batch)
            return out["loss"], out["grad_norm"], out["skipped"]
        gnorm = skipped = None
        host_skip = False
        with acc.accumulate(st.wrapper):
            loss = st.wrapper(batch)["loss"]
            acc.backward(loss)
            self._window_bad = self._window_bad | ~torch.isfinite(loss.detach())
            if acc.sync_gradients:
                if cfg.grad_clip > 0:
                    gnorm = acc.clip_grad_norm_(st.trainable, cfg.grad_clip)
                else:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in st.trainable if p.grad is not None])
                skipped = (self._window_bad | ~torch.isfinite(gnorm)).float()
                if self.world > 1:  # every process must take the same decision (losses differ per process)
                    skipped = acc.reduce(skipped, "sum").clamp_(max=1.0)
                inner = getattr(st.optimizer, "optimizer", st.optimizer)
                if all(g.get("fused") for g in inner.param_groups):
                    inner.found_inf = skipped  # the fused kernel skips the update on the device
                else:
                    host_skip = bool(skipped)  # not fused: one host sync per step
            if not host_skip:
                st.optimizer.step()  # accelerate's wrapper steps only when the accumulation window closes
            st.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), gnorm, skipped

    def train_step(self, batches: Iterator[dict[str, Any]]) -> StepOutput:
        """One optimizer step on the next ``grad_accum`` micro-batches of ``batches`` (eager and graphed alike, see
        :meth:`_micro_step`), then the schedule, EMA and counters. No host syncs: losses and the norm stay on the
        device."""
        st = self.state
        losses, gnorm, skipped, host = [], None, None, []
        if os.environ.get(POISON_ENV) == str(st.step + 1) and not st.rollbacks:
            with torch.no_grad():
                st.trainable[0].view(-1)[0] = float("inf")
        self._window_bad = torch.zeros((), dtype=torch.bool, device=st.device)
        for _ in range(self.cfg.grad_accum):  # 1 in graph mode
            host.append(next(batches))
            loss, g, sk = self._micro_step(to_device(host[-1], st.device))
            losses.append(loss)
            gnorm = gnorm if g is None else g
            skipped = skipped if sk is None else sk
        # the step's lr from the schedule itself: reading a graphed step's lr tensor would sync with the device
        lr = st.scheduler.base_lrs[0] * st.scheduler.lr_lambdas[0](st.scheduler.last_epoch)
        st.scheduler.step()
        if st.ema is not None:
            st.ema.update(self.model, skip=skipped)
        if skipped is not None:  # device-side counters, read at the next train record
            st.skip_count += skipped
            st.skip_streak.add_(1.0).mul_(skipped)
            st.recent_skips[(st.step + 1) % self.cfg.log_every].copy_(skipped)
        st.step += 1
        self._recent_batches.append((st.step, host))  # host batches of the interval: a skipped one gets probed
        self._last_host = (st.step, host)
        st.samples_seen += self.global_batch
        return StepOutput(losses, gnorm, lr, skipped)

    def unused_parameters(self) -> list[str]:
        """See :func:`unused_parameters`; probed on the first two training samples."""
        from torch.utils.data import default_collate

        n = min(2, len(self.train_set))  # type: ignore[arg-type]
        batch = (self.collate_fn or default_collate)([self.train_set[i] for i in range(n)])
        return unused_parameters(self.model, to_device(batch, self.acc.device), self.acc)

    # -- metrics --------------------------------------------------------------------------------------------------
    def _record(self, rec: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if getattr(self, "trackers", None) is not None:
                self.trackers.log_record(rec)

    def _truncate_metrics(self, step: int) -> None:
        from chunkpolicy.training.plots import read_metrics

        if self.is_main and self.metrics_path.exists():
            keep = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step]
            with atomic_file(self.metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def _plot(self) -> Path | None:
        from chunkpolicy.training.plots import plot_losses

        try:
            return plot_losses(self.metrics_path, self.run_dir / "loss.png", title=self.run_dir.name)
        except Exception as e:  # a plot never stops training
            print(f"warning: could not write loss.png: {e}")
            return None

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed held-out batches, EMA weights, fixed noise seed."""
        st = self.state
        if st.val_loader is None:
            return None
        m, dev = self.model, self.acc.device
        was = m.training
        m.eval()
        total = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros((), device=dev, dtype=torch.float64)
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with st.ema.apply_to(m) if st.ema is not None else nullcontext(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.cfg.seed + 7919 + self.rank)
            for batch in st.val_loader:
                with self.acc.autocast():
                    loss = m.compute_loss(to_device(batch, dev))["loss"].double()
                n = len(batch["prompt"]) if "prompt" in batch else next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                total += loss * n
                count += n
        m.train(was)
        total, count = self.acc.reduce(total, "sum"), self.acc.reduce(count, "sum")
        return float(total / count)

    # -- cadence: logging, validation, checkpoints ----------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.cfg.steps

    def _log_train(self) -> bool:
        """A ``train`` record: mean loss since the last record (averaged over processes: the one host sync of the
        interval), lr and gradient norm of the last step, samples/s (validation and checkpoint time excluded), the
        guard's counters; returns True when the guard rolled back (or stopped) the run."""
        st, s = self.state, self.session
        mean = self.acc.reduce(s.loss_sum / s.n_good.clamp(min=1.0), "mean")
        good = self.acc.reduce(s.n_good, "sum")
        # the one host sync of the interval: loss, gradient norm and the guard's counters together
        parts = [mean.float(), good.float(), s.grad_norm.float().reshape(()), st.skip_count, st.skip_streak]
        if self.cfg.log_health:
            parts += list(optimizer_health(st.optimizer, st.device))
        values = torch.cat([torch.stack(parts), st.recent_skips]).tolist()
        st.recent_skips.zero_()
        loss, good, gnorm, skipped_total, streak = values[:5]
        health = dict(zip(HEALTH_KEYS, values[5:8])) if self.cfg.log_health else {}
        flags = values[len(parts):]
        s.last_train = loss if good > 0 else float("nan")
        now = time.perf_counter()
        rate = (st.step - s.step_log) * self.global_batch / max(now - s.t_log, 1e-9)
        rec = {"kind": "train", "step": st.step, "loss": s.last_train if good > 0 else None, "lr": s.lr,
               "grad_norm": gnorm if math.isfinite(gnorm) else None, "samples_per_s": rate, "samples": st.samples_seen,
               "epoch": st.epoch, "time_s": st.elapsed_before + now - s.t_start, "train_time_s": self._train_time()}
        rec.update({k: v if math.isfinite(v) else None for k, v in health.items()})
        if skipped_total > 0:
            rec.update(skipped=int(skipped_total - s.skips_at_log), skipped_total=int(skipped_total),
                       skip_streak=int(streak))
        self._record(rec)
        bad_steps = [n for n, _ in self._recent_batches if n > s.step_log and flags[n % self.cfg.log_every] > 0]
        for n in bad_steps[: max(0, self.cfg.probe_nonfinite - self._probes_done)]:
            self._timed(lambda n=n: self._probe(n, "nonfinite"))
        self._recent_batches.clear()
        s.pbar.set_postfix(loss=f"{s.last_train:.4f}", lr=f"{s.lr:.2e}", sps=f"{rate:.1f}", refresh=False)
        if skipped_total > s.skips_at_log and self.is_main:
            s.pbar.write(f"step {st.step}: {int(skipped_total - s.skips_at_log)} step(s) skipped since the last record "
                         f"(non-finite loss or gradient norm; {int(skipped_total)} in the run, streak {int(streak)})")
        s.loss_sum.zero_()
        s.n_good.zero_()
        s.skips_at_log = skipped_total
        s.n_loss, s.t_log, s.step_log = 0, now, st.step
        if streak >= self.cfg.max_bad_steps:
            self._recover(f"{int(streak)} consecutive steps with a non-finite loss or gradient norm "
                          f"(train.max_bad_steps={self.cfg.max_bad_steps})")
            return True
        return False

    def _probe(self, step: int, kind: str) -> None:
        """Replay step ``step``'s batch eagerly with :func:`~chunkpolicy.training.diagnostics.probe_step`; writes
        ``nonfinite/step_XXXXXX[_rankR].json`` (+ the batch as ``.pt`` for a skipped step) and a ``kind`` record
        (``nonfinite``: a step the guard skipped; ``probe``: the periodic trend probe)."""
        found = [b for n, b in self._recent_batches if n == step]
        if not found:
            return
        cfg = self.cfg
        seeds = [cfg.seed * 1000 + step * 10 + i for i in range(cfg.probe_repeats)]
        try:
            rep = probe_step(self.model, found[0][0], seeds=seeds, autocast=cfg.mixed_precision == "bf16",
                             device=self.state.device)
        except Exception as e:  # a diagnostic never stops training; say why it could not run
            rep = {"error": f"{type(e).__name__}: {e}"}
        tag = f"step_{step:06d}" + (f"_rank{self.rank}" if self.world > 1 else "")
        out_dir = self.run_dir / ("nonfinite" if kind == "nonfinite" else "probes")
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / f"{tag}.json") as tmp:
            tmp.write_text(json.dumps({"step": step, "kind": kind, **rep}, indent=1, default=str))
        if kind == "nonfinite":
            self._probes_done += 1
            with atomic_file(out_dir / f"{tag}_batch.pt") as tmp:  # clones: a collated batch is views of one block
                torch.save([{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mb.items()} for mb in found[0]], tmp)
        reps = rep.get("repeats", [])
        first = next((r["first_nonfinite_forward"] for r in reps if r.get("first_nonfinite_forward")), None)
        bwd = next((r["backward_error"] for r in reps if r.get("backward_error")), None)
        logits = [r["attention_logit_absmax"] for r in reps if r.get("attention_logit_absmax") is not None]
        rec = {"kind": kind, "step": step, "report": str(out_dir / f"{tag}.json"), "error": rep.get("error"),
               "reproduced": rep.get("reproduced"), "repeats": len(reps),
               "losses": [r["loss"] for r in reps], "attention_logit_absmax": max(logits, default=None),
               "first_nonfinite_forward": first and f"{first['call']} at {first['site']}", "backward_error": bwd}
        self._record({k: v for k, v in rec.items() if v is not None})
        if kind == "nonfinite" and self.is_main:
            where = rec.get("first_nonfinite_forward") or bwd or "not reproduced in an eager replay"
            self.session.pbar.write(f"step {step}: non-finite probe ({rec['reproduced']}/{len(reps)} replays non-finite): "
                                    f"{where}; report {rec['report']}")

    def _timed(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, its time counted as overhead (not against samples/s)."""
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.session.t_log += dt
        self.session.overhead += dt
        return out

    def _validate(self) -> None:
        s = self.session
        s.last_val = self._timed(self.evaluate)
        if s.last_val is not None:
            self._record({"kind": "val", "step": self.state.step, "val_loss": s.last_val,
                          "ema": self.state.ema is not None})
            if self.is_main and self.cfg.progress:
                s.pbar.write(f"step {self.state.step}: val loss {s.last_val:.4f}")

    def _weights_finite(self) -> bool:
        params = [p.detach() for p in self.state.trainable]
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True

    def _checkpoint(self) -> bool:
        """Save a checkpoint, from finite weights only (else the guard rolls back); True when it rolled back."""
        if not self._weights_finite():
            self._recover("the weights are not finite")
            return True
        self.session.last_ckpt = self._timed(self.save_checkpoint)
        return False

    # -- non-finite guard, time budget ----------------------------------------------------------------------------
    def _recover(self, reason: str) -> None:
        """Roll back to the latest checkpoint with a lower learning rate, or stop (see the module docstring)."""
        st, s, cfg = self.state, self.session, self.cfg
        st.rollbacks += 1
        if st.rollbacks > cfg.max_rollbacks:
            latest = self.manager.latest()
            if latest is None and self._weights_finite():  # skipped steps left the last good step's weights
                s.last_ckpt = self._timed(self.save_checkpoint)
                latest = s.last_ckpt
            st.rollbacks -= 1  # the rollbacks done
            s.stopped = "non_finite"
            s.message = (f"step {st.step}: {reason}; stopping after {cfg.max_rollbacks} rollback(s) "
                         f"(train.max_rollbacks). Last good weights: {latest or 'none (no checkpoint was written)'}")
            self._record({"kind": "stop", "step": st.step, "reason": reason, "rollbacks": st.rollbacks})
            if self.is_main:
                print(f"non-finite guard: {s.message}")
            return
        self._timed(lambda: self._rollback(reason))

    def _rollback(self, reason: str) -> None:
        st, cfg = self.state, self.cfg
        scale = schedule_of(st.scheduler).scale * cfg.rollback_lr_factor
        rollbacks, skipped, at = st.rollbacks, st.skip_count.clone(), st.step
        ckpt = self._last_good_checkpoint()
        if ckpt is not None:
            self._batches.close()  # its loader (and workers) read the old data position
            self._load(st, ckpt)
            if st.graphed:  # new optimizer state tensors: capture a new graph on the next batch
                tensor_lrs(st.optimizer, st.device)
                st.graph = None
            self._batches = self._train_batches()
        st.rollbacks, schedule_of(st.scheduler).scale = rollbacks, scale
        st.skip_count.copy_(skipped)
        st.skip_streak.zero_()
        s = self.session
        s.skips_at_log = float(skipped)
        s.loss_sum.zero_()
        s.n_good.zero_()
        s.n_loss, s.step_log, s.t_log = 0, st.step, time.perf_counter()
        s.pbar.n = st.step
        self._set_lrs()
        target = f"checkpoint {ckpt.name}" if ckpt is not None else "the current (last good) weights, no checkpoint yet"
        self._record({"kind": "rollback", "step": st.step, "from_step": at, "to": str(ckpt) if ckpt else None,
                      "reason": reason, "lr_scale": scale, "rollbacks": rollbacks})
        if self.is_main:
            print(f"non-finite guard: step {at}: {reason}; rolled back to {target} (step {st.step}), learning rate "
                  f"× {scale:g} (rollback {rollbacks} of at most {cfg.max_rollbacks})")

    def _last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint written outside a streak of skipped steps (else the newest one)."""
        cks = [p for _, p in self.manager.checkpoints()]
        for p in reversed(cks):
            try:
                state = json.loads((p / STATE_DIR / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if int(state.get("extra", {}).get("guard", {}).get("skip_streak", 0)) == 0:
                return p
        return cks[-1] if cks else None

    def _set_lrs(self) -> None:
        """Each group's lr from the schedule at its current step (after a load or a change of scale)."""
        sch = self.state.scheduler
        for g, base, fn in zip(self.state.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            set_lr(g, base * fn(sch.last_epoch))

    def _budget_s(self) -> float | None:
        m = getattr(self.cfg, "max_minutes", None)
        return None if m is None else 60.0 * float(m)

    def _train_time(self) -> float:
        """Training time of the run so far: earlier sessions + this one, validation / checkpoint / rollback excluded."""
        st, s = getattr(self, "state", None), getattr(self, "session", None)
        before = st.train_time_before if st is not None else 0.0
        return before if s is None else before + (time.perf_counter() - s.t_start - s.overhead)

    def _precision(self) -> str:
        return {"fp32": "fp32", "bf16": "bf16 (fast path)"}[getattr(self.cfg, "precision", "fp32")]

    def _apply_precision(self) -> None:
        """``train.precision``: fp32 weights (cast if the model came in another dtype), or bf16 weights (opt-in)."""
        mode = getattr(self.cfg, "precision", "fp32")
        if mode not in ("fp32", "bf16"):
            raise ValueError(f"train.precision: expected fp32 or bf16, got {mode!r}")
        want = torch.float32 if mode == "fp32" else torch.bfloat16
        params = [p for p in self.model.parameters() if p.is_floating_point() and p.dtype != want]
        if not params:
            return
        if self.is_main:
            print(f"train.precision={mode}: casting {sum(p.numel() for p in params):,} parameters "
                  f"from {params[0].dtype} to {want}")
        with torch.no_grad():
            for p in params:  # parameters only: buffers (normalization stats, ...) keep their dtype
                p.data = p.data.to(want)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_fit = time.perf_counter()
        self._prepare_run_dir()
        st = self.state = self.build_state()
        from chunkpolicy.training.trackers import Trackers  # train.log_with: TensorBoard / wandb (offline)
        self.trackers = Trackers(getattr(cfg, "log_with", None), self.run_dir, self.config_dict, is_main=self.is_main)
        self._batches = self._train_batches()
        dev, now = st.device, time.perf_counter()
        self.session = s = _Session(
            start_step=st.step, t_start=now, t_log=now, step_log=st.step, loss_sum=torch.zeros((), device=dev),
            grad_norm=torch.zeros((), device=dev), n_good=torch.zeros((), device=dev),
            pbar=tqdm(total=cfg.steps, initial=st.step, disable=not (self.is_main and cfg.progress), unit="step",
                      dynamic_ncols=True, desc="train"),
        )
        s.skips_at_log = float(st.skip_count)
        self._startup = {"build_s": now - t_fit, "before_fit_s": t_fit - self.t_created}
        budget = self._budget_s()
        if st.step >= cfg.steps and self.is_main:
            print(f"nothing to do: the run is already at step {st.step} of train.steps={cfg.steps}")
        while st.step < cfg.steps:
            out = self.train_step(self._batches)
            s.t_last_step = time.perf_counter()
            if s.t_first_step is None:
                s.t_first_step = s.t_last_step
            ok = None if out.skipped is None else 1.0 - out.skipped
            for loss in out.losses:  # losses of skipped steps are left out of the mean
                s.loss_sum += loss.float() if ok is None else torch.where(ok > 0, loss.float(), 0.0)
            s.n_good += len(out.losses) if ok is None else ok * len(out.losses)
            s.n_loss += len(out.losses)
            if out.grad_norm is not None:
                s.grad_norm = out.grad_norm
            s.lr = out.lr
            s.pbar.update(1)
            out_of_time = budget is not None and self._train_time() >= budget
            stopping = self.stop_after is not None and st.step >= self.stop_after
            if self._due(cfg.log_every) or out_of_time:
                if self._log_train():  # the guard rolled back (or gave up): no validation / checkpoint of this step
                    if s.stopped == "non_finite":
                        break
                    continue
            if cfg.probe_every and st.step % cfg.probe_every == 0:
                self._recent_batches.append(self._last_host)  # (the train record may have just cleared them)
                self._timed(lambda: self._probe(st.step, "probe"))
            if self._due(cfg.val_every) or out_of_time:
                self._validate()
            if self._due(cfg.ckpt_every) or stopping or out_of_time:
                if self._checkpoint():
                    if s.stopped == "non_finite":
                        break
                    continue
            if out_of_time:
                s.stopped, s.message = "max_minutes", f"time budget train.max_minutes={cfg.max_minutes} reached"
                if self.is_main:
                    s.pbar.write(f"step {st.step}: {s.message} ({_fmt_time(self._train_time())} of training)")
                break
            if stopping:
                s.stopped = "stop_after"
                break
        s.pbar.close()
        summary = self._finish()
        self.trackers.finish()
        if s.stopped == "non_finite":
            raise TrainingDiverged(s.message)
        return summary

    def _prepare_run_dir(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.manager.cleanup_temp()
            if self.config_dict is not None:
                self._write_config()
        self.acc.wait_for_everyone()

    def _finish(self) -> dict[str, Any]:
        """``summary.json``, the final loss plot and the printed summary."""
        st, s = self.state, self.session
        t_end_loop = time.perf_counter()
        wall = t_end_loop - s.t_start
        skipped = int(st.skip_count.item())
        summary = {
            "run_dir": str(self.run_dir), "steps": st.step, "steps_this_session": st.step - s.start_step,
            "time_s": wall, "total_time_s": st.elapsed_before + wall, "final_train_loss": s.last_train,
            "final_val_loss": s.last_val,
            "samples_per_s": (st.step - s.start_step) * self.global_batch / max(wall - s.overhead, 1e-9),
            "val_ckpt_time_s": s.overhead,
            "global_batch": self.global_batch, "processes": self.world, "device": st.device.type,
            "trainable_params": st.n_trainable, "params": st.n_params,
            "checkpoint": str(s.last_ckpt or self.manager.latest() or ""), "loss_png": str(self.run_dir / "loss.png"),
            "stopped": s.stopped, "stop_message": s.message, "train_time_s": self._train_time(),
            "max_minutes": getattr(self.cfg, "max_minutes", None), "precision": getattr(self.cfg, "precision", "fp32"),
            "skipped_steps": skipped, "rollbacks": st.rollbacks, "lr_scale": schedule_of(st.scheduler).scale,
            "startup": self._startup_breakdown(),
        }
        if self.is_main:
            if getattr(self, "_plotted_at", None) != st.step:  # the final checkpoint has just drawn it
                self._plot()
            summary["startup"]["shutdown_s"] = (time.perf_counter() - s.t_last_step) if s.t_last_step else None
            with atomic_file(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            print_summary(summary)
        self.acc.wait_for_everyone()
        return summary

    def _startup_breakdown(self) -> dict[str, float | None]:
        """Seconds outside the training loop: before :meth:`fit` (process start → Trainer built: imports, data
        stores, stats, model), :meth:`build_state` (placement, optimizer, resume), the first step (DataLoader workers
        start, first batch, compilation / graph capture). ``shutdown_s`` (last step → summary: final record,
        validation, checkpoint, plot) is added by :meth:`_finish`."""
        s = self.session
        out: dict[str, float | None] = dict(getattr(self, "_startup", {}))
        try:
            import psutil

            out["process_to_trainer_s"] = time.time() - psutil.Process().create_time() - (time.perf_counter() - self.t_created)
        except Exception:  # noqa: BLE001 - optional
            out["process_to_trainer_s"] = None
        out["first_step_s"] = (s.t_first_step - s.t_start) if s.t_first_step else None
        return out

    def _write_config(self) -> None:
        import yaml

        path = self.run_dir / "config.yaml"
        new = yaml.safe_dump(self.config_dict, sort_keys=False)
        if path.exists() and self.resume:
            old = yaml.safe_load(path.read_text()) or {}
            diffs = _diff(old, self.config_dict)
            if diffs:
                print("warning: config differs from the run's saved config.yaml: " + ", ".join(diffs[:10]))
        path.write_text(new)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def print_summary(s: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training summary", show_header=False)
    val = s.get("final_val_loss")
    rows = [
        ("steps", f"{s['steps']} ({s['steps_this_session']} this session)"),
        ("time", f"{_fmt_time(s['time_s'])} this session, {_fmt_time(s['total_time_s'])} total"),
        ("final train loss", f"{s['final_train_loss']:.5f}"),
        ("final val loss", "n/a (no held-out episodes)" if val is None else f"{val:.5f}"),
        ("throughput", f"{s['samples_per_s']:.1f} samples/s while training (global batch {s['global_batch']}, "
                       f"{s['processes']} × {s['device']}); {s['val_ckpt_time_s']:.1f}s in validation + checkpoints"),
        ("parameters", f"{s['trainable_params']:,} trained of {s['params']:,}"
                       + (f" (weights and moments {s['precision']})" if "precision" in s else "")),
        ("checkpoint", s["checkpoint"]),
        ("loss curve", s["loss_png"]),
    ]
    if "stopped" in s:
        why = {"steps": "train.steps reached", "stop_after": "stop_after (session end)",
               "max_minutes": f"time budget of {s.get('max_minutes')} min reached "
                              f"({_fmt_time(s['train_time_s'])} of training)",
               "non_finite": "non-finite guard gave up"}.get(s["stopped"], s["stopped"])
        rows.insert(1, ("stopped", why + (f": {s['stop_message']}" if s.get("stop_message") and s["stopped"] == "non_finite" else "")))
        rows.insert(2, ("non-finite guard", f"{s['skipped_steps']} step(s) skipped, {s['rollbacks']} rollback(s), "
                                            f"learning rate × {s['lr_scale']:g}"))
    st = s.get("startup") or {}
    if st:
        parts = [(k, st.get(k)) for k in ("process_to_trainer_s", "build_s", "first_step_s", "shutdown_s")]
        names = {"process_to_trainer_s": "process start → trainer (imports, data, stats, model)",
                 "build_s": "build state", "first_step_s": "first step (loader start, first batch, capture)",
                 "shutdown_s": "last step → end (final record, validation, checkpoint, plot)"}
        rows.append(("outside the loop", "; ".join(f"{names[k]} {v:.1f}s" for k, v in parts if v is not None)))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
