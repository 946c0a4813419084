"""The training loop, on ``accelerate``: the same code on CPU, one GPU, or several (``accelerate launch``) with DDP or,
with ``train.distributed=fsdp``, FSDP2 (:mod:`~chunkpolicy.training.fsdp`: per-layer sharding, sharded checkpoints
with a consolidated policy export; the eager step is the same, only the wrapper and the checkpoint I/O differ).

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

Precision (``train.precision``, :func:`~chunkpolicy.training.optim.apply_precision`): ``fp32`` (default) fp32
weights and AdamW moments, computed in bf16 under ``mixed_precision=bf16``; ``bf16`` (opt-in fast path) bf16 weights
and moments, no fp32 copy.

Non-finite guard (:mod:`~chunkpolicy.training.guard`): a step whose loss or gradient norm is not finite is skipped
on the device, without a host sync; a streak of them rolls the run back to its latest checkpoint with a lower learning
rate, and too many rollbacks stop it (:class:`TrainingDiverged`).

Time budget: ``train.max_minutes`` ends the run once its training time (all sessions; validation, checkpoint and
rollback time not counted, start-up not counted) reaches the budget, with a final train record, validation and
checkpoint; ``summary.json`` says why the run stopped (``stopped``: steps | max_minutes | stop_after | non_finite).
``train.schedule_over=time`` runs the cosine decay over that budget instead of ``train.steps``.

Outputs in the run dir: ``config.yaml``, ``metrics.jsonl`` (one JSON record per log/validation event),
``checkpoints/step_XXXXXX/`` (see :mod:`chunkpolicy.training.checkpoint`), ``loss.png`` and ``summary.json``.

Around the loop: :mod:`~chunkpolicy.training.train_state` (the state and its checkpoint round trip),
:mod:`~chunkpolicy.training.guard`, :mod:`~chunkpolicy.training.metrics` (``metrics.jsonl``, ``loss.png``) and
:mod:`~chunkpolicy.training.summary` (``summary.json`` and the printed table).
"""

from __future__ import annotations

import math
import os
from collections import deque
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from chunkpolicy.data.mixture import MixtureSampler
from chunkpolicy.models.attention import training_attention_backends
from chunkpolicy.training.checkpoint import STATE_DIR, CheckpointManager, default_export, save_rng
from chunkpolicy.training.run_config import write_run_config
from chunkpolicy.training.diagnostics import HEALTH_KEYS, optimizer_health
from chunkpolicy.training.ema import EMA
from chunkpolicy.training.distributed import LossModule, ShardedBatchSampler, make_accelerator, to_device, unused_parameters
from chunkpolicy.training.guard import NonFiniteGuard, TrainingDiverged
from chunkpolicy.training.metrics import MetricsLog
from chunkpolicy.training.optim import (
    LRSchedule, apply_precision, build_optimizer, build_scheduler, precision_label, tensor_lrs,
)
from chunkpolicy.training.summary import fmt_time, print_summary, run_summary, startup_breakdown, write_summary
from chunkpolicy.training.fsdp import (
    FSDPLossModule, local_norm, reshard_all, sharded_finite, sharded_optimizer_health,
)
from chunkpolicy.training.train_state import (
    TrainState, load_sharded_train_state, load_train_state, save_sharded_train_state, save_train_state,
)
from chunkpolicy.training.validation import validation_loss

__all__ = ["Trainer", "TrainState", "StepOutput", "TrainingDiverged", "LossModule", "ShardedBatchSampler", "make_accelerator", "to_device",
           "unused_parameters", "default_export", "print_summary", "KILL_ENV", "POISON_ENV"]

KILL_ENV = "CHUNKPOLICY_TEST_KILL_AFTER_CKPT"  # test hook: SIGKILL this process right after checkpoint <step>
# test hook: before step <step>, one weight of the first trainable parameter becomes inf (a runaway weight, the same in
# eager and CUDA-graph steps: the graph reads the parameter in place); the guard must skip, roll back and recover
POISON_ENV = "CHUNKPOLICY_TEST_POISON_WEIGHT_AT_STEP"


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


