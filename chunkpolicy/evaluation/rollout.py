"""Closed-loop evaluation: roll a policy (or a do-nothing baseline) out in a simulator with a chunk executor.

The pieces, each usable on its own:

* :func:`check_embodiment` — the env's embodiment must be one the policy was trained on, with the same action/state
  names and cameras, rendering frames of the size the training data had (``trained_on`` in the checkpoint's
  ``config.json``, when training recorded it); otherwise a ``ValueError`` that says what differs.
* :func:`policy_predict_fn` — ``predict_fn(list of B env obs, **executor_kwargs) -> [B, H, A]`` (robot units) for the
  executors of :mod:`chunkpolicy.runtime`; keeps the observation history when the policy uses ``T_obs > 1``.
  **Invalid chunks.** A head that may fail (``policy.head.caps.may_fail``, e.g. ``tokens``: an invalid token decode)
  returns NaN on the valid dims of a sample it could not produce and flags it in ``policy.head.last_valid``. Such a
  sample gets the env's do-nothing chunk instead (the robot keeps still for that chunk: absolute dims hold the current
  state, relative dims are 0), and it is counted: episode records carry ``chunks`` (policy chunks requested while the
  episode ran) and ``invalid_chunks``, and the report gives the invalid-decode rate per task and overall. A NaN from a
  head that cannot fail is not replaced: the executor raises on it (a bug, never hidden).
* :func:`do_nothing_predict_fn` — the baseline: zero motion for relative action dims, hold the current state for
  action dims that have a same-named state dim (position targets).
* :func:`run_batch` — one lockstep batch of episodes of one task (the unit of work, in this or a worker process).
* :func:`evaluate` — per task, ``episodes`` rollouts in lockstep batches of ``num_envs`` envs (seeds
  ``seed + episode index``, disjoint from the collection seeds by default), optionally spread over worker processes,
  with a progress bar; returns per-episode records and the camera frames of the first ``video_episodes`` episodes of
  each task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from chunkpolicy import batch as K
from chunkpolicy.evaluation.predictors import do_nothing_predict_fn, observation_history, replace_invalid
from chunkpolicy.runtime import rtc as _rtc  # rtc_predict_fn: the guided sampler behind the "rtc" executor
from chunkpolicy.runtime.executors import make_executor
from chunkpolicy.sim.base import EnvPool, Obs, env_check_task, env_spec, make_env, obs_to_batch
from chunkpolicy.spaces import EmbodimentSpec

__all__ = ["Method", "check_embodiment", "check_cuda_graph", "policy_predict_fn", "do_nothing_predict_fn", "run_batch", "evaluate", "frame_of",
           "EVAL_SEED"]

EVAL_SEED = 100_000  # far above the seeds `collect` uses (0, 1, ...): evaluation scenes are held out by default


def check_embodiment(policy: Any, env_name: str, env_kwargs: dict[str, Any] | None = None) -> EmbodimentSpec:
    """The policy's spec for ``env_name``'s embodiment; a ``ValueError`` naming the mismatch if it has none.

    Cameras default to the ones the policy was trained with (``env_kwargs["cameras"]`` may override them, but must
    then match too)."""
    probe = env_spec(env_name, **{k: v for k, v in (env_kwargs or {}).items() if k == "cameras"})
    known = [e.name for e in policy.space.embodiments]
    if probe.name not in known:
        raise ValueError(f"embodiment: env {env_name!r} is embodiment {probe.name!r}, but the policy was trained on "
                         f"{known}; evaluate it on an env of one of those embodiments")
    spec = policy.space.spec(policy.space.id_of(probe.name))
    for field in ("action_names", "state_names"):
        if tuple(getattr(spec, field)) != tuple(getattr(probe, field)):
            raise ValueError(f"embodiment {probe.name!r}: {field} differ between the policy {list(getattr(spec, field))} "
                             f"and env {env_name!r} {list(getattr(probe, field))}")
    if env_kwargs and "cameras" in env_kwargs and tuple(env_kwargs["cameras"]) != tuple(spec.cameras):
        raise ValueError(f"cameras: the policy was trained on {list(spec.cameras)}, asked for {list(env_kwargs['cameras'])}")
    trained = getattr(policy, "trained_on", None) or {}
    cams = (trained.get("cameras") or {}).get(spec.name)
    if cams is not None and list(cams) != list(spec.cameras):
        raise ValueError(f"cameras: the policy was trained on cameras {list(cams)} of {spec.name!r} (trained_on.cameras in "
                         f"the checkpoint's config.json), but evaluation would feed {list(spec.cameras)} (space.json)")
    hw = trained.get("image_size")
    if hw is not None and env_kwargs and "image_size" in env_kwargs and tuple(env_kwargs["image_size"]) != tuple(hw):
        h, w = env_kwargs["image_size"]
        raise ValueError(f"image_size: env {env_name!r} would render {h}x{w} frames, but the policy was trained on "
                         f"{hw[0]}x{hw[1]} images (trained_on.image_size in the checkpoint's config.json); pass "
                         f"--image-size {hw[0]} {hw[1]}, or leave --image-size out to use the checkpoint's")
    return spec


def _history_batch(history: Sequence[list[Obs]], policy: Any, spec: EmbodimentSpec, prompts: list[str]) -> dict:
    """Stack ``T`` per-tick observation lists (oldest first) into one batch with ``T_obs = T``, on the host: the
    policy checks it there and copies it to its device itself (checks of device tensors would wait for the GPU)."""
    parts = [obs_to_batch(obs, policy.space, spec, prompts) for obs in history]
    batch = dict(parts[-1])
    if len(parts) > 1:
        batch[K.IMAGES] = torch.cat([p[K.IMAGES] for p in parts], dim=2)  # [B, N, T, 3, h, w]
        batch[K.STATE] = torch.cat([p[K.STATE] for p in parts], dim=1)  # [B, T, D]
    return batch


def check_cuda_graph(policy: Any, device: Any = None) -> None:
    """Raise unless ``policy`` (on ``device``, default its own) can run chunks as CUDA graphs: a CUDA device and a head
    whose sampling has no host syncs (``flow_expert``, ``dit`` with ``objective=flow``)."""
    dev = torch.device(device) if device is not None else policy.device
    if dev.type != "cuda" or not policy.head.caps.sync_free_sample:
        raise ValueError(f"cuda_graph: needs a policy on a CUDA device with a sync-free sampler (flow_expert, or dit "
                         f"with objective=flow); this one is a {type(policy.head).__name__} head on {dev}")


def policy_predict_fn(policy: Any, spec: EmbodimentSpec, prompts: list[str], *, num_steps: int | None = None,
                      seed: int = 0, rtc: bool = False, on_chunk: Callable[[np.ndarray], None] | None = None,
                      cuda_graph: bool = False, graph_cache: dict | None = None,
                      ) -> tuple[Callable[..., torch.Tensor], Callable[[int, list[Obs]], None]]:
    """``(predict_fn, on_step)`` for :meth:`EnvPool.rollout`.

    ``on_step`` records every tick's observations (needed for ``T_obs > 1``: the policy sees the last ``T_obs`` ticks,
    the first one repeated at the episode start). ``predict_fn(obs, prefix=None, prefix_len=0)`` returns
    ``[B, H, A]`` in robot units; ``prefix``/``prefix_len`` are used by the ``rtc`` executor (flow heads only).
    When the head may fail, a sample it could not produce (NaN, or ``head.last_valid`` False) gets the do-nothing
    chunk of its env (see the module docstring); ``on_chunk(invalid)`` then receives the ``[B]`` bool mask of the
    replaced samples after every prediction.

    ``cuda_graph=True`` replays each chunk as one CUDA graph (:class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy`,
    captured on first use for each batch shape; with ``rtc``, the guided sampler's graphs): a policy on a CUDA device
    whose head samples without host syncs; anything else is refused rather than run eagerly behind the caller's back.
    ``graph_cache``: a dict that keeps the captured graphs across predict functions of the same policy (the batches
    of an evaluation), else they live as long as this function."""
    T = int(policy.config.n_obs_steps)
    history, on_step = observation_history(T)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    may_fail = bool(policy.head.caps.may_fail)
    graphs: dict[Any, Any] = graph_cache if graph_cache is not None else {}  # (steps, batch shapes) -> graph
    if cuda_graph:
        check_cuda_graph(policy)
        from chunkpolicy.runtime.graphs import CudaGraphPolicy, shape_key
        emb_id = policy.space.id_of(spec.name)
    guided = (_rtc.rtc_predict_fn(policy, num_steps=num_steps, generator=gen, cuda_graph=cuda_graph, graph_cache=graphs)
              if rtc else None)

    def graphed(batch: dict) -> torch.Tensor:
        key = (num_steps, shape_key(batch))
        if key not in graphs:
            graphs[key] = CudaGraphPolicy(policy, batch, num_steps=num_steps)
        return policy.space.unpad(graphs[key](batch, generator=gen), emb_id, "action")

    @torch.no_grad()
    def predict(obs: list[Obs], prefix: Any = None, prefix_len: int = 0) -> torch.Tensor:
        if not history:  # called without on_step: single-frame history
            on_step(0, obs)
        batch = _history_batch(list(history), policy, spec, prompts)
        if guided is not None:
            chunk = guided(batch, prefix=prefix, prefix_len=prefix_len)
        elif cuda_graph:
            chunk = graphed(batch)
        else:
            chunk = policy.predict_chunk(batch, spec.name, num_steps=num_steps, generator=gen)
        if not may_fail:
            return chunk  # a NaN here is a bug: the executor raises on it
        return replace_invalid(chunk, policy.head.last_valid, obs, spec, on_chunk)

    return predict, on_step


def frame_of(obs: Obs, cameras: Sequence[str], scale: int = 4) -> np.ndarray:
    """One video frame ``uint8 [h*scale, N*w*scale, 3]``: the cameras side by side, upscaled (nearest) for viewing."""
    row = np.concatenate([obs["images"][c] for c in cameras], axis=1)
    return row.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else row


@dataclass(frozen=True)
class Method:
    """What to evaluate, in a form worker processes can rebuild: a checkpoint, or the do-nothing baseline."""

    name: str  # label in the report ("policy", "do-nothing", ...)
    checkpoint: str | None = None  # None: do-nothing
    horizon: int = 50  # do-nothing chunk length
    num_steps: int | None = None
    rtc: bool = False
    device: str = "cpu"
    kind: str = "chunkpolicy"  # "chunkpolicy" | "lerobot" (a LeRobot policy dir: evaluation/lerobot_policy.py)
    #                            | "server" (checkpoint is a ws:// URI of `chunkpolicy serve`: evaluation/served.py)
    cuda_graph: bool = False  # chunkpolicy kind: chunks replayed as CUDA graphs, captured once per worker process


_POLICIES: dict[tuple[str, str], Any] = {}  # per process: checkpoint → loaded policy
_ENVS: dict[tuple[str, str, str], list[Any]] = {}  # per process: (env, task, options) → built envs, reused
_GRAPHS: dict[tuple[str, str], dict] = {}  # per process: (checkpoint, device) → its captured CUDA graphs


def _load_policy(checkpoint: str, device: str) -> Any:
    key = (checkpoint, device)
    if key not in _POLICIES:
        from chunkpolicy.models.policy import ChunkPolicy

        _POLICIES[key] = ChunkPolicy.from_pretrained(checkpoint, map_location=device).to(device).eval()
    return _POLICIES[key]


def _envs(env_name: str, task: str, n: int, env_kwargs: dict[str, Any]) -> list[Any]:
    key = (env_name, task, repr(sorted(env_kwargs.items())))
    envs = _ENVS.setdefault(key, [])
    while len(envs) < n:
        envs.append(make_env(env_name, task, **env_kwargs))
    return envs[:n]


def run_batch(method: Method, env_name: str, task: str, seeds: Sequence[int], executor: str,
              env_kwargs: dict[str, Any], n_video: int = 0) -> tuple[list[dict[str, Any]], list[list[np.ndarray]]]:
    """One lockstep batch: ``len(seeds)`` episodes of ``task``. Returns the episode records and the frames of the
    first ``n_video`` envs. The policy's noise generator is seeded with ``seeds[0]``, so a batch gives the same result
    wherever (and in whichever worker) it runs."""
    pool = EnvPool(_envs(env_name, task, len(seeds), env_kwargs))
    chunks, invalid = np.zeros(len(seeds), np.int64), np.zeros(len(seeds), np.int64)  # per env, while it runs

    def on_chunk(bad: np.ndarray) -> None:
        invalid[:] += bad & ~pool.dones

    T: int | None = 1  # ticks of observations a prediction reads; None: every tick (a per-tick hook reads them all)
    if method.checkpoint is None:
        policy_fn, hook = do_nothing_predict_fn(pool.spec, method.horizon), None
    elif method.kind == "lerobot":
        from chunkpolicy.evaluation.lerobot_policy import lerobot_predict_fn, load_lerobot_policy

        policy_fn, hook = lerobot_predict_fn(load_lerobot_policy(method.checkpoint, method.device), pool.prompts,
                                             seed=int(seeds[0]))
        T = None
    elif method.kind == "server":
        from chunkpolicy.evaluation.served import served_predict_fn

        policy_fn, hook, client = served_predict_fn(method.checkpoint, pool.spec, pool.prompts, seed=int(seeds[0]),
                                                    rtc=method.rtc, on_chunk=on_chunk)
        T = None
    else:
        policy = _load_policy(method.checkpoint, method.device)
        cache = _GRAPHS.setdefault((method.checkpoint, method.device), {}) if method.cuda_graph else None
        policy_fn, hook = policy_predict_fn(policy, pool.spec, pool.prompts, num_steps=method.num_steps,
                                            seed=int(seeds[0]), rtc=method.rtc, on_chunk=on_chunk,
                                            cuda_graph=method.cuda_graph, graph_cache=cache)
        T = int(policy.config.n_obs_steps)

    def predict_fn(obs: list[Obs], **kw: Any) -> Any:
        chunks[:] += ~pool.dones  # an env that is done no longer asks for chunks
        return policy_fn(obs, **kw)
    frames: list[list[np.ndarray]] = [[] for _ in range(min(n_video, len(seeds)))]
    cams = pool.spec.cameras

    def on_step(t: int, obs: list[Obs]) -> None:
        if hook is not None:
            hook(t, obs)
        for i, f in enumerate(frames):
            if t == 0 or not pool.dones[i]:
                f.append(frame_of(obs[i], cams))

    ex = make_executor(executor)
    video = np.arange(len(seeds)) < len(frames)

    def frames_needed(t: int) -> np.ndarray:
        # rendering costs several times the physics step: frames only where a prediction or the video reads them
        read = T is None or any(ex.will_predict(t + j) for j in range(T))
        return video | read

    try:
        records = pool.rollout(predict_fn, ex, seeds, on_step=on_step, frames=frames_needed)
    finally:
        if method.kind == "server":
            client.close()
    for r, c, n in zip(records, chunks, invalid):
        r.update(predictions=ex.num_predictions, chunks=int(c), invalid_chunks=int(n))
    return records, frames


def _job(args: tuple) -> tuple[int, list[dict[str, Any]], list[list[np.ndarray]], float]:
    idx, *rest = args
    t0 = time.perf_counter()
    records, frames = run_batch(*rest)
    return idx, records, frames, time.perf_counter() - t0


def _worker_init() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # one core per worker: workers, not threads, are the parallelism here


def evaluate(
    methods: Method | Sequence[Method],
    env_name: str,
    tasks: Sequence[str],
    episodes: int,
    executor: str,
    *,
    num_envs: int = 4,
    workers: int = 0,
    seed: int = EVAL_SEED,
    video_episodes: int = 1,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Roll out ``episodes`` episodes per task for every method, on the same seeds.

    Episodes ``seed + k`` (k = 0 .. episodes-1) run in lockstep batches of ``num_envs``; ``workers > 0`` spreads the
    batches of all methods over one pool of that many spawned processes (one torch thread each). Results do not depend
    on ``workers``. Returns ``{method name: {"episodes": [...], "videos": {task: [frames]}, "wall_s"}}`` with episode
    records ``task, seed, success, steps, return, predictions, chunks, invalid_chunks`` (``chunks``: the chunks
    requested while that episode ran; ``invalid_chunks``: those the head could not produce, replaced by do-nothing
    chunks); ``wall_s`` is the sum of the method's batch times.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    methods = [methods] if isinstance(methods, Method) else list(methods)
    if episodes < 1 or num_envs < 1 or workers < 0:
        raise ValueError(f"need episodes >= 1, num_envs >= 1, workers >= 0; got {episodes}, {num_envs}, {workers}")
    if not methods or len({m.name for m in methods}) != len(methods):
        raise ValueError(f"methods: expected at least one, with distinct names; got {[m.name for m in methods]}")
    tasks = [env_check_task(env_name, t) for t in tasks]
    make_executor(executor)  # a bad spec fails before any simulator starts
    env_kwargs = dict(env_kwargs or {})
    jobs = []
    for m in methods:
        for task in tasks:
            for start in range(0, episodes, num_envs):
                seeds = [seed + k for k in range(start, min(episodes, start + num_envs))]
                jobs.append((len(jobs), m, env_name, task, seeds, executor, env_kwargs, max(0, video_episodes - start)))
    out: list[Any] = [None] * len(jobs)
    ok = {m.name: [0, 0] for m in methods}
    bar = tqdm(total=len(methods) * episodes * len(tasks), desc=f"eval {', '.join(ok)}", unit="ep",
               disable=not progress, dynamic_ncols=True)
    pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_worker_init) if workers else None
    try:
        results = pool.imap_unordered(_job, jobs) if pool is not None else map(_job, jobs)
        for idx, records, frames, wall in results:
            out[idx] = (records, frames, wall)
            tally = ok[jobs[idx][1].name]
            tally[0] += sum(r["success"] for r in records)
            tally[1] += len(records)
            bar.set_postfix_str(" ".join(f"{k} {s}/{n}" for k, (s, n) in ok.items()), refresh=False)
            bar.update(len(records))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        else:  # in-process run: free the simulators it built
            for envs in _ENVS.values():
                for e in envs:
                    e.close()
            _ENVS.clear()
            _GRAPHS.clear()  # their memory pools and weight snapshots
    res: dict[str, dict[str, Any]] = {m.name: {"episodes": [], "videos": {}, "wall_s": 0.0} for m in methods}
    for job, (records, frames, wall) in zip(jobs, out):
        r = res[job[1].name]
        r["episodes"] += records
        r["videos"].setdefault(job[3], []).extend(frames)
        r["wall_s"] += wall
    return res
