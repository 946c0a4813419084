"""Collect scripted-expert demonstrations into an :class:`~chunkpolicy.data.store.EpisodeStore`.

    python -m chunkpolicy.sim.collect --env metaworld --tasks push-v3,reach-v3 --episodes 50 --out demos.zarr

Episode ``j`` of every task uses seed ``seed + j`` (recorded per episode in the store), so a collection is
reproducible episode by episode whatever the worker scheduling. Workers are spawned processes, each keeping one
simulator per task; finished episodes are appended to the store in the main process as they arrive (each append is
crash-safe), so an interrupted collection keeps every episode it wrote, and ``resume=True`` skips the (task, seed)
pairs already in the store. The stored ``task`` string of an episode is the task's natural-language prompt.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chunkpolicy.sim.base import (
    SimEnv,
    env_check_task,
    env_has_expert,
    env_spec,
    env_task_prompt,
    make_env,
)
from chunkpolicy.success_rate import wilson_interval

__all__ = ["collect", "run_expert_episode", "format_summary", "main"]

_WORKER_ENVS: dict[tuple[str, str, str], SimEnv] = {}  # per process, insertion order = least recently used first
_MAX_CACHED_ENVS = 3  # a Meta-World env + renderer holds ~170 MB; MT50 must not keep 50 of them per worker


def run_expert_episode(env: SimEnv, seed: int) -> dict[str, Any]:
    """Roll out ``env``'s scripted expert from ``reset(seed)``.

    Returns ``{"episode": {"action" [T, A], "state" [T, S], "images" {cam: [T, h, w, 3]}, "task"}, "success",
    "steps", "seed", "task"}``; frame ``t`` holds the observation the expert saw and the action it took.
    """
    if not env.has_expert:
        raise ValueError(f"{type(env).__name__} ({env.task}) has no scripted expert")
    obs = env.reset(seed)
    actions, states, images = [], [], {c: [] for c in env.spec.cameras}
    done, success = False, False
    while not done:
        a = env.expert_action()
        actions.append(np.asarray(a, dtype=np.float32))
        states.append(obs["state"])
        for c in env.spec.cameras:
            images[c].append(obs["images"][c])
        obs, _, done, info = env.step(a)
        success = success or bool(info["success"])
    episode = {
        "action": np.stack(actions),
        "state": np.stack(states).astype(np.float32),
        "images": {c: np.stack(v) for c, v in images.items()},
        "task": env.task_prompt,
    }
    return {"episode": episode, "success": success, "steps": len(actions), "seed": int(seed), "task": env.task}


def _job(args: tuple[str, str, int, dict[str, Any], bool]) -> dict[str, Any]:
    """Worker entry point: one expert episode; never raises (errors come back as data)."""
    env_name, task, seed, env_kwargs, keep_failures = args
    t0 = time.perf_counter()
    try:
        key = (env_name, task, repr(sorted(env_kwargs.items())))
        env = _WORKER_ENVS.pop(key, None)
        if env is None:
            while len(_WORKER_ENVS) >= _MAX_CACHED_ENVS:  # least recently used first: jobs come task by task
                _WORKER_ENVS.pop(next(iter(_WORKER_ENVS))).close()
            env = make_env(env_name, task, **env_kwargs)
        _WORKER_ENVS[key] = env  # (re)insert as most recently used
        res = run_expert_episode(env, seed)
        if not (res["success"] or keep_failures):
            res["episode"] = None  # do not ship frames nobody keeps
    except Exception as e:  # noqa: BLE001 - reported per episode in the summary
        res = {"episode": None, "success": False, "steps": 0, "seed": int(seed), "task": task,
               "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"}
    res["wall_s"] = time.perf_counter() - t0
    return res


def _worker_init() -> None:
    # One software-GL thread per worker: workers already use every core, extra llvmpipe threads only contend.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _open_store(out: Path, spec: Any, fps: float, image_shapes: dict[str, tuple[int, int]], overwrite: bool,
                resume: bool) -> Any:
    from chunkpolicy.data.store import EpisodeStore

    if resume and out.exists():
        store = EpisodeStore.open(out, mode="a")
        if store.spec != spec:
            raise ValueError(f"resume: {out} holds embodiment {store.spec.to_dict()}, this collection needs "
                             f"{spec.to_dict()}")
        got = {c: store.image_shape(c) for c in store.cameras}
        if got != image_shapes:
            raise ValueError(f"resume: {out} has image shapes {got}, this collection renders {image_shapes}")
        return store
    if out.exists() and not overwrite:
        try:
            held = f"its {len(EpisodeStore.open(out))} episodes are kept"
        except (ValueError, KeyError, OSError):
            held = "what it holds is kept"
        raise FileExistsError(f"{out} already exists (e.g. from an interrupted collect): rerun with --resume to continue "
                              f"it ({held}; (task, seed) pairs already collected are skipped), or pick another --out")
    return EpisodeStore.create(out, spec, fps=fps, image_shapes=image_shapes, overwrite=overwrite)


def collect(
    env_name: str,
    tasks: Sequence[str],
    episodes_per_task: int,
    out: str | os.PathLike,
    *,
    workers: int = 2,
    seed: int = 0,
    keep_failures: bool = False,
    image_size: tuple[int, int] = (64, 64),
    cameras: Sequence[str] | None = None,
    max_steps: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    compute_stats: bool = True,
    progress: bool = True,
    verbose: bool = True,
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run scripted experts for ``tasks`` × ``episodes_per_task`` seeds and write the kept episodes to ``out``.

    Args:
        env_name: ``"metaworld"``, ``"fetch"`` or ``"aloha"`` (adapters with scripted experts).
        tasks: task names of that env (one embodiment, so they share one store).
        episodes_per_task: attempts per task (seeds ``seed .. seed + episodes_per_task - 1``).
        out: store path (``.zarr``); must not exist unless ``overwrite`` or ``resume``.
        workers: spawned worker processes; 0 runs everything in this process.
        keep_failures: also store episodes where the expert failed (default: successes only).
        image_size, cameras, max_steps, env_kwargs: adapter options.
        resume: append to an existing store, skipping (task, seed) pairs it already holds.
        compute_stats: save action/state normalization stats in the store at the end.

    Returns:
        summary dict: per-task ``attempts, successes, rate, ci95, kept, mean_steps``, totals, ``errors`` and
        ``interrupted``. A readable table is printed at the end (``verbose``).
    """
    if not tasks:
        raise ValueError("tasks: expected at least one task")
    if not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected a positive int, got {episodes_per_task!r}")
    if not env_has_expert(env_name):
        raise ValueError(f"env {env_name!r} has no scripted expert to collect demonstrations with")
    tasks = [env_check_task(env_name, t) for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: duplicates in {tasks}")
    kwargs: dict[str, Any] = dict(env_kwargs or {})
    kwargs["image_size"] = (int(image_size[0]), int(image_size[1]))
    if cameras is not None:
        kwargs["cameras"] = tuple(cameras)
    if max_steps is not None:
        kwargs["max_steps"] = int(max_steps)
    spec = env_spec(env_name, **kwargs)
    out = Path(out)
    store = _open_store(out, spec, spec.control_hz, {c: kwargs["image_size"] for c in spec.cameras}, overwrite, resume)

    done_pairs = {(store.episode_task(i), store.episode_seed(i)) for i in range(len(store))} if resume else set()
    jobs = [(env_name, t, seed + j, kwargs, keep_failures) for t in tasks for j in range(episodes_per_task)
            if (env_task_prompt(env_name, t), seed + j) not in done_pairs]
    skipped = len(tasks) * episodes_per_task - len(jobs)

    per_task = {t: {"attempts": 0, "successes": 0, "kept": 0, "steps": []} for t in tasks}
    errors: list[str] = []
    written = frames = 0
    interrupted = False
    t0 = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"collect {env_name}", unit="ep", disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        if workers and workers > 0 and len(jobs) > 1:
            pool = mp.get_context("spawn").Pool(processes=min(workers, len(jobs)), initializer=_worker_init)
            results = pool.imap_unordered(_job, jobs, chunksize=1)
        else:
            results = (_job(j) for j in jobs)
        for res in results:
            st = per_task[res["task"]]
            st["attempts"] += 1
            if "error" in res:
                errors.append(f"{res['task']} seed {res['seed']}: {res['error']}")
            else:
                st["successes"] += int(res["success"])
                st["steps"].append(res["steps"])
                # on resume, another `collect --resume` on this store may have written this (task, seed) meanwhile
                dedup = {"if_absent": True} if resume else {}
                if res["episode"] is not None and store.append_episode(res["episode"], seed=res["seed"], **dedup) is not None:
                    st["kept"] += 1
                    written += 1
                    frames += res["steps"]
            ok = sum(v["successes"] for v in per_task.values())
            att = sum(v["attempts"] for v in per_task.values())
            bar.set_postfix(success=f"{ok}/{att}", kept=written, errors=len(errors), refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if pool is None:  # in-process run: free the simulators it built
            for env in _WORKER_ENVS.values():
                env.close()
            _WORKER_ENVS.clear()
        if pool is not None:
            if interrupted:
                pool.terminate()
            else:
                pool.close()
            pool.join()

    if compute_stats and len(store) > 0 and not interrupted:
        store.compute_stats(save=True)
    summary = _summarize(env_name, out, per_task, written, frames, skipped, errors, interrupted,
                         time.perf_counter() - t0, len(store))
    if verbose:
        print(format_summary(summary), flush=True)
        for e in errors[:3]:
            print(f"error: {e}", flush=True)
    if interrupted:
        raise KeyboardInterrupt(f"collection interrupted; {written} episodes were written to {out}")
    return summary


def _summarize(env_name: str, out: Path, per_task: dict[str, dict[str, Any]], written: int, frames: int,
               skipped: int, errors: list[str], interrupted: bool, wall: float, store_len: int) -> dict[str, Any]:
    tasks = {}
    for t, v in per_task.items():
        n, s = v["attempts"], v["successes"]
        tasks[t] = {
            "attempts": n,
            "successes": s,
            "rate": s / n if n else None,
            "ci95": list(wilson_interval(s, n)) if n else None,
            "kept": v["kept"],
            "mean_steps": float(np.mean(v["steps"])) if v["steps"] else None,
        }
    n = sum(v["attempts"] for v in tasks.values())
    s = sum(v["successes"] for v in tasks.values())
    return {
        "env": env_name,
        "out": str(out),
        "tasks": tasks,
        "attempts": n,
        "successes": s,
        "rate": s / n if n else None,
        "episodes_written": written,
        "frames_written": frames,
        "episodes_in_store": store_len,
        "skipped_existing": skipped,
        "errors": errors,
        "interrupted": interrupted,
        "wall_s": wall,
        "episodes_per_s": n / wall if wall > 0 else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width text table."""
    rows = [("task", "success", "rate", "95% CI", "kept", "mean steps")]
    for t, v in summary["tasks"].items():
        if v["attempts"]:
            ci = f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
            rows.append((t, f"{v['successes']}/{v['attempts']}", f"{v['rate']:.0%}", ci, str(v["kept"]),
                         f"{v['mean_steps']:.1f}" if v["mean_steps"] is not None else "-"))
        else:
            rows.append((t, "0/0", "-", "-", str(v["kept"]), "-"))
    if summary["attempts"]:
        rows.append(("ALL", f"{summary['successes']}/{summary['attempts']}", f"{summary['rate']:.0%}", "",
                     str(summary["episodes_written"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "-" * len(line(rows[0]))
    text = [line(rows[0]), sep] + [line(r) for r in rows[1:-1]] + ([sep, line(rows[-1])] if summary["attempts"] else [])
    tail = (f"{summary['episodes_written']} episodes / {summary['frames_written']} frames written to {summary['out']} "
            f"({summary['episodes_in_store']} in store) in {summary['wall_s']:.1f}s")
    if summary["skipped_existing"]:
        tail += f"; {summary['skipped_existing']} (task, seed) pairs already there were skipped"
    if summary["errors"]:
        tail += f"; {len(summary['errors'])} episodes raised errors"
    if summary["interrupted"]:
        tail += "; INTERRUPTED (what was written is kept; rerun with --resume to continue)"
    return "\n".join(text + [tail])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m chunkpolicy.sim.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", required=True, help="metaworld | fetch | aloha")
    p.add_argument("--tasks", required=True, help="comma-separated task names (metaworld: 'MT10' or 'MT50' allowed)")
    p.add_argument("--episodes", type=int, required=True, help="attempts per task")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--cameras", default=None, help="comma-separated camera names")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--keep-failures", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    tasks = a.tasks.split(",")
    if a.env == "metaworld" and len(tasks) == 1 and tasks[0].upper() in ("MT10", "MT50"):
        from chunkpolicy.sim import metaworld_env

        tasks = list(getattr(metaworld_env, tasks[0].upper()))
    return collect(a.env, tasks, a.episodes, a.out, workers=a.workers, seed=a.seed, keep_failures=a.keep_failures,
                   image_size=tuple(a.image_size), cameras=a.cameras.split(",") if a.cameras else None,
                   max_steps=a.max_steps, overwrite=a.overwrite, resume=a.resume)


if __name__ == "__main__":
    main()
