"""The end of a training session: ``summary.json``'s fields, the time spent outside the loop, and the printed table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from chunkpolicy.atomic import atomic_file
from chunkpolicy.training.optim import schedule_of

__all__ = ["fmt_time", "startup_breakdown", "run_summary", "write_summary", "print_summary"]


def fmt_time(s: float) -> str:
    """``12m05s``, or ``1h02m05s`` from an hour on (``s`` in seconds, rounded)."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def startup_breakdown(startup: Mapping[str, float], t_created: float, t_start: float,
                      t_first_step: float | None) -> dict[str, float | None]:
    """Seconds outside the training loop: before ``fit`` (process start → Trainer built: imports, data stores,
    stats, model), ``build_state`` (placement, optimizer, resume), the first step (DataLoader workers start, first
    batch, compilation / graph capture). ``startup``: the trainer's ``build_s`` / ``before_fit_s``; the times are
    ``perf_counter`` values (``t_created``: Trainer built, ``t_start``: loop start). ``shutdown_s`` (last step →
    summary: final record, validation, checkpoint, plot) is added by the trainer when it writes the summary."""
    out: dict[str, float | None] = dict(startup)
    try:
        import psutil

        out["process_to_trainer_s"] = time.time() - psutil.Process().create_time() - (time.perf_counter() - t_created)
    except Exception:  # noqa: BLE001 - optional
        out["process_to_trainer_s"] = None
    out["first_step_s"] = (t_first_step - t_start) if t_first_step else None
    return out


def run_summary(st: Any, s: Any, cfg: Any, *, run_dir: Path, global_batch: int, world: int, checkpoint: Any,
                train_time: float, startup: dict[str, float | None]) -> dict[str, Any]:
    """``summary.json``'s fields from the trainer's state ``st`` and session ``s`` at the end of the loop (times in
    seconds; ``samples_per_s`` over the training time of this session, validation and checkpoints excluded)."""
    t_end_loop = time.perf_counter()
    wall = t_end_loop - s.t_start
    skipped = int(st.skip_count.item())
    return {
        "run_dir": str(run_dir), "steps": st.step, "steps_this_session": st.step - s.start_step,
        "time_s": wall, "total_time_s": st.elapsed_before + wall, "final_train_loss": s.last_train,
        "final_val_loss": s.last_val,
        "samples_per_s": (st.step - s.start_step) * global_batch / max(wall - s.overhead, 1e-9),
        "val_ckpt_time_s": s.overhead,
        "global_batch": global_batch, "processes": world, "device": st.device.type,
        "trainable_params": st.n_trainable, "params": st.n_params,
        "checkpoint": str(checkpoint or ""), "loss_png": str(run_dir / "loss.png"),
        "stopped": s.stopped, "stop_message": s.message, "train_time_s": train_time,
        "max_minutes": getattr(cfg, "max_minutes", None), "precision": getattr(cfg, "precision", "fp32"),
        "skipped_steps": skipped, "rollbacks": st.rollbacks, "lr_scale": schedule_of(st.scheduler).scale,
        "startup": startup,
    }


def write_summary(summary: Mapping[str, Any], run_dir: Path) -> None:
    """``run_dir/summary.json`` (atomic), then the table on stdout."""
    with atomic_file(run_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print_summary(summary)


def print_summary(s: Mapping[str, Any]) -> None:
    """A rich table of a ``summary.json`` (older summaries without the guard / precision fields print too)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training summary", show_header=False)
    val = s.get("final_val_loss")
    rows = [
        ("steps", f"{s['steps']} ({s['steps_this_session']} this session)"),
        ("time", f"{fmt_time(s['time_s'])} this session, {fmt_time(s['total_time_s'])} total"),
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
                              f"({fmt_time(s['train_time_s'])} of training)",
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
