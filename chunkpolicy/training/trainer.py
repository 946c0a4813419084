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

Outputs in the run dir: ``config.yaml``, ``metrics.jsonl`` (one JSON record per log/validation event),
``checkpoints/step_XXXXXX/`` (see :mod:`chunkpolicy.training.checkpoint`), ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from chunkpolicy.atomic import atomic_file
from chunkpolicy.data.mixture import MixtureSampler
from chunkpolicy.training.checkpoint import (
    STATE_DIR, CheckpointManager, TrainingState, load_rng, read_training_state, save_rng, write_training_state,
)
from chunkpolicy.training.ema import EMA
from chunkpolicy.training.distributed import LossModule, ShardedBatchSampler, make_accelerator, to_device, unused_parameters
from chunkpolicy.training.optim import (
    build_optimizer, build_scheduler, optimizer_state_from_tensors, optimizer_state_to_tensors, plain_numbers, set_lr,
    tensor_lrs,
)

__all__ = ["Trainer", "LossModule", "ShardedBatchSampler", "make_accelerator", "to_device", "unused_parameters",
           "default_export", "print_summary", "KILL_ENV"]

KILL_ENV = "CHUNKPOLICY_TEST_KILL_AFTER_CKPT"  # test hook: SIGKILL this process right after checkpoint <step>


