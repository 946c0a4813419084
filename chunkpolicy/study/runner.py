"""``chunkpolicy study run ROW --study FILE``: one result row of a study, from data to its results JSON.

Stages, each resumable (a row can be completed in several sittings; rerunning the command continues):

1. **Data**: the row's data sources (``data``, and each of its ``mixture``): an existing store, or its ``collect``
   recipe (scripted experts, written to ``out_dir/data/<data>.zarr``; an interrupted collection resumes, a finished
   one is reused by every row).
2. **Training**: ``method.config`` trains chunkpolicy in this process (what ``chunkpolicy train`` does) into
   ``out_dir/rows/<row>/train``, on ``data`` or on the ``mixture``; a run that has checkpoints but did not finish
   resumes from its latest checkpoint (same batches, RNG, optimizer). With ``method.init_from_row`` it post-trains
   from that row's final checkpoint (``posttrain.init_from``), training that row first when its checkpoint is
   missing (a fresh machine): that training's GPU time is then added to this row's. ``method.lerobot`` runs
   LeRobot's own trainer on the exported demos (:mod:`chunkpolicy.study.lerobot_train`). ``method.from_row`` trains
   nothing: it evaluates that row's checkpoint (trained first if needed).
3. **Evaluation**: ``chunkpolicy eval`` (:func:`chunkpolicy.evaluation.cli.run_eval`) of the final checkpoint, or of
   every kept checkpoint with ``train.eval_checkpoints: all`` (success vs training steps), into
   ``out_dir/rows/<row>/eval/<checkpoint>``; a finished evaluation with the same settings is reused.
4. **Chunk latency**: one env observation, batch 1, ``eval.latency_calls`` timed calls of the policy after warm-up
   (CUDA-synchronized; the plain chunk, no RTC guidance).

The results JSON (``results_dir/<row>.json``, written atomically at the end) marks the row done; ``--force`` redoes
the evaluations and rewrites it (a finished training is kept: delete its run dir to retrain). It holds the resolved
row config, the command, the git commit, the machine, the data, training steps, training / evaluation wall- and
GPU-minutes, success per task with 95% Wilson intervals and the mean, every episode, success per evaluated checkpoint
and the chunk latency. ``--session-minutes`` ends a session early (:class:`~chunkpolicy.study.session.SessionLimit`):
training at its next step with a checkpoint, evaluation before the next checkpoint's; the same command continues.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from chunkpolicy.atomic import read_json
from chunkpolicy.study.config import DataSource, Row, Study, StudyError, expand_tasks as _expand_tasks
from chunkpolicy.study.session import Deadline, Log, SessionLimit, gpu_shared_by, study_lock as _lock
from chunkpolicy.study.session import write_json as _write_json

__all__ = ["run_row", "row_result_path", "ensure_data", "ensure_source", "train_row", "chunk_latency", "git_info",
           "row_command", "SessionLimit", "Deadline"]  # SessionLimit, Deadline: from chunkpolicy.study.session

def row_result_path(study: Study, name: str) -> Path:
    return study.results_dir / f"{name}.json"


def row_command(study: Study, name: str) -> str:
    return f"chunkpolicy study run {shlex.quote(name)} --study {shlex.quote(str(study.path))}"


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the repository at ``cwd`` (the code that ran); None values outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def _machine() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"hostname": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "gpus": gpus, "cpu_count": os.cpu_count()}


# -- 1. data --------------------------------------------------------------------------------------------------------
def ensure_data(row: Row, log: Log = print) -> dict[str, Any]:
    """The episode store the row is evaluated on (:func:`ensure_source` of ``row.data``)."""
    return ensure_source(row.data, log)


def ensure_source(d: DataSource, log: Log = print) -> dict[str, Any]:
    """A data source's episode store, collected (or resumed) when it has a recipe; returns what the results record."""
    from chunkpolicy.data.store import EpisodeStore

    store = Path(d.store)
    marker = store.with_name(store.name + ".collect.json")
    info: dict[str, Any] = {"name": d.name, "env": d.env, "store": str(store), "collect": d.collect}
    if d.collect is not None and not marker.is_file():
        with _lock(store.with_name(store.name + ".lock"), f"data {d.name}", log):
            _collect(d, store, marker, log)
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(f"data.{d.name}.store: {store} is not an episode store")
    s = EpisodeStore.open(store)
    info.update(episodes=s.num_episodes, frames=s.num_frames, embodiment=s.spec.name, cameras=list(s.spec.cameras))
    if marker.is_file():
        m = read_json(marker)
        info["collect_s"] = m.get("collect_s")
        info["expert"] = {t: {k: v.get(k) for k in ("attempts", "successes", "kept")}
                          for t, v in (m.get("summary", {}).get("tasks") or {}).items()}
    return info


