"""Simulator speed and scripted-expert quality.

1. Per env (Meta-World ``push-v3``, Fetch ``push``, Push-T; ALOHA ``transfer-cube`` with ``--envs``): physics step
   time (no rendering), render time per camera frame with shadows + multisampling ON (MuJoCo defaults) vs OFF (what
   the adapters use), and the full adapter step (physics + every camera).
2. Scripted-expert success per task (Meta-World MT10 and the three Fetch tasks by default; ALOHA's two tasks when
   ``aloha`` is in ``--envs``) with 95% Wilson intervals,
   measured through :func:`chunkpolicy.sim.collect.collect` into a throw-away store, so the wall time is the real
   collection throughput (workers, rendering and zarr writes included).

    python benchmarks/sim_speed.py --out sim_speed.json                      # MT10 × 10 episodes, 64×64
    python benchmarks/sim_speed.py --quick --out /tmp/sim_speed.json         # smoke test
    python benchmarks/sim_speed.py --envs aloha --episodes 20 --out aloha.json  # ALOHA only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from chunkpolicy.sim.base import make_env


def _ms(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def _random_actions(env, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    if env.spec.name == "pusht":
        return [rng.uniform(100, 400, 2) for _ in range(n)]
    if env.spec.name == "aloha":  # joint targets: small moves around the current pose
        base = env._task.get_qpos(env.physics)
        return [base + rng.normal(0, 0.05, 14) for _ in range(n)]
    return [rng.uniform(-1, 1, env.spec.action_dim) for _ in range(n)]


def time_env(env_name: str, task: str, image_size: tuple[int, int], steps: int, frames: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {"env": env_name, "task": task, "image_size": list(image_size)}
    for fast in ([True, False] if env_name != "pusht" else [True]):
        kwargs = {"image_size": image_size} | ({"fast_render": fast} if env_name != "pusht" else {})
        env = make_env(env_name, task, **kwargs)
        env.reset(0)
        key = "fast" if fast else "default"
        if env_name == "pusht":
            raw = env.raw_env
            acts = iter(_random_actions(env, steps + 10, rng))
            raw.obs_type = "state"  # physics only
            out["physics_step_ms"] = _ms(lambda: raw.step(next(acts)), steps)
            raw.obs_type = "pixels_agent_pos"
            out["render_ms_per_frame"] = {key: _ms(lambda: raw._render(), frames)}
        else:
            raw = env.raw_env
            acts = iter(_random_actions(env, steps + 10, rng))
            if fast:
                def phys():
                    if env_name == "metaworld" and raw.curr_path_length >= raw.max_path_length - 1:
                        raw.reset()
                    if env_name == "aloha":  # raw is the dm_control Physics
                        env._task.before_step(next(acts), raw)
                        raw.step(env.n_sub_steps)
                        return
                    raw.step(next(acts).astype(np.float32))
                out["physics_step_ms"] = _ms(phys, steps)
            cam = env.spec.cameras[0]
            data = raw.data.ptr if env_name == "aloha" else raw.data
            out.setdefault("render_ms_per_frame", {})[key] = _ms(lambda: env._renderer.render(data, cam), frames)
        if fast:
            env.reset(1)
            acts2 = iter(_random_actions(env, steps + 10, rng))

            def full_step():
                if env.done:
                    env.reset(2)
                env.step(next(acts2))
            out["adapter_step_ms"] = _ms(full_step, min(steps, 100))
            out["cameras"] = list(env.spec.cameras)
        env.close()
    r = out["render_ms_per_frame"]
    if "default" in r:
        out["render_speedup"] = r["default"] / r["fast"]
    return out


def expert_success(env_name: str, tasks: list[str], episodes: int, workers: int, image_size: tuple[int, int]) -> dict:
    from chunkpolicy.sim.collect import collect

    with tempfile.TemporaryDirectory() as d:
        s = collect(env_name, tasks, episodes, Path(d) / "bench.zarr", workers=workers, image_size=image_size,
                    progress=sys.stderr.isatty(), verbose=False, compute_stats=False)
    return {
        "tasks": {t: {k: v[k] for k in ("attempts", "successes", "rate", "ci95", "mean_steps")} for t, v in s["tasks"].items()},
        "rate": s["rate"],
        "wall_s": s["wall_s"],
        "episodes_per_s": s["episodes_per_s"],
        "frames_per_s": s["frames_written"] / s["wall_s"] if s["wall_s"] else None,
        "errors": s["errors"][:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="few steps, 5 Meta-World tasks × 3 episodes")
    p.add_argument("--episodes", type=int, default=None, help="expert episodes per task (default 10, quick 3)")
    p.add_argument("--metaworld-tasks", default=None, help="comma list, or MT10 / MT50 (default MT10)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 64))
    p.add_argument("--skip-experts", action="store_true")
    p.add_argument("--envs", default="metaworld,fetch,pusht",
                   help="comma list of envs to time and run experts for: metaworld, fetch, pusht, aloha "
                   "(default metaworld,fetch,pusht)")
    a = p.parse_args()
    from chunkpolicy.sim import metaworld_env

    hw = tuple(a.image_size)
    envs = [e.strip() for e in a.envs.split(",") if e.strip()]
    unknown = sorted(set(envs) - {"metaworld", "fetch", "pusht", "aloha"})
    if unknown:
        p.error(f"--envs: unknown {unknown}; known: metaworld, fetch, pusht, aloha")
    steps, frames = (50, 20) if a.quick else (300, 100)
    episodes = a.episodes or (3 if a.quick else 10)
    mw_tasks = a.metaworld_tasks or ("reach-v3,push-v3,pick-place-v3,door-open-v3,drawer-close-v3" if a.quick else "MT10")
    mw_tasks = list(getattr(metaworld_env, mw_tasks.upper())) if mw_tasks.upper() in ("MT10", "MT50") else mw_tasks.split(",")

    result: dict = {
        "config": {"quick": a.quick, "image_size": list(hw), "steps": steps, "frames": frames, "episodes": episodes,
                   "workers": a.workers, "MUJOCO_GL": os.environ.get("MUJOCO_GL"), "cpus": os.cpu_count(),
                   "python": platform.python_version(),
                   "envs": envs,
                   "versions": {m: version(m) for m in ("mujoco", "metaworld", "gymnasium-robotics", "gym-pusht",
                                                        "gymnasium") + (("gym-aloha", "dm-control")
                                                                        if "aloha" in envs else ())}},
        "speed": [],
    }
    timed = (("metaworld", "push-v3"), ("fetch", "push"), ("pusht", "push-t"), ("aloha", "transfer-cube"))
    for env_name, task in timed:
        if env_name not in envs:
            continue
        size = hw if env_name != "pusht" else (96, 96)
        print(f"timing {env_name} {task} ...", file=sys.stderr, flush=True)
        result["speed"].append(time_env(env_name, task, size, steps, frames))
    if not a.skip_experts:
        expert_tasks = {"metaworld": mw_tasks, "fetch": ["reach", "push", "pick_and_place"],
                        "aloha": ["transfer-cube", "insertion"]}
        result["experts"] = {}
        for env_name in (e for e in envs if e in expert_tasks):
            tasks = expert_tasks[env_name]
            print(f"experts: {env_name} {len(tasks)} tasks × {episodes} ...", file=sys.stderr, flush=True)
            result["experts"][env_name] = expert_success(env_name, tasks, episodes, a.workers, hw)

    print(f"\nSimulator speed (ms; {os.cpu_count()} CPUs, MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
    print(f"{'env':<10} {'task':<8} {'size':>7} {'physics':>8} {'render on':>10} {'render off':>11} {'speedup':>8} {'adapter step':>13}")
    for r in result["speed"]:
        rf = r["render_ms_per_frame"]
        on = f"{rf['default']:.2f}" if "default" in rf else "-"
        speedup = f"{r['render_speedup']:.1f}x" if "render_speedup" in r else "-"
        print(f"{r['env']:<10} {r['task']:<8} {'x'.join(map(str, r['image_size'])):>7} {r['physics_step_ms']:>8.2f} "
              f"{on:>10} {rf['fast']:>11.2f} {speedup:>8} {r['adapter_step_ms']:>10.2f} ({len(r['cameras'])} cam)")
    for env_name, e in result.get("experts", {}).items():
        print(f"\nScripted expert success: {env_name} ({e['episodes_per_s']:.2f} episodes/s, "
              f"{e['frames_per_s']:.0f} frames/s with {a.workers} workers, incl. rendering + store writes)")
        w = max(len(t) for t in e["tasks"])
        for t, v in e["tasks"].items():
            print(f"  {t:<{w}} {v['successes']:>3}/{v['attempts']:<3} {v['rate']:>5.0%}  "
                  f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]  mean steps {v['mean_steps'] or 0:.0f}")
        print(f"  {'ALL':<{w}} {e['rate']:>13.0%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
