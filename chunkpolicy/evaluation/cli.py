"""``chunkpolicy eval`` / ``python eval.py``: closed-loop success of a checkpoint in a simulator.

    python eval.py --checkpoint runs/tiny_flow --env metaworld --tasks push-v3,reach-v3 --episodes 20 \\
        --executor temporal_ensemble:0.01 --baseline --out runs/eval

``--checkpoint`` takes a checkpoint directory (training writes ``OUTPUT_DIR/checkpoints/step_XXXXXX``) or a run
directory ``OUTPUT_DIR`` (its latest checkpoint is used). The env renders frames of the size the training data had
(recorded in the checkpoint); an ``--image-size`` that differs is an error before any rollout.

Writes into ``--out``: ``results.json`` (per-task success with 95% Wilson intervals and the mean, every episode, the
command), ``results.md`` (the table), ``success.png`` (bar chart) and ``videos/<method>_<task>_<k>.mp4``.
``--baseline`` also evaluates a do-nothing policy on the same seeds, so the table shows what the policy adds. The
do-nothing policy rarely succeeds, so it runs nearly every episode to the step limit (about as long as the policy's
rollouts); its episodes are cached per (env, tasks, seeds, episode limit, executor, horizon, env options) under
``$CHUNKPOLICY_CACHE_DIR`` (default ``~/.cache/chunkpolicy``)``/baseline/`` and reused (no baseline videos then);
``--no-baseline-cache`` recomputes. The output states what the baseline cost (or that it came from the cache).
``results.json`` and ``results.md`` are written before the plot and the videos: a plot or video that fails to encode
is a warning (in the output and ``results.json["warnings"]``), and an evaluation killed while writing videos keeps
its results.
A checkpoint whose head may fail to produce a chunk (``tokens``: an invalid token decode) runs the do-nothing chunk
instead for that chunk; the report gives the invalid-decode rate per task and overall (also when it is 0).
``--server ws://HOST:PORT`` evaluates the policy a ``chunkpolicy serve`` serves, through the websocket protocol (API
key from ``$CHUNKPOLICY_API_KEY``); the noise is drawn here as in process, so it reproduces ``--checkpoint`` runs of
the same checkpoint on the same seeds.
``--lerobot-policy DIR`` evaluates a LeRobot policy checkpoint (diffusion, ACT, ...) instead, through
:mod:`chunkpolicy.evaluation.lerobot_policy`; ``--executor native`` then runs LeRobot's own action queue.
Executors: ``open_loop:K`` (run K actions, re-plan), ``temporal_ensemble:M`` (ACT, w_i = exp(-M·i), i = 0 the
oldest prediction), ``rtc:S,D`` (real-time chunking, flow heads).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_XXXXXX, or any save_pretrained "
                   "directory) or a training run directory OUTPUT_DIR (its latest checkpoint), e.g. runs/NAME")
    p.add_argument("--lerobot-policy", default=None, metavar="DIR",
                   help="a LeRobot policy instead of --checkpoint: its save_pretrained dir (with the pre/post-processors), "
                   "a LeRobot checkpoint (OUTPUT_DIR/checkpoints/STEP) or training run (OUTPUT_DIR); see "
                   "chunkpolicy/evaluation/lerobot_policy.py. --executor native = LeRobot's own select_action queue")
    p.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                   help="evaluate the policy served there (chunkpolicy serve) instead of --checkpoint")
    p.add_argument("--env", required=True, help="metaworld | fetch | pusht | aloha")
    p.add_argument("--tasks", required=True, help="comma-separated task names (metaworld: MT10 / MT50 allowed)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--executor", default="open_loop:8", help="open_loop:K | temporal_ensemble:M | rtc:S,D (default open_loop:8); with "
                   "--lerobot-policy also native (LeRobot's own action queue of that checkpoint)")
    p.add_argument("--num-envs", type=int, default=4, help="envs stepped in lockstep per batch (default 4)")
    p.add_argument("--workers", type=int, default=0, help="worker processes for rollouts (0: this process)")
    p.add_argument("--seed", type=int, default=None, help="first episode seed (default 100000: held out from collection)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size the env renders (default: the checkpoint's training image size; 64 64 without a "
                   "checkpoint); a size other than the training data's is an error")
    p.add_argument("--max-steps", type=int, default=None, help="episode limit (default: the env's)")
    p.add_argument("--num-steps", type=int, default=None, help="denoising / integration steps (default: the head's)")
    p.add_argument("--baseline", action="store_true", help="also evaluate a do-nothing policy on the same seeds")
    p.add_argument("--baseline-only", action="store_true", help="evaluate only the do-nothing policy (no checkpoint)")
    p.add_argument("--no-baseline-cache", action="store_true",
                   help="recompute the do-nothing baseline instead of reusing cached episodes")
    p.add_argument("--videos", type=int, default=1, help="episodes per task and method saved as MP4 (default 1)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each chunk as one CUDA graph (flow_expert / dit-flow checkpoints on a CUDA device; "
                        "captured once per worker; the same chunks as eager, fewer kernel launches)")
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument("--no-progress", action="store_true")
    return p


BASELINE_CACHE_VERSION = 1  # bump when the do-nothing policy, the executors or the simulators change behaviour


def _baseline_key(env: str, tasks: Sequence[str], seed: int, episodes: int, executor: str, horizon: int,
                  env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the do-nothing episodes depend on (not the cameras or the image size: the baseline never looks)."""
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(env_kwargs.items())
            if k not in ("cameras", "image_size")}
    return {"version": BASELINE_CACHE_VERSION, "env": env, "tasks": list(tasks), "seed": int(seed),
            "episodes": int(episodes), "executor": executor, "horizon": int(horizon), "env_options": opts}