def _collect(d: DataSource, store: Path, marker: Path, log: Log) -> None:
    """Collect (or resume collecting) a data source's demos, under its lock; a finished collection (its marker) is
    kept: another process may have finished it while this one waited."""
    if marker.is_file():
        return
    from chunkpolicy.sim.collect import collect

    c = dict(d.collect)
    log(f"[data {d.name}] collecting {c['episodes']} demos/task of {d.env} into {store}"
        + (" (resuming)" if store.exists() else ""))
    t0 = time.perf_counter()
    summary = collect(d.env, _expand_tasks(d.env, d.tasks), c["episodes"], store, workers=int(c.get("workers", 2)),
                      seed=int(c.get("seed", 0)), image_size=tuple(c.get("image_size", (64, 64))),
                      cameras=c.get("cameras"), max_steps=c.get("max_steps"), resume=store.exists(),
                      env_kwargs=c.get("env_kwargs"), progress=False)
    if summary.get("interrupted") or summary.get("errors"):
        raise RuntimeError(f"[data {d.name}] collection into {store} did not finish (interrupted or errors: "
                           f"{summary.get('errors', [])[:3]}); run the row again to resume it")
    _write_json({"summary": summary, "collect_s": time.perf_counter() - t0}, marker)


# -- 2. training ----------------------------------------------------------------------------------------------------
def _gpus_of(device: str | None, processes: int = 1) -> int:
    return int(processes) if device and str(device).startswith("cuda") else 0


def _fit(cfg: Any, resume: bool, deadline: Deadline) -> dict[str, Any]:
    """:func:`chunkpolicy.training.experiment.run` with the session deadline: when it passes, the run ends at its
    next step with a checkpoint there (``stopped: stop_after`` in ``summary.json``) and a later session resumes."""
    from chunkpolicy.training.experiment import run

    return run(cfg, resume=resume, deadline_s=deadline.left())


def _weights_id(checkpoint: str | Path) -> list[Any]:
    """Which weights a checkpoint holds (path, size, mtime): a retrained checkpoint gets another id."""
    w = Path(checkpoint) / "model.safetensors"
    st = w.stat()
    return [str(w.resolve()), st.st_size, st.st_mtime_ns]


def _init_from_row(study: Study, row: Row, run_dir: Path, log: Log, deadline: Deadline) -> dict[str, Any]:
    """The final checkpoint of ``method.init_from_row`` (trained first when missing, e.g. on a fresh machine) and
    its training record; ``trained_now`` says this session trained it (its GPU time is then this row's too). A
    run of this row started from other weights (that source retrained since) is an error, never a silent mix."""
    src = study.rows[row.method["init_from_row"]]
    base = train_row(study, src, log, deadline)
    if not base["checkpoints"]:
        raise RuntimeError(f"[{row.name}] init_from_row {src.name}: its training left no checkpoint")
    ckpt = base["checkpoints"][-1][1]
    if base.get("stopped") == "max_minutes":
        log(f"[{row.name}] WARNING: init_from_row {src.name} stopped at its max_minutes cap after {base['steps']} "
            "steps, not at its step budget: this post-training starts from a shorter pretrain")
    marker = run_dir / "init_from.json"
    ident = _weights_id(ckpt)
    old = read_json(marker) if marker.is_file() else None
    if old is not None and old.get("weights") != ident:
        raise StudyError(f"rows.{row.name}: its run in {run_dir} started from other weights than {ckpt} (row "
                         f"{src.name} was retrained since); delete {run_dir} to post-train again")
    # this row trained its source in this session, or in an earlier one of this same run (a row can span sessions);
    # not when another process trained it while this one waited on its lock
    trained_now = bool(base["trained_this_session"]) or bool((old or {}).get("source_trained_for_this_row"))
    if old is None or bool(old.get("source_trained_for_this_row")) != trained_now:
        _write_json({"row": src.name, "checkpoint": ckpt, "weights": ident, "source_trained_for_this_row": trained_now},
                    marker)
    return {"row": src.name, "checkpoint": ckpt, "steps": base["steps"], "trained_now": trained_now,
            "stopped": base.get("stopped"),
            "gpu_minutes": base.get("gpu_minutes"), "wall_minutes": base.get("wall_minutes"),
            "final_train_loss": base.get("final_train_loss"), "datasets": base.get("datasets")}


