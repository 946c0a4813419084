"""The trainer's non-finite guard: what it does after a streak of skipped steps (roll back or stop).

A step whose loss (any micro-batch) or gradient norm is not finite is skipped: the fused AdamW gets a device-side
``found_inf`` flag (eager and CUDA-graph steps alike; the kernel then leaves weights, moments and step counts
untouched) and the EMA update is multiplied by the same flag, so no host sync is added per step. The skipped steps
still consume their batches and advance the schedule. A device-side counter of skipped steps and of the current
streak is read with the loss at each ``train`` record (``skipped``, ``skipped_total``): that read is the only sync,
so a streak is noticed up to ``log_every`` steps late (harmless: skipped steps change nothing). When the streak has
reached ``train.max_bad_steps`` at a record (or a checkpoint finds non-finite weights), the run rolls back to its last good
checkpoint, the newest one written outside a skip streak (weights, optimizer, EMA, data position, RNG), with the
learning rate × ``train.rollback_lr_factor``
(a ``rollback`` record; the factor is kept in later checkpoints, so a resumed run continues exactly); without a
checkpoint it continues from the current weights (the last good step's) with the lower rate. After
``train.max_rollbacks`` rollbacks it stops (:class:`TrainingDiverged`, after ``summary.json``), leaving the last good
weights on disk: checkpoints are only written from finite weights. An optimizer that is not fused (non-float
parameters) falls back to reading the flag on the host each step.

The skipping itself is in the step (``Trainer._micro_step``, :class:`~chunkpolicy.training.graphed_step.GraphedTrainStep`);
this module holds the decisions taken at a record or a checkpoint, and the probe that replays a skipped step's batch
(``train.probe_nonfinite``; also the periodic ``train.probe_every``) to say where its overflow happened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from chunkpolicy.training.checkpoint import STATE_DIR, CheckpointManager
from chunkpolicy.training.diagnostics import write_probe_report
from chunkpolicy.training.optim import schedule_of, set_lrs, tensor_lrs

__all__ = ["TrainingDiverged", "NonFiniteGuard", "last_good_checkpoint", "weights_finite"]


class TrainingDiverged(FloatingPointError):
    """The non-finite guard gave up (``train.max_rollbacks`` rollbacks used); raised after ``summary.json``."""


def weights_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every value of ``params`` is finite (one host sync)."""
    params = [p.detach() for p in params]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def last_good_checkpoint(manager: CheckpointManager) -> Path | None:
    """The newest checkpoint written outside a streak of skipped steps (else the newest one)."""
    cks = [p for _, p in manager.checkpoints()]
    for p in reversed(cks):
        try:
            state = json.loads((p / STATE_DIR / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if int(state.get("extra", {}).get("guard", {}).get("skip_streak", 0)) == 0:
            return p
    return cks[-1] if cks else None


class NonFiniteGuard:
    """Rollback, stop and probes, as methods of :class:`~chunkpolicy.training.trainer.Trainer` (which inherits them):
    they act on the trainer's ``state``, ``session``, checkpoints, batch stream and recent host batches."""

    def _probe_skipped(self, flags: list[float], since: int) -> None:
        """Probe the steps after ``since`` that the guard skipped (``flags[n % log_every]`` > 0), up to
        ``train.probe_nonfinite`` probes in the run; then forget the interval's host batches."""
        bad_steps = [n for n, _ in self._recent_batches if n > since and flags[n % self.cfg.log_every] > 0]
        for n in bad_steps[: max(0, self.cfg.probe_nonfinite - self._probes_done)]:
            self._timed(lambda n=n: self._probe(n, "nonfinite"))
        self._recent_batches.clear()

    def _probe(self, step: int, kind: str) -> None:
        """Replay step ``step``'s batch eagerly (:func:`~chunkpolicy.training.diagnostics.write_probe_report`) into
        ``nonfinite/`` or ``probes/`` (``step_XXXXXX[_rankR].json``) and a ``kind`` record (``nonfinite``: a step the
        guard skipped; ``probe``: the periodic trend probe)."""
        found = [b for n, b in self._recent_batches if n == step]
        if not found:
            return
        cfg = self.cfg
        seeds = [cfg.seed * 1000 + step * 10 + i for i in range(cfg.probe_repeats)]
        tag = f"step_{step:06d}" + (f"_rank{self.rank}" if self.world > 1 else "")
        out_dir = self.run_dir / ("nonfinite" if kind == "nonfinite" else "probes")
        rec = write_probe_report(self.model, found[0], step, kind, out_dir, tag, seeds=seeds,
                                 autocast=cfg.mixed_precision == "bf16", device=self.state.device)
        if kind == "nonfinite":
            self._probes_done += 1
        self._record({k: v for k, v in rec.items() if v is not None})
        if kind == "nonfinite" and self.is_main:
            where = rec.get("first_nonfinite_forward") or rec["backward_error"] or "not reproduced in an eager replay"
            self.session.pbar.write(f"step {step}: non-finite probe ({rec['reproduced']}/{rec['repeats']} replays "
                                    f"non-finite): {where}; report {rec['report']}")

    def _weights_finite(self) -> bool:
        """Whether every trainable weight is finite (the trainer checks all shards together under FSDP, so that every
        process takes the same decision)."""
        return weights_finite(self.state.trainable)

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
        ckpt = last_good_checkpoint(self.manager)
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
        set_lrs(st.optimizer, st.scheduler)
        target = f"checkpoint {ckpt.name}" if ckpt is not None else "the current (last good) weights, no checkpoint yet"
        self._record({"kind": "rollback", "step": st.step, "from_step": at, "to": str(ckpt) if ckpt else None,
                      "reason": reason, "lr_scale": scale, "rollbacks": rollbacks})
        if self.is_main:
            print(f"non-finite guard: step {at}: {reason}; rolled back to {target} (step {st.step}), learning rate "
                  f"× {scale:g} (rollback {rollbacks} of at most {cfg.max_rollbacks})")