def baseline_cache_dir() -> Path:
    return Path(os.environ.get("CHUNKPOLICY_CACHE_DIR") or Path.home() / ".cache" / "chunkpolicy") / "baseline"


def baseline_cache_path(env: str, tasks: Sequence[str], seed: int, episodes: int, executor: str, horizon: int,
                        env_kwargs: dict[str, Any]) -> Path:
    import hashlib
    import json

    key = json.dumps(_baseline_key(env, tasks, seed, episodes, executor, horizon, env_kwargs), sort_keys=True)
    return baseline_cache_dir() / f"{env}_{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _read_baseline_cache(path: Path) -> dict[str, Any] | None:
    import json

    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc.get("episodes"), list) and "wall_s" in doc else None
    except (OSError, ValueError, AttributeError):
        return None  # missing or unreadable: recompute


def _tasks(env: str, arg: str) -> list[str]:
    tasks = [t.strip() for t in arg.split(",") if t.strip()]
    if env == "metaworld" and len(tasks) == 1 and tasks[0].upper() in ("MT10", "MT50"):
        from chunkpolicy.sim import metaworld_env

        return list(getattr(metaworld_env, tasks[0].upper()))
    return tasks


def resolve_cuda_graph(setting: bool | str, caps: Any, device: str) -> bool:
    """``cuda_graph`` as given when True / False; ``"auto"``: True for a head that samples without host syncs
    (``caps.sync_free_sample``) on a CUDA device."""
    if setting != "auto":
        return bool(setting)
    return str(device).startswith("cuda") and bool(caps.sync_free_sample)