def _train_chunkpolicy(study: Study, row: Row, run_dir: Path, stores: list[tuple[DataSource, Path, float]], log: Log,
                       deadline: Deadline) -> dict[str, Any]:
    from chunkpolicy.config import ConfigError, load_config
    from chunkpolicy.training.checkpoint import CheckpointManager

    m, t = row.method, row.train
    init = _init_from_row(study, row, run_dir, log, deadline) if m.get("init_from_row") else None
    datasets = ", ".join(f"{{path: {json.dumps(str(p))}, weight: {w}}}" for _, p, w in stores)
    ov = list(m.get("overrides", [])) + [f"data.datasets=[{datasets}]", f"train.output_dir={run_dir}"]
    if init is not None:
        ov.append(f"posttrain.init_from={init['checkpoint']}")
    for key in ("steps", "max_minutes", "ckpt_every", "keep_last"):
        if t.get(key) is not None:
            ov.append(f"train.{key}={t[key]}")
    if t.get("eval_checkpoints") == "all" and t.get("keep_last") is None:
        ov.append("train.keep_last=1000")  # every checkpoint is evaluated
    try:
        cfg = load_config(m["config"], ov)
    except ConfigError as e:
        raise StudyError(f"rows.{row.name}.method: {e}") from None
    with _lock(run_dir.parent / "train.lock", f"{row.name} training", log):
        summary_path = run_dir / "summary.json"
        latest = CheckpointManager(run_dir).latest()
        done, trained = None, False
        if summary_path.is_file() and latest is not None:
            s = read_json(summary_path)
            if int(s.get("steps", -1)) == int(latest.name.split("_")[-1]) and (
                    s.get("stopped") == "max_minutes" or int(s["steps"]) >= cfg.train.steps):
                done = s
        if done is None:
            deadline.check(f"training {row.name}", 90.0)  # start-up alone (build, compile, capture) takes about a minute
            log(f"[{row.name}] training {row.label} into {run_dir}" + (f" (resuming from {latest.name})" if latest else ""))
            done, trained = _fit(cfg, latest is not None, deadline), True
            if done.get("stopped") == "stop_after":
                raise SessionLimit(f"[{row.name}] training paused at step {done['steps']} (checkpoint {done['checkpoint']})")
    ckpts = [(step, str(p)) for step, p in CheckpointManager(run_dir).checkpoints()]
    minutes = float(done.get("total_time_s") or 0.0) / 60
    gpus = _gpus_of(done.get("device"), int(done.get("processes", 1)))
    return {"framework": "chunkpolicy", "run_dir": str(run_dir), "steps": int(done["steps"]),
            "stopped": done.get("stopped"), "max_minutes": done.get("max_minutes"),
            "train_minutes": float(done.get("train_time_s") or 0.0) / 60, "wall_minutes": minutes, "gpus": gpus,
            "gpu_minutes": minutes * gpus, "device": done.get("device"), "final_train_loss": done.get("final_train_loss"),
            "samples_per_s": done.get("samples_per_s"), "global_batch": done.get("global_batch"),
            "params": done.get("params"), "checkpoint": done.get("checkpoint"), "checkpoints": ckpts,
            "startup_s_last_session": done.get("startup"),
            "note": "minutes of the training loop over all sessions (compilation and graph capture included; process "
                    "start-up, data loading and model building of each session not included: startup_s_last_session)",
            "config": {"file": m["config"], "overrides": ov},
            "datasets": [{"name": d.name, "store": str(p), "weight": w} for d, p, w in stores],
            "mixture_probs": (done.get("data") or {}).get("mixture_probs"), "init_from": init,
            "trained_this_session": trained}


