"""A study row trained by LeRobot's own trainer (``python -m lerobot.scripts.lerobot_train``), resumable.

The row's store is exported once with ``export-lerobot`` (``out_dir/data/<data>_lerobot``); LeRobot trains with its
policy defaults plus ``method.args`` into ``out_dir/rows/<row>/train`` for ``method.steps`` optimizer steps (an int,
or ``same_as:ROW``: the steps that chunkpolicy row reached). A rerun continues the newest checkpoint that has a
complete training state (``--resume=true``, the target steps passed again). ``train.max_minutes`` caps the wall-clock
time of LeRobot's process over all sessions (its last saved checkpoint then counts; LeRobot's own schedule does not
finish); ``--session-minutes`` ends a session the same way without ending the row (:class:`SessionLimit`). LeRobot
keeps every checkpoint, so it saves every quarter of the steps unless ``train.ckpt_every`` says otherwise, and once
the training is done the optimizer states of all but the newest checkpoint are deleted (the weights stay, for
``train.eval_checkpoints: all``). Logs: ``rows/<row>/train.log``; sessions: ``rows/<row>/train.sessions.json``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from chunkpolicy.atomic import read_json
from chunkpolicy.study.config import Row, Study, StudyError
from chunkpolicy.study.session import Deadline, Log, SessionLimit, study_lock, write_json

__all__ = ["LEROBOT_DONE", "lerobot_checkpoints", "lerobot_train_command", "train_lerobot"]

LEROBOT_DONE = "chunkpolicy_study_train.json"  # in a LeRobot row's train dir: written when its training ended


def _lerobot_steps(study: Study, row: Row, log: Log, train_source: Callable[[Row], dict[str, Any]]) -> int:
    steps = row.method["steps"]
    if isinstance(steps, int):
        return steps
    src = str(steps)[len("same_as:"):]
    if not str(steps).startswith("same_as:") or src not in study.rows or study.rows[src].kind != "chunkpolicy":
        raise StudyError(f"rows.{row.name}.method.steps: expected an int or same_as:<chunkpolicy row>, got {steps!r}")
    done = study.results_dir / f"{src}.json"
    if done.is_file():  # that row is finished: its recorded steps (a fresh machine need not train it again)
        log(f"[{row.name}] steps: the optimizer steps of row {src} ({done})")
        return int(read_json(done)["train"]["steps"])
    log(f"[{row.name}] steps: the optimizer steps of row {src}")
    return int(train_source(study.rows[src])["steps"])


def lerobot_checkpoints(out: Path) -> list[tuple[int, str]]:
    ck = out / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted((int(p.name), str(p / "pretrained_model")) for p in ck.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "pretrained_model" / "model.safetensors").is_file())


def _lerobot_resumable(out: Path) -> Path | None:
    """The newest LeRobot checkpoint of ``out`` with a complete training state (what ``--resume`` continues from)."""
    for step, policy_dir in reversed(lerobot_checkpoints(out)):
        p = Path(policy_dir)
        if (p / "train_config.json").is_file() and (p.parent / "training_state" / "training_step.json").is_file():
            return p
    return None


def lerobot_train_command(row: Row, dataset_root: Path, out: Path, steps: int, resume_from: Path | None) -> list[str]:
    """LeRobot's own training script with its defaults, on the exported demos, plus ``method.args``; with
    ``resume_from`` (a checkpoint's ``pretrained_model`` dir) it continues that run with its saved config, to ``steps``."""
    cmd = [sys.executable, "-m", "lerobot.scripts.lerobot_train"]
    if resume_from is not None:
        return cmd + ["--resume=true", f"--config_path={resume_from / 'train_config.json'}", f"--steps={steps}"]
    save_freq = int(row.train.get("ckpt_every") or max(1, steps // 4))  # LeRobot keeps every checkpoint
    return cmd + [f"--dataset.repo_id=local/{row.data.name}", f"--dataset.root={dataset_root}",
                  f"--policy.type={row.method['lerobot']}", "--policy.push_to_hub=false", f"--output_dir={out}",
                  f"--steps={steps}", f"--save_freq={save_freq}", "--wandb.enable=false", f"--job_name={row.name}",
                  *[str(a) for a in row.method.get("args", [])]]


def ensure_lerobot_export(store: Path, ds_root: Path, repo_id: str, log: Log) -> None:
    """The store exported as a LeRobotDataset at ``ds_root`` (``export_lerobot`` is atomic: present means complete),
    once: rows in parallel processes share it, one writes it and the others wait on its lock and reuse it."""
    from chunkpolicy.data import lerobot_io

    if (ds_root / "meta" / "info.json").is_file():
        return
    with study_lock(ds_root.with_name(ds_root.name + ".lock"), f"data {ds_root.name}", log):
        if not (ds_root / "meta" / "info.json").is_file():
            log(f"exporting {store} to LeRobotDataset {ds_root}")
            lerobot_io.export_lerobot(store, ds_root, repo_id=repo_id, progress=False)


def train_lerobot(study: Study, row: Row, run_dir: Path, store: Path, log: Log, deadline: Deadline,
                  train_source: Callable[[Row], dict[str, Any]]) -> dict[str, Any]:
    """Train (or resume, or reuse) a LeRobot row; returns its training record. ``train_source(row)`` trains a
    ``same_as:`` row first and returns its record."""
    marker = run_dir / LEROBOT_DONE
    if not marker.is_file():
        steps = _lerobot_steps(study, row, log, train_source)
        ds_root = study.out_dir / "data" / f"{row.data.name}_lerobot"
        ensure_lerobot_export(store, ds_root, f"local/{row.data.name}", log)
        have = _lerobot_resumable(run_dir)
        if have is None and run_dir.exists():  # a start that saved nothing: LeRobot refuses an existing output dir
            shutil.rmtree(run_dir)
        sessions_path = run_dir.parent / f"{run_dir.name}.sessions.json"
        sessions = read_json(sessions_path) if sessions_path.is_file() else []
        budget = row.train.get("max_minutes")
        left = None if budget is None else max(0.0, 60 * float(budget) - sum(s["wall_s"] for s in sessions))
        deadline.check(f"training {row.name}")
        session_left = deadline.left()
        by_session = session_left is not None and (left is None or session_left < left)
        timeout = session_left if by_session else left
        cmd = lerobot_train_command(row, ds_root, run_dir, steps, have)
        log(f"[{row.name}] LeRobot training ({f'resuming from {have.parent.name}' if have else 'from scratch'}): "
            f"{shlex.join(cmd)}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        log_path = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        timed_out = False
        with open(log_path, "a") as fh:
            fh.write(f"\n$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
        wall = time.perf_counter() - t0
        sessions.append({"wall_s": wall, "rc": rc, "timed_out": timed_out, "resumed": have is not None,
                         "session_limit": timed_out and by_session})
        write_json(sessions, sessions_path)
        if timed_out and by_session:
            raise SessionLimit(f"[{row.name}] LeRobot training stopped by the session limit; its last saved checkpoint "
                               f"({_lerobot_resumable(run_dir) or 'none yet'}) is resumed by the next session")
        if rc != 0 and not timed_out:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"[{row.name}] LeRobot training failed (exit {rc}); log {log_path}:\n{tail}")
        final = lerobot_checkpoints(run_dir)
        if not final:
            raise RuntimeError(f"[{row.name}] LeRobot training ended ({'time budget' if timed_out else 'exit 0'}) "
                               f"without a checkpoint in {run_dir / 'checkpoints'}; log {log_path}")
        total = sum(s["wall_s"] for s in sessions)
        import torch

        gpus = 1 if torch.cuda.is_available() and not any("--policy.device=cpu" in a for a in cmd) else 0
        write_json({"steps": final[-1][0], "target_steps": steps, "stopped": "max_minutes" if timed_out else "steps",
                     "wall_s": total, "gpus": gpus, "sessions": len(sessions), "command": cmd}, marker)
        for _, policy_dir in final[:-1]:  # done: only the newest optimizer state could ever be resumed (disk: GBs each)
            shutil.rmtree(Path(policy_dir).parent / "training_state", ignore_errors=True)
    m = read_json(marker)
    ckpts = lerobot_checkpoints(run_dir)
    minutes = float(m["wall_s"]) / 60
    return {"framework": "lerobot", "policy_type": row.method["lerobot"], "run_dir": str(run_dir), "steps": m["steps"],
            "target_steps": m["target_steps"], "stopped": m["stopped"], "max_minutes": row.train.get("max_minutes"),
            "train_minutes": minutes, "wall_minutes": minutes, "gpus": m["gpus"], "gpu_minutes": minutes * m["gpus"],
            "checkpoint": ckpts[-1][1] if ckpts else None, "checkpoints": ckpts, "command": m["command"],
            "note": "wall minutes of LeRobot's training process (start-up included)"}