def run_eval(
    checkpoint: str | os.PathLike | None,
    env: str,
    tasks: Sequence[str],
    *,
    episodes: int = 10,
    executor: str = "open_loop:8",
    num_envs: int = 4,
    workers: int = 0,
    seed: int | None = None,
    image_size: tuple[int, int] | None = None,
    max_steps: int | None = None,
    num_steps: int | None = None,
    baseline: bool = False,
    videos: int = 1,
    device: str | None = None,
    out: str | os.PathLike = "runs/eval",
    progress: bool = True,
    command: str | None = None,
    baseline_cache: bool = True,
    lerobot_policy: str | os.PathLike | None = None,
    server: str | None = None,
    cuda_graph: bool | str = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (and/or the do-nothing baseline) and write the report; returns the results dict.

    ``checkpoint=None`` evaluates the baseline only; a run directory is resolved to its latest checkpoint. Raises
    ``ValueError`` before any rollout if the env's embodiment is not one the policy was trained on, or ``image_size``
    (default: the checkpoint's training image size) differs from the training data's. ``cuda_graph``: a chunkpolicy
    checkpoint's chunks are replayed as CUDA graphs (captured once per worker process; a CUDA device and a head that
    samples without host syncs, else an error before any rollout); the same chunks as eager for the same noise.
    ``"auto"``: graphs where they can run (:func:`resolve_cuda_graph`); ``results["cuda_graph"]`` says what ran."""
    import torch

    from chunkpolicy.evaluation.report import bar_chart, invalid_counts, markdown_table, summarize, write_json_atomic
    from chunkpolicy.evaluation.rollout import EVAL_SEED, Method, check_cuda_graph, check_embodiment, evaluate
    from chunkpolicy.evaluation.video import write_mp4
    from chunkpolicy.runtime.executors import check_executor, make_executor
    from chunkpolicy.sim.base import env_check_task, env_spec, setup_headless_gl

    setup_headless_gl()
    if checkpoint is not None and lerobot_policy is not None:
        raise ValueError("checkpoint: give --checkpoint or --lerobot-policy, not both")
    if server is not None and (checkpoint is not None or lerobot_policy is not None):
        raise ValueError("server: give --server or --checkpoint / --lerobot-policy, not both")
    if cuda_graph not in (True, False, "auto"):
        raise ValueError(f"cuda_graph: expected true, false or 'auto', got {cuda_graph!r}")
    if cuda_graph is True and checkpoint is None:
        raise ValueError("cuda_graph: only for a chunkpolicy --checkpoint (a LeRobot policy or a server runs its own "
                         "inference)")
    if checkpoint is None:
        cuda_graph = False  # "auto": nothing of ours to graph
    if checkpoint is None and lerobot_policy is None and server is None and not baseline:
        raise ValueError("checkpoint: give --checkpoint (or --lerobot-policy), or --baseline-only to evaluate the "
                         "do-nothing baseline")
    tasks = [env_check_task(env, t) for t in tasks]  # unknown env or task: an error before anything starts
    if not tasks:
        raise ValueError("tasks: expected at least one task")
    seed = EVAL_SEED if seed is None else int(seed)
    out = Path(out)
    if checkpoint is not None:
        from chunkpolicy.config import resolve_checkpoint

        ck = resolve_checkpoint(checkpoint)
        if ck is None:
            raise FileNotFoundError(f"{checkpoint}: not a chunkpolicy checkpoint (no config.json + model.safetensors) nor "
                                    "a run directory with checkpoints/step_* in it")
        checkpoint = ck
    env_kwargs: dict[str, Any] = {"image_size": None if image_size is None else tuple(int(x) for x in image_size)}
    if max_steps is not None:
        env_kwargs["max_steps"] = int(max_steps)
    lr_info = None
    if lerobot_policy is not None:  # a LeRobot policy: its config decides cameras, image size and `native`
        from chunkpolicy.evaluation.lerobot_policy import inspect_lerobot_policy, native_executor

        lr_info = inspect_lerobot_policy(lerobot_policy)
        executor = native_executor(lr_info) if executor == "native" else executor
    ex_spec = make_executor(executor).spec()

    methods: list[Method] = []
    horizon = 50
    may_fail: dict[str, bool] = {}  # method → its head can fail to produce a chunk (invalid decodes are reported)
    if checkpoint is not None:
        from chunkpolicy.models.policy import ChunkPolicy

        dev = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        policy = ChunkPolicy.from_pretrained(checkpoint, map_location="cpu")  # fails early on a bad checkpoint
        if env_kwargs["image_size"] is None:
            env_kwargs["image_size"] = policy.trained_image_size
        spec = check_embodiment(policy, env, env_kwargs)  # embodiment, cameras and image size
        env_kwargs["cameras"] = tuple(spec.cameras)
        horizon = policy.config.horizon
        check_executor(ex_spec, policy.head.caps, type(policy.head).__name__)
        may_fail["policy"] = bool(policy.head.caps.may_fail)
        cuda_graph = resolve_cuda_graph(cuda_graph, policy.head.caps, dev)
        if cuda_graph:
            check_cuda_graph(policy, dev)
        from chunkpolicy.models.tokenizer import check_prompts  # a too-long task prompt: an error before any rollout
        from chunkpolicy.sim.base import env_task_prompt
        check_prompts(policy.tokenizer, [env_task_prompt(env, t) for t in tasks], policy.config.max_prompt_tokens)
        del policy
        methods.append(Method("policy", str(checkpoint), horizon, num_steps, ex_spec.startswith("rtc"), dev,
                              cuda_graph=cuda_graph))
    elif lr_info is not None:
        from chunkpolicy.evaluation.lerobot_policy import LEROBOT_CAPS, check_env

        dev = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        spec = check_env(lr_info, env, env_kwargs)  # cameras, sizes and names, before any rollout
        if env_kwargs["image_size"] is None:
            env_kwargs["image_size"] = lr_info.image_size
        env_kwargs["cameras"] = tuple(spec.cameras)
        check_executor(ex_spec, LEROBOT_CAPS, f"LeRobot {lr_info.type}")
        if num_steps is not None:
            raise ValueError(f"num_steps: a LeRobot {lr_info.type} policy takes its denoising steps from its own "
                             f"config.json ({lr_info.path}), not --num-steps")
        k = getattr(make_executor(ex_spec), "k", None)
        if k is not None and lr_info.chunk_len is not None and k > lr_info.chunk_len:
            raise ValueError(f"executor {ex_spec!r}: the LeRobot {lr_info.type} policy returns chunks of "
                             f"{lr_info.chunk_len} actions ({lr_info.path}/config.json), fewer than k={k}")
        horizon = lr_info.chunk_len or horizon
        checkpoint = Path(lr_info.path)
        methods.append(Method("policy", lr_info.path, horizon, None, False, dev, kind="lerobot"))
    elif server is not None:  # the served policy's metadata decides embodiment, cameras, image size and horizon
        from chunkpolicy.evaluation.served import inspect_server

        if num_steps is not None:
            raise ValueError("num_steps: the server decides its integration steps (chunkpolicy serve --num-steps)")
        info = inspect_server(server, env, env_kwargs)
        env_kwargs["image_size"], env_kwargs["cameras"] = info.image_size, info.cameras
        if make_executor(ex_spec).needs and not info.rtc:
            raise ValueError(f"executor {ex_spec!r} needs a head with a flow velocity; the server at {server} has none")
        horizon = info.horizon
        may_fail["policy"] = info.may_fail
        methods.append(Method("policy", info.uri, horizon, None, ex_spec.startswith("rtc"), "cpu", kind="server"))
    if env_kwargs["image_size"] is None:
        env_kwargs["image_size"] = (64, 64)
    if baseline:
        methods.append(Method("do-nothing", None, horizon))
    spec = env_spec(env, **{k: v for k, v in env_kwargs.items() if k == "cameras"})

    per_method: dict[str, dict[str, list[bool]]] = {}
    records: dict[str, list[dict]] = {}
    video_paths: list[str] = []
    wall: dict[str, float] = {}
    warnings: list[str] = []
    baseline_info: dict[str, Any] = {}
    cache_path = None
    cached = None
    if baseline and baseline_cache:
        cache_path = baseline_cache_path(env, tasks, seed, episodes, executor, horizon, env_kwargs)
        cached = _read_baseline_cache(cache_path)
    to_run = [m for m in methods if not (m.checkpoint is None and cached is not None)]
    all_res = evaluate(to_run, env, tasks, episodes, executor, num_envs=num_envs, workers=workers, seed=seed,
                       video_episodes=videos, env_kwargs=env_kwargs, progress=progress) if to_run else {}
    if cached is not None:
        all_res["do-nothing"] = {"episodes": cached["episodes"], "videos": {}, "wall_s": 0.0}
        baseline_info = {"cached": True, "cache": str(cache_path), "rollout_s_when_computed": cached["wall_s"]}
    elif baseline:
        baseline_info = {"cached": False, "cache": None if cache_path is None else str(cache_path),
                         "rollout_s": all_res["do-nothing"]["wall_s"]}
        if cache_path is not None:
            try:
                write_json_atomic({"key": _baseline_key(env, tasks, seed, episodes, executor, horizon, env_kwargs),
                                   "episodes": all_res["do-nothing"]["episodes"],
                                   "wall_s": all_res["do-nothing"]["wall_s"]}, cache_path)
            except OSError as e:  # a cache that cannot be written never fails an evaluation
                warnings.append(f"could not write the do-nothing baseline cache {cache_path}: {e}")
    all_res = {m.name: all_res[m.name] for m in methods}  # report order: policy first
    for name, res in all_res.items():
        records[name], wall[name] = res["episodes"], res["wall_s"]
        per_method[name] = {t: [r["success"] for r in res["episodes"] if r["task"] == t] for t in tasks}

    invalid = {name: invalid_counts(recs) for name, recs in records.items()
               if may_fail.get(name) or any(r["invalid_chunks"] for r in recs)}
    summary = summarize(per_method, invalid)
    table = markdown_table(summary)
    results = {
        "command": command, "checkpoint": None if checkpoint is None else str(checkpoint), "env": env,
        "tasks": list(tasks), "episodes_per_task": episodes, "executor": ex_spec, "seed": seed,
        "env_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in env_kwargs.items()},
        "summary": summary, "episodes": records, "rollout_s": wall, "baseline": baseline_info or None,
        "videos": video_paths, "plot": str(out / "success.png"), "warnings": warnings, "cuda_graph": bool(cuda_graph),
    }
    if server is not None:
        results["server"] = server
    if lr_info is not None:
        results["lerobot_policy"] = {**lr_info.to_dict(), "executor_native": native_executor(lr_info)}
    # the results first: the plot and the videos below may fail (a warning each) or be interrupted without losing them
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, out / "results.json")
    (out / "results.md").write_text(table + "\n")
    try:
        bar_chart(summary, out / "success.png",
                  title=f"{env}: success rate, 95% Wilson CI ({episodes} episodes/task, {ex_spec})")
    except Exception as e:  # noqa: BLE001 - a plot never loses an evaluation
        warnings.append(f"could not write success.png: {type(e).__name__}: {e}")
    for name, res in all_res.items():
        for task, clips in res["videos"].items():
            for k, frames in enumerate(clips):
                if not frames:
                    continue
                path = out / "videos" / f"{name}_{task}_{k}.mp4"
                try:
                    video_paths.append(str(write_mp4(frames, path, fps=min(spec.control_hz, 30.0))))
                except Exception as e:  # noqa: BLE001 - a video never loses an evaluation
                    warnings.append(f"could not write {path}: {type(e).__name__}: {e}")
    if video_paths or warnings:
        write_json_atomic(results, out / "results.json")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return results


def format_results(results: dict[str, Any]) -> str:
    from chunkpolicy.evaluation.report import markdown_table

    s = results["summary"]
    lines = [f"{results['env']} · {results['episodes_per_task']} episodes/task · executor {results['executor']} · "
             f"seeds from {results['seed']}", markdown_table(s)]
    if "policy" in s and "do-nothing" in s:
        d = s["policy"]["mean"]["rate"] - s["do-nothing"]["mean"]["rate"]
        lines.append(f"policy − do-nothing: {100 * d:+.0f} points (mean success)")
    for name, m in s.items():
        if "invalid_chunks" in m["mean"]:
            rate = m["mean"]["invalid_rate"]
            lines.append(f"{name}: invalid decodes {m['mean']['invalid_chunks']}/{m['mean']['chunks']} chunks"
                         + (f" ({100 * rate:.1f}%)" if rate is not None else "") + ", each replaced by a do-nothing chunk")
    b = results.get("baseline") or {}
    times = ", ".join(f"{k} {v:.0f}s" for k, v in results["rollout_s"].items()
                      if not (k == "do-nothing" and b.get("cached")))  # summed over workers
    if b.get("cached"):
        times += (", " if times else "") + (f"do-nothing 0s (cached {b['cache']}; computing it took "
                                            f"{b['rollout_s_when_computed']:.0f}s)")
    elif b:
        times += f" (do-nothing cost {b['rollout_s']:.0f}s" + (f", cached in {b['cache']})" if b.get("cache") else ")")
    out = Path(results["plot"]).parent
    lines.append(f"rollout time: {times}. Saved {out}/results.json, results.md, success.png and {len(results['videos'])} videos.")
    for w in results.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.baseline_only and (a.checkpoint or a.lerobot_policy or a.server):
        print("chunkpolicy eval: error: --baseline-only takes no --checkpoint / --lerobot-policy / --server", file=sys.stderr)
        return 2
    try:
        results = run_eval(None if a.baseline_only else a.checkpoint, a.env, _tasks(a.env, a.tasks),
                           episodes=a.episodes, executor=a.executor, num_envs=a.num_envs, workers=a.workers, seed=a.seed,
                           image_size=None if a.image_size is None else tuple(a.image_size), max_steps=a.max_steps, num_steps=a.num_steps,
                           baseline=a.baseline or a.baseline_only, videos=a.videos, device=a.device, out=a.out,
                           progress=not a.no_progress, baseline_cache=not a.no_baseline_cache, command="chunkpolicy eval " + shlex.join(argv),
                           lerobot_policy=None if a.baseline_only else a.lerobot_policy,
                           server=None if a.baseline_only else a.server, cuda_graph=a.cuda_graph)
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chunkpolicy eval: error: {msg}", file=sys.stderr)
        return 2
    print(format_results(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