def train_row(study: Study, row: Row, log: Log = print, deadline: Deadline | None = None) -> dict[str, Any]:
    """Train the row's method (or resume / reuse its training); returns the training record (steps, minutes,
    checkpoints). A ``from_row`` row returns its source row's record with ``source_row`` set. Raises
    :class:`SessionLimit` when ``deadline`` passes first."""
    deadline = deadline or Deadline()
    if row.kind == "from_row":
        src = study.rows[row.method["from_row"]]
        return {**train_row(study, src, log, deadline), "source_row": src.name, "gpu_minutes_shared": True}
    run_dir = study.out_dir / "rows" / row.name / "train"
    if row.kind == "lerobot":
        from chunkpolicy.study.lerobot_train import train_lerobot

        store = Path(ensure_data(row, log)["store"])
        with _lock(run_dir.parent / "train.lock", f"{row.name} training", log):
            return train_lerobot(study, row, run_dir, store, log, deadline, lambda r: train_row(study, r, log, deadline))
    stores = [(d, Path(ensure_source(d, log)["store"]), w) for d, w in row.train_data]
    return _train_chunkpolicy(study, row, run_dir, stores, log, deadline)


# -- 3./4. evaluation and latency ----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def chunk_latency(kind: str, checkpoint: str, env: str, task: str, env_kwargs: dict[str, Any], *, device: str,
                  calls: int = 20, warmup: int = 3, num_steps: int | None = None) -> dict[str, Any]:
    """Milliseconds per chunk for one observation (batch 1) of ``task``: median and p90 of ``calls`` calls after
    ``warmup``, CUDA-synchronized (the whole user-facing call: observation → batch → chunk in robot units), in eager
    PyTorch. On a CUDA device, a chunkpolicy head that samples without host syncs is timed a second time replaying one
    CUDA graph per chunk (``cuda_graph``: the deployment path, :class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy`);
    for other heads ``cuda_graph`` says why there is no such figure."""
    import numpy as np
    import torch

    from chunkpolicy.sim.base import make_env

    def timed(fn: Any, obs: Any) -> tuple[dict[str, Any], Any]:
        times = []
        with torch.no_grad():
            for i in range(warmup + calls):
                _sync(device)
                t0 = time.perf_counter()
                chunk = fn([obs])
                _sync(device)
                if i >= warmup:
                    times.append(1000 * (time.perf_counter() - t0))
        return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}, chunk

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in env_kwargs.items()}
    e = make_env(env, task, **kw)
    try:
        obs = e.reset(0)
        graph: dict[str, Any] | None = None
        if kind == "lerobot":
            from chunkpolicy.evaluation.lerobot_policy import lerobot_predict_fn, load_lerobot_policy

            fn, hook = lerobot_predict_fn(load_lerobot_policy(checkpoint, device), [e.task_prompt])
            graph = {"skipped": "LeRobot policy (its own eager inference)"}
        else:
            from chunkpolicy.evaluation.rollout import check_embodiment, policy_predict_fn
            from chunkpolicy.models.policy import ChunkPolicy

            policy = ChunkPolicy.from_pretrained(checkpoint, map_location=device).to(device).eval()
            spec = check_embodiment(policy, env, kw)
            fn, hook = policy_predict_fn(policy, spec, [e.task_prompt], num_steps=num_steps)
            if not str(device).startswith("cuda"):
                graph = {"skipped": f"device {device}"}
            elif not policy.head.caps.sync_free_sample:
                graph = {"skipped": f"{type(policy.head).__name__}: sampling has host syncs"}
            else:
                gfn, ghook = policy_predict_fn(policy, spec, [e.task_prompt], num_steps=num_steps, cuda_graph=True)
                ghook(0, [obs])
                graph, _ = timed(gfn, obs)
        hook(0, [obs])
        res, chunk = timed(fn, obs)
        return {**res, "calls": calls, "batch": 1, "device": str(device), "chunk_len": int(chunk.shape[1]),
                "task": task, "mode": "eager", "cuda_graph": graph}
    finally:
        e.close()