def default_export(model: nn.Module, path: Path) -> None:
    """``model.save_pretrained(path)`` if it has one, else its state dict as ``path/model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


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
        micro = self.cfg.batch_size * self.world
        loader = self._loader(self.train_set, ShardedBatchSampler(self.sampler, self.cfg.batch_size, self.world, self.rank),
                              persistent=True)
        while True:
            self.sampler.set_epoch(self.epoch, self.position * micro)
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

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

    def _load(self, ckpt: Path) -> None:
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
        self.optimizer.load_state_dict(optimizer_state_from_tensors(opt_t, opt_meta))
        self.scheduler.load_state_dict(state.scheduler)
        # the lr of the next step comes from this run's schedule (identical unless train.steps/lr/warmup changed)
        for g, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            set_lr(g, base * fn(self.scheduler.last_epoch))
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{ckpt}: has no EMA state but train.ema_decay={self.cfg.ema_decay}")
            self.ema.load_state_dict(ema, state.ema_updates)
        self.step, self.epoch, self.position = state.step, state.epoch, state.position
        self.samples_seen, self.elapsed_before = state.samples_seen, state.elapsed_s
        load_rng(ckpt / STATE_DIR, self.rank)

    def save_checkpoint(self) -> Path:
        acc = self.acc
        acc.wait_for_everyone()
        tmp = self.manager.dir / f".step_{self.step:06d}.tmp"
        if self.is_main:
            tmp = self.manager.temp_dir(self.step)
            with self.ema.apply_to(self.model) if self.ema is not None else nullcontext():
                self.export_fn(self.model, tmp)
            opt_t, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
            state = TrainingState(
                step=self.step, epoch=self.epoch, position=self.position, samples_seen=self.samples_seen,
                world_size=self.world, scheduler=plain_numbers(self.scheduler.state_dict()),
                ema_updates=self.ema.num_updates if self.ema is not None else 0,
                elapsed_s=self.elapsed_before + (time.perf_counter() - self.t_start),
                extra={"sampler": self.sampler.state_dict(self.epoch, self.position * self.cfg.batch_size * self.world)},
            )
            write_training_state(tmp / STATE_DIR, state, {n: p for n, p in self._trainable().items()}, opt_t, opt_meta,
                                 self.ema.state_dict() if self.ema is not None else None)
        acc.wait_for_everyone()
        save_rng(tmp / STATE_DIR, self.rank)
        acc.wait_for_everyone()
        final = self.manager.dir / f"step_{self.step:06d}"
        if self.is_main:
            self.manager.commit(self.step, tmp)
            self._plot()
        acc.wait_for_everyone()
        if os.environ.get(KILL_ENV) == str(self.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    # -- CUDA-graphed steps ---------------------------------------------------------------------------------------
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

    def _graphed_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step replayed from a CUDA graph (captured on the first call); returns (loss, grad norm)."""
        if self.graphed_step is None:
            from chunkpolicy.training.graphed_step import GraphedTrainStep

            self.graphed_step = GraphedTrainStep(self.model, self.optimizer, batch, max_grad_norm=self.cfg.grad_clip or None,
                                                 autocast=self.cfg.mixed_precision == "bf16")
        out = self.graphed_step(batch)
        return out["loss"], out["grad_norm"]

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
        if self.val_loader is None:
            return None
        m, dev = self.model, self.acc.device
        was = m.training
        m.eval()
        total = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros((), device=dev, dtype=torch.float64)
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with self.ema.apply_to(m) if self.ema is not None else nullcontext(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.cfg.seed + 7919 + self.rank)
            for batch in self.val_loader:
                with self.acc.autocast():
                    loss = m.compute_loss(to_device(batch, dev))["loss"].double()
                n = len(batch["prompt"]) if "prompt" in batch else next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                total += loss * n
                count += n
        m.train(was)
        total, count = self.acc.reduce(total, "sum"), self.acc.reduce(count, "sum")
        return float(total / count)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.manager.cleanup_temp()
            if self.config_dict is not None:
                self._write_config()
        acc.wait_for_everyone()
        dev = acc.device
        self.model.to(dev)
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
        self.optimizer = build_optimizer(self.model, cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay, capturable=graphed)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr)
        self.graphed_step = None  # built on the first batch (it needs the batch shapes)
        if graphed:  # the graph replaces accelerate's backward/step; one process, so there is nothing to wrap
            self.wrapper = self.model
        else:
            self.wrapper, self.optimizer = acc.prepare(LossModule(self.model), self.optimizer)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        micro = cfg.batch_size * self.world
        n_samples = max(1, len(self.train_set) // micro) * micro  # type: ignore[arg-type]
        self.sampler = MixtureSampler(self.train_set, num_samples=n_samples, seed=cfg.seed)
        self.val_loader = self._val_loader()
        self.step = self.epoch = self.position = self.samples_seen = 0
        self.elapsed_before = 0.0
        set_seed(cfg.seed, device_specific=True)  # training noise differs per process, data order does not
        ckpt = self.manager.latest() if self.resume else None
        if ckpt is not None:
            self._load(ckpt)
        if graphed:  # after loading: a checkpoint's learning rates come back as numbers
            tensor_lrs(self.optimizer, dev)
        self._truncate_metrics(self.step)  # drop records past the checkpoint (or of a run that never saved one)
        if ckpt is not None and self.is_main:
            print(f"resumed from {ckpt} (step {self.step}, epoch {self.epoch}, batch {self.position} of the epoch)")
        elif ckpt is None and self.resume and self.is_main:
            print(f"--resume: no checkpoint in {self.manager.dir}; starting from step 0")
        trainable = list(self._trainable().values())
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in self.model.parameters())
        if self.is_main:
            print(f"training {n_train:,} of {n_all:,} parameters on {self.world} × {dev.type} "
                  f"(mixed precision: {cfg.mixed_precision}); global batch {self.global_batch} "
                  f"= {cfg.batch_size} × {self.world} processes × {cfg.grad_accum} accumulation")
        batches = self._train_batches()
        start_step, self.t_start = self.step, time.perf_counter()
        t_log, step_log = self.t_start, self.step
        loss_sum = torch.zeros((), device=dev)
        gnorm = torch.zeros((), device=dev)
        n_loss, last_train, last_val, last_ckpt, overhead = 0, float("nan"), None, None, 0.0
        pbar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.is_main and cfg.progress), unit="step",
                    dynamic_ncols=True, desc="train")
        if self.step >= cfg.steps and self.is_main:
            print(f"nothing to do: the run is already at step {self.step} of train.steps={cfg.steps}")
        while self.step < cfg.steps:
            if graphed:
                loss, gnorm = self._graphed_step(to_device(next(batches), dev))
                loss_sum += loss.float()
                n_loss += 1
            else:
                for _ in range(cfg.grad_accum):
                    batch = to_device(next(batches), dev)
                    with acc.accumulate(self.wrapper):
                        loss = self.wrapper(batch)["loss"]
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.grad_clip > 0:
                            gnorm = acc.clip_grad_norm_(trainable, cfg.grad_clip)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach().float()
                    n_loss += 1
            # the step's lr from the schedule itself: reading a graphed step's lr tensor would sync with the device
            lr_used = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            self.samples_seen += self.global_batch
            pbar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mean = acc.reduce(loss_sum / max(n_loss, 1), "mean")
                last_train = float(mean)
                if not math.isfinite(last_train):
                    raise FloatingPointError(f"step {self.step}: training loss is {last_train}")
                now = time.perf_counter()
                rate = (self.step - step_log) * self.global_batch / max(now - t_log, 1e-9)
                rec = {"kind": "train", "step": self.step, "loss": last_train, "lr": lr_used,
                       "grad_norm": float(gnorm), "samples_per_s": rate, "samples": self.samples_seen, "epoch": self.epoch,
                       "time_s": self.elapsed_before + now - self.t_start}
                self._record(rec)
                pbar.set_postfix(loss=f"{last_train:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rate:.1f}", refresh=False)
                loss_sum.zero_()
                n_loss, t_log, step_log = 0, now, self.step
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                t_val = time.perf_counter()
                last_val = self.evaluate()
                t_log += time.perf_counter() - t_val  # validation time does not count against samples/s
                overhead += time.perf_counter() - t_val
                if last_val is not None:
                    self._record({"kind": "val", "step": self.step, "val_loss": last_val, "ema": self.ema is not None})
                    if self.is_main and cfg.progress:
                        pbar.write(f"step {self.step}: val loss {last_val:.4f}")
            stopping = self.stop_after is not None and self.step >= self.stop_after
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stopping:
                t_ck = time.perf_counter()
                last_ckpt = self.save_checkpoint()
                t_log += time.perf_counter() - t_ck
                overhead += time.perf_counter() - t_ck
            if stopping:
                break
        pbar.close()
        wall = time.perf_counter() - self.t_start
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "steps_this_session": self.step - start_step,
            "time_s": wall, "total_time_s": self.elapsed_before + wall, "final_train_loss": last_train,
            "final_val_loss": last_val,
            "samples_per_s": (self.step - start_step) * self.global_batch / max(wall - overhead, 1e-9),
            "val_ckpt_time_s": overhead,
            "global_batch": self.global_batch, "processes": self.world, "device": dev.type,
            "trainable_params": n_train, "params": n_all,
            "checkpoint": str(last_ckpt or self.manager.latest() or ""), "loss_png": str(self.run_dir / "loss.png"),
        }
        if self.is_main:
            self._plot()
            with atomic_file(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            print_summary(summary)
        acc.wait_for_everyone()
        return summary

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
        ("parameters", f"{s['trainable_params']:,} trained of {s['params']:,}"),
        ("checkpoint", s["checkpoint"]),
        ("loss curve", s["loss_png"]),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