class Trainer(NonFiniteGuard):
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
        if getattr(cfg, "cuda_graph", False) and getattr(cfg, "cpu", False):
            # before the Accelerator: on a GPU host accelerate refuses a CPU one once its state exists, and that error
            # would hide the real one
            raise ValueError("train.cuda_graph: needs a CUDA device; this run has train.cpu=true")
        self.acc = accelerator or make_accelerator(cfg)
        from accelerate.utils import DistributedType

        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(f"{self.acc.distributed_type} from the accelerate config: not supported; launch "
                                      "plain processes and set train.distributed=fsdp for sharded training")
        self.fsdp = getattr(cfg, "distributed", "ddp") == "fsdp"
        if self.fsdp and self.acc.num_processes < 2:
            raise ValueError("train.distributed=fsdp needs several processes (accelerate launch --num_processes N ...)")
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
        self.metrics = MetricsLog(self.run_dir, self.is_main)
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
        dev, precision = acc.device, getattr(cfg, "precision", "fp32")
        self.model.to(dev)
        apply_precision(self.model, precision, verbose=self.is_main)
        self.model.train()
        if (self.world > 1 and not self.fsdp and getattr(cfg, "find_unused_parameters", None) is None
                and acc.ddp_handler is not None):
            unused = self.unused_parameters()
            acc.ddp_handler.find_unused_parameters = bool(unused)
            if unused and self.is_main:
                print(f"DDP: {len(unused)} trainable parameters get no gradient from this loss (e.g. {unused[:3]}); "
                      "find_unused_parameters=True")
        graphed = bool(getattr(cfg, "cuda_graph", False))
        if graphed:
            from chunkpolicy.training.graphed_step import check_graphable

            check_graphable(self.model, dev, world=self.world, grad_accum=cfg.grad_accum)
        if getattr(cfg, "compile", False):
            if not hasattr(self.model, "compile_layers"):
                raise ValueError(f"train.compile: {type(self.model).__name__} has no compile_layers()")
            self.model.compile_layers()
        if self.fsdp:  # before the optimizer: it is built on the sharded parameters
            self._shard()
        optimizer = build_optimizer(self.model, cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay, capturable=graphed)
        over = getattr(cfg, "schedule_over", "steps")
        budget = self._budget_s()
        schedule = LRSchedule(cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr, over=over, budget_s=budget,
                              clock=self._train_time if over == "time" else None)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr, schedule=schedule)
        if graphed:  # the graph replaces accelerate's backward/step; one process, so there is nothing to wrap
            wrapper: nn.Module = self.model
        elif self.fsdp:  # sharded already; accelerate wraps the optimizer (its accumulation window) only
            wrapper, optimizer = FSDPLossModule(self.model, acc.autocast), acc.prepare(optimizer)
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
        self.metrics.truncate(st.step)  # drop records past the checkpoint (or of a run that never saved one)
        if ckpt is not None and self.is_main:
            print(f"resumed from {ckpt} (step {st.step}, epoch {st.epoch}, batch {st.position} of the epoch)")
        elif ckpt is None and self.resume and self.is_main:
            print(f"--resume: no checkpoint in {self.manager.dir}; starting from step 0")
        st.trainable = list(self._trainable().values())
        st.n_trainable = sum(p.numel() for p in st.trainable)
        st.n_params = sum(p.numel() for p in self.model.parameters())
        if self.is_main:
            print(f"training {st.n_trainable:,} of {st.n_params:,} parameters on {self.world} × {dev.type} "
                  f"(weights and AdamW moments: {precision_label(precision)}, mixed precision: {cfg.mixed_precision}"
                  f"{', FSDP' if self.fsdp else ''}); "
                  f"global batch {self.global_batch} "
                  f"= {cfg.batch_size} × {self.world} processes × {cfg.grad_accum} accumulation")
        return st

    def _shard(self) -> None:
        """FSDP: shard the model per transformer layer (:func:`~chunkpolicy.training.fsdp.shard_model`), its units
        found by one probe forward on the first two training samples (the RNG forked: build-time draws stay as in
        an unsharded run)."""
        from torch.utils.data import default_collate

        from chunkpolicy.training.fsdp import shard_model

        dev = self.acc.device
        n = min(2, len(self.train_set))  # type: ignore[arg-type]
        batch = to_device((self.collate_fn or default_collate)([self.train_set[i] for i in range(n)]), dev)
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

        def probe(grad: bool) -> None:
            self.model.train(grad)  # validation runs the model in eval mode without gradients
            with torch.random.fork_rng(devices=devices), self.acc.autocast(), torch.set_grad_enabled(grad):
                loss = self.model.compute_loss(batch)["loss"]
                if grad:
                    loss.backward()
            self.model.train()

        info = shard_model(self.model, probe, device=dev, mixed_precision=self.cfg.mixed_precision,
                           reshard_after_forward=bool(getattr(self.cfg, "fsdp_reshard_after_forward", True)))
        if self.is_main:
            print(f"FSDP: {info['groups']} per-layer units over {self.world} processes; {len(info['root_params'])} of "
                  f"{info['params']} parameter tensors in the root unit"
                  + ("; the eager probe of skipped steps (train.probe_nonfinite) does not run under FSDP"
                     if self.cfg.probe_nonfinite else ""))

    def _weights_finite(self) -> bool:
        return sharded_finite(self.state.trainable) if self.fsdp else super()._weights_finite()

    def _probe(self, step: int, kind: str) -> None:
        if self.fsdp:  # the eager replay runs one process's batch alone: under FSDP it would wait on the others
            return
        super()._probe(step, kind)

    def _load(self, st: TrainState, ckpt: Path) -> None:
        if self.fsdp:
            load_sharded_train_state(st, ckpt, self.model, list(self._trainable()), world=self.world, rank=self.rank,
                                     ema_decay=self.cfg.ema_decay)
            return
        load_train_state(st, ckpt, self._trainable(), world=self.world, rank=self.rank, ema_decay=self.cfg.ema_decay)

    def save_checkpoint(self) -> Path:
        """``checkpoints/step_XXXXXX``: the exported model (EMA weights when EMA is on) and ``training_state/``,
        written into a temp dir and committed; ``loss.png`` redrawn."""
        acc, st = self.acc, self.state
        if self.fsdp:
            return self._save_sharded_checkpoint()
        acc.wait_for_everyone()
        tmp = self.manager.dir / f".step_{st.step:06d}.tmp"
        if self.is_main:
            tmp = self.manager.temp_dir(st.step)
            with st.ema.apply_to(self.model) if st.ema is not None else nullcontext():
                self.export_fn(self.model, tmp)
            save_train_state(tmp / STATE_DIR, st, self._trainable(), world=self.world,
                             micro_batch=self.cfg.batch_size * self.world, session_start=self.session.t_start,
                             train_time=self._train_time)
        acc.wait_for_everyone()
        save_rng(tmp / STATE_DIR, self.rank)
        return self._commit_checkpoint(tmp)

    def _commit_checkpoint(self, tmp: Path) -> Path:
        """Once every process has written into ``tmp``: process 0 renames it into ``step_XXXXXX`` (atomic) and redraws
        ``loss.png``; the test hook may then kill the process."""
        acc, st = self.acc, self.state
        acc.wait_for_everyone()
        final = self.manager.dir / f"step_{st.step:06d}"
        if self.is_main:
            self.manager.commit(st.step, tmp)
            self.metrics.plot()
            self.metrics.plotted_at = st.step
        acc.wait_for_everyone()
        if os.environ.get(KILL_ENV) == str(st.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    def _save_sharded_checkpoint(self) -> Path:
        """FSDP: the same checkpoint dir, written by every process into the same temp dir and committed by process
        0 once all are done: the consolidated policy (EMA weights gathered onto process 0, exported there), the
        sharded training state (:func:`~chunkpolicy.training.train_state.save_sharded_train_state`), the RNGs."""
        from chunkpolicy.training.fsdp import consolidated, full_state_dict

        acc, st = self.acc, self.state
        reshard_all(self.model)  # the EMA swap and the state dicts work on the shards
        acc.wait_for_everyone()
        tmp = self.manager.dir / f".step_{st.step:06d}.tmp"
        if self.is_main:
            tmp = self.manager.temp_dir(st.step)
        acc.wait_for_everyone()  # the temp dir is fresh before anyone writes into it
        with st.ema.apply_to(self.model) if st.ema is not None else nullcontext():
            full = full_state_dict(self.model)  # collective
        if self.is_main:
            with consolidated(self.model, full):
                self.export_fn(self.model, tmp)
        del full
        acc.wait_for_everyone()  # the export writes the temp dir as a whole (save_pretrained renames it into place)
        save_rng(tmp / STATE_DIR, self.rank)  # before the collective save: state.json, written last, follows both
        save_sharded_train_state(tmp / STATE_DIR, st, self.model, list(self._trainable()), world=self.world,
                                 micro_batch=self.cfg.batch_size * self.world, session_start=self.session.t_start,
                                 train_time=self._train_time, is_main=self.is_main)
        return self._commit_checkpoint(tmp)

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def _micro_step(self, batch: Mapping[str, Any], host_ids: list[int] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
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
            out = st.graph(batch, host_ids)
            return out["loss"], out["grad_norm"], out["skipped"]
        gnorm = skipped = None
        host_skip = False
        with acc.accumulate(st.wrapper):
            loss = st.wrapper(batch, host_ids)["loss"]
            acc.backward(loss)
            self._window_bad = self._window_bad | ~torch.isfinite(loss.detach())
            if acc.sync_gradients:
                if cfg.grad_clip > 0:
                    gnorm = acc.clip_grad_norm_(st.trainable, cfg.grad_clip)
                else:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in st.trainable if p.grad is not None])
                if self.fsdp:  # the norm of sharded gradients comes back as a replicated DTensor
                    gnorm = local_norm(gnorm)
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
            # checked on the host, before the copy: a check of device tensors would make the host wait for the GPU
            # to finish the previous step, so it could not prepare this one meanwhile
            validate = getattr(self.model, "validate", None)  # ChunkPolicy's; other models check their own batches
            ids = validate(host[-1], training=True) if validate is not None else None
            loss, g, sk = self._micro_step(to_device(host[-1], st.device), ids)
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
        self.metrics.record(rec)

    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed held-out batches, EMA weights, fixed noise seed."""
        st = self.state
        if st.val_loader is None:
            return None
        loss = validation_loss(self.model, st.val_loader, st.ema, self.acc, seed=self.cfg.seed + 7919 + self.rank)
        if self.fsdp:  # a forward without backward leaves units gathered
            reshard_all(self.model)
        return loss

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
            health_fn = sharded_optimizer_health if self.fsdp else optimizer_health
            parts += list(health_fn(st.optimizer, st.device))
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
        self._probe_skipped(flags, since=s.step_log)
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

    def _checkpoint(self) -> bool:
        """Save a checkpoint, from finite weights only (else the guard rolls back); True when it rolled back."""
        if not self._weights_finite():
            self._recover("the weights are not finite")
            return True
        self.session.last_ckpt = self._timed(self.save_checkpoint)
        return False

    # -- time budget ------------------------------------------------------------------------------------------
    def _budget_s(self) -> float | None:
        m = getattr(self.cfg, "max_minutes", None)
        return None if m is None else 60.0 * float(m)

    def _train_time(self) -> float:
        """Training time of the run so far: earlier sessions + this one, validation / checkpoint / rollback excluded."""
        st, s = getattr(self, "state", None), getattr(self, "session", None)
        before = st.train_time_before if st is not None else 0.0
        return before if s is None else before + (time.perf_counter() - s.t_start - s.overhead)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_fit = time.perf_counter()
        self._prepare_run_dir()
        st = self.state = self.build_state()
        from chunkpolicy.training.trackers import Trackers  # train.log_with: TensorBoard / wandb (offline)
        self.metrics.trackers = Trackers(getattr(cfg, "log_with", None), self.run_dir, self.config_dict, is_main=self.is_main)
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
                    s.pbar.write(f"step {st.step}: {s.message} ({fmt_time(self._train_time())} of training)")
                break
            if stopping:
                s.stopped = "stop_after"
                break
        s.pbar.close()
        summary = self._finish()
        self.metrics.trackers.finish()
        if s.stopped == "non_finite":
            raise TrainingDiverged(s.message)
        return summary

    def _prepare_run_dir(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.manager.cleanup_temp()
            if self.config_dict is not None:
                write_run_config(self.run_dir, self.config_dict, self.resume)
        self.acc.wait_for_everyone()

    def _finish(self) -> dict[str, Any]:
        """``summary.json``, the final loss plot and the printed summary."""
        st, s = self.state, self.session
        summary = run_summary(st, s, self.cfg, run_dir=self.run_dir, global_batch=self.global_batch, world=self.world,
                              checkpoint=s.last_ckpt or self.manager.latest(), train_time=self._train_time(),
                              startup=startup_breakdown(self._startup, self.t_created, s.t_start, s.t_first_step))
        if self.is_main:
            if self.metrics.plotted_at != st.step:  # the final checkpoint has just drawn it
                self.metrics.plot()
            summary["startup"]["shutdown_s"] = (time.perf_counter() - s.t_last_step) if s.t_last_step else None
            write_summary(summary, self.run_dir)
        self.acc.wait_for_everyone()
        return summary