def _eval_one(row: Row, kind: str, checkpoint: str, tasks: list[str], out: Path, device: str, log: Log,
              command: str, force: bool = False, episodes: int | None = None, deadline: Deadline | None = None,
              reserve_s: float = 0.0) -> dict[str, Any]:
    """Evaluate one checkpoint with the row's eval settings (``episodes`` per task instead of ``row.eval``'s when
    given); a finished evaluation of the same checkpoint and settings is reused. An evaluation that must run starts
    only with ``reserve_s`` seconds left before ``deadline`` (:class:`SessionLimit` otherwise)."""
    from chunkpolicy.evaluation.cli import run_eval

    ev = {**row.eval, "episodes": int(episodes or row.eval["episodes"])}
    res_path = out / "results.json"
    weights = Path(checkpoint) / "model.safetensors"
    st = weights.stat()
    ck_id = [str(weights.resolve()), st.st_size, st.st_mtime_ns]  # a retrained checkpoint is evaluated again
    key = {"executor": ev["executor"], "episodes": ev["episodes"], "seed": ev["seed"], "tasks": tasks,
           "max_steps": ev["max_steps"], "num_steps": ev["num_steps"], "checkpoint": ck_id}
    if res_path.is_file() and not force:
        old = read_json(res_path)
        if old.get("study_key") == key:
            log(f"[{row.name}] reusing the evaluation in {out}")
            return old
    if deadline is not None:
        deadline.check(f"evaluating {checkpoint}", reserve_s)
    log(f"[{row.name}] evaluating {checkpoint} ({ev['episodes']} episodes/task × {len(tasks)} tasks, {ev['executor']}"
        f", cuda_graph {ev['cuda_graph']})")
    t0 = time.perf_counter()
    res = run_eval(None if kind == "lerobot" else checkpoint, row.data.env, tasks, episodes=ev["episodes"],
                   executor=ev["executor"], num_envs=ev["num_envs"], workers=ev["workers"], seed=ev["seed"],
                   max_steps=ev["max_steps"], num_steps=ev["num_steps"], baseline=False, videos=ev["videos"],
                   device=device, out=out, progress=False, command=command,
                   lerobot_policy=checkpoint if kind == "lerobot" else None, cuda_graph=ev["cuda_graph"])
    res["study_key"] = key
    res["eval_wall_s"] = time.perf_counter() - t0
    _write_json(res, res_path)
    return res


def run_row(study: Study, name: str, *, force: bool = False, log: Log = print,
            session_minutes: float | None = None, eval_reserve_minutes: float = 0.0) -> dict[str, Any]:
    """Run (or finish) one row; returns its results dict (see the module docstring). With ``session_minutes`` the
    session stops (:class:`SessionLimit`) once that time is up: training at its next step with a checkpoint, LeRobot
    training at the cap (it continues from its last saved checkpoint), evaluation before the next checkpoint's
    evaluation, or already when fewer than ``eval_reserve_minutes`` are left for it (an evaluation cut off by a hard
    time limit would be redone from its start); rerunning the command continues. Rows may run in parallel processes:
    a row, a row's training and a data source's collection are each done by one process at a time, under a lock
    (``row.lock``, ``train.lock`` in ``out_dir/rows/<row>/``, ``<data>.zarr.lock``); another process that needs
    the same training or data waits, then reuses it."""
    deadline = Deadline(session_minutes)
    if name not in study.rows:
        raise StudyError(f"row {name!r} is not in {study.path}; rows: {sorted(study.rows)}")
    with _lock(study.out_dir / "rows" / name / "row.lock", name, log):
        return _run_row(study, name, force, log, deadline, eval_reserve_minutes)


def _run_row(study: Study, name: str, force: bool, log: Log, deadline: Deadline,
             eval_reserve_minutes: float) -> dict[str, Any]:
    import torch

    row = study.rows[name]
    out = row_result_path(study, name)
    if out.is_file() and not force:
        log(f"[{name}] done: {out} exists (--force to redo it)")
        return read_json(out)
    t_start = time.perf_counter()
    data = ensure_data(row, log)
    train = train_row(study, row, log, deadline)
    kind = "lerobot" if (row.kind == "lerobot" or train.get("framework") == "lerobot") else "chunkpolicy"
    init = {} if train.get("source_row") else (train.get("init_from") or {})
    tasks = _expand_tasks(row.data.env, row.data.tasks)
    device = row.eval["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpts = train["checkpoints"] if row.train.get("eval_checkpoints") == "all" else train["checkpoints"][-1:]
    if not ckpts:
        raise RuntimeError(f"[{name}] training left no checkpoint in {train['run_dir']}")
    command = row_command(study, name)
    evals = []
    for i, (step, ck) in enumerate(ckpts):
        label = f"step_{int(step):06d}"
        last = i == len(ckpts) - 1
        res = _eval_one(row, kind, ck, tasks, study.out_dir / "rows" / name / "eval" / label, device, log, command,
                        force, episodes=None if last else row.eval.get("curve_episodes"), deadline=deadline,
                        reserve_s=60.0 * eval_reserve_minutes)
        evals.append({"step": int(step), "checkpoint": ck, "results": str(study.out_dir / "rows" / name / "eval" / label
                                                                          / "results.json"),
                      "episodes_per_task": int(res["study_key"]["episodes"]),
                      "mean": res["summary"]["policy"]["mean"], "eval_wall_s": res.get("eval_wall_s")})
    final = res
    shared = gpu_shared_by()
    latency = chunk_latency(kind, ckpts[-1][1], row.data.env, tasks[0], final["env_kwargs"], device=device,
                            calls=int(row.eval["latency_calls"]), num_steps=row.eval["num_steps"])
    eval_min = sum(float(e["eval_wall_s"] or 0.0) for e in evals) / 60
    eval_gpus = 1 if device.startswith("cuda") else 0
    results = {
        "row": name, "group": row.group, "label": row.label, "kind": row.kind, "command": command,
        "study": {"name": study.name, "config": str(study.path)}, "row_config": row.raw,
        "git": git_info(Path(__file__).resolve().parents[2]), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "env": row.data.env, "tasks": tasks, "data": data,
        "train": train,
        "eval": {"executor": final["executor"], "episodes_per_task": row.eval["episodes"], "seed": row.eval["seed"],
                 "max_steps": row.eval["max_steps"], "device": device, "env_kwargs": final["env_kwargs"],
                 "results": evals[-1]["results"], "wall_minutes": eval_min, "gpu_minutes": eval_min * eval_gpus,
                 "lerobot_policy": final.get("lerobot_policy"), "cuda_graph": bool(final.get("cuda_graph"))},
        "success": final["summary"]["policy"],
        "episodes": final["episodes"]["policy"],  # per episode: task, seed, success, steps, return, chunks, ...
        "success_vs_steps": evals,
        "latency": latency,
        # a row's own training and evaluation, plus its init_from_row's training when this session had to redo it
        # rows run in parallel streams on one GPU (benchmarks/study_gpu.sh): minutes, samples/s and the latency were
        # measured while n row processes shared it; the study's total counts such a row's GPU-minutes / n
        "gpu_shared_by": shared,
        "gpu_minutes": (0.0 if train.get("source_row") else float(train.get("gpu_minutes") or 0.0)) + eval_min * eval_gpus
                       + (float(init.get("gpu_minutes") or 0.0) if init.get("trained_now") else 0.0),
        "row_wall_minutes_this_session": (time.perf_counter() - t_start) / 60,
    }
    _write_json(results, out)
    m = results["success"]["mean"]
    log(f"[{name}] {row.label} · {final['executor']}: mean success {100 * m['rate']:.0f}% "
        f"[{100 * m['ci95'][0]:.0f}, {100 * m['ci95'][1]:.0f}] over {m['n']} episodes; {train['steps']} steps; "
        f"chunk {latency['median_ms']:.1f} ms; wrote {out}")
    return results
