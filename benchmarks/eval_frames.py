"""Closed-loop evaluation wall time when camera frames are rendered only at the ticks the policy reads them.

A tiny random policy (so that the simulator, not the network, sets the pace, as on a GPU host), Meta-World tasks,
``evaluate`` in this process: once as the library runs it (frames where the executor will predict, the video env
every tick) and once with every tick rendered (what evaluation did before; reproduced here by forcing
``SimEnv.step(render=True)``). Same episodes either way: the script checks that the two give identical records.

    python benchmarks/eval_frames.py --out eval_frames.json                    # open_loop:8, 2 tasks x 10 episodes
    python benchmarks/eval_frames.py --executor open_loop:8 --executor rtc:8,2 --executor temporal_ensemble:0.01 --out f.json
    python benchmarks/eval_frames.py --quick --out /tmp/eval_frames.json       # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch

from chunkpolicy.evaluation.rollout import Method, evaluate
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.sim.base import SimEnv, env_spec
from chunkpolicy.sim.metaworld_env import MetaWorldEnv
from chunkpolicy.spaces import UnifiedSpace


def tiny_checkpoint(out: Path, horizon: int) -> Path:
    spec = env_spec("metaworld")
    rng = np.random.default_rng(0)
    stats = {spec.name: {"action": compute_stats(rng.uniform(-1, 1, (100, 4))),
                         "state": compute_stats(rng.uniform(0, 1, (100, 4)))}}
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", head="flow_expert", horizon=horizon),
                         UnifiedSpace(32, "pad", embodiments=[spec]), stats)
    return policy.save_pretrained(out / "tiny")


def timed(method: Method, tasks: list[str], episodes: int, executor: str, kw: dict, every_tick: bool) -> dict:
    renders = [0]
    orig_render, orig_step = MetaWorldEnv._render, SimEnv.step

    def counted(self):
        renders[0] += 1
        return orig_render(self)

    MetaWorldEnv._render = counted
    if every_tick:
        SimEnv.step = lambda self, action, render=True: orig_step(self, action, True)
    try:
        t0 = time.perf_counter()
        res = evaluate([method], "metaworld", tasks, episodes, executor, **kw)[method.name]
        wall = time.perf_counter() - t0
    finally:
        MetaWorldEnv._render, SimEnv.step = orig_render, orig_step
    steps = sum(e["steps"] for e in res["episodes"])
    return {"wall_s": wall, "env_steps": steps, "frames_rendered": renders[0], "episodes": res["episodes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="reach-v3,push-v3")
    p.add_argument("--episodes", type=int, default=10, help="per task")
    p.add_argument("--num-envs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--executor", action="append", help="an executor spec, repeatable (default open_loop:8)")
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each setting (alternating)")
    p.add_argument("--quick", action="store_true", help="1 task x 2 episodes x 20 steps, 1 repeat")
    a = p.parse_args()
    tasks = a.tasks.split(",")
    if a.quick:
        tasks, a.episodes, a.num_envs, a.max_steps, a.repeat = tasks[:1], 2, 2, 20, 1
    executors = a.executor or ["open_loop:8"]
    torch.set_num_threads(1)
    kw = dict(num_envs=a.num_envs, video_episodes=1, workers=0, progress=False,
              env_kwargs={"image_size": (64, 64), "max_steps": a.max_steps})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = tiny_checkpoint(Path(d), a.horizon)
        for ex in executors:
            m = Method("policy", str(ckpt), horizon=a.horizon, rtc=ex.startswith("rtc"))
            evaluate([m], "metaworld", tasks[:1], 1, ex, **{**kw, "num_envs": 1})  # warm-up: env and policy caches
            runs: dict[str, list[dict]] = {"on_demand": [], "every_tick": []}
            for _ in range(a.repeat):
                for name in runs:
                    runs[name].append(timed(m, tasks, a.episodes, ex, kw, every_tick=name == "every_tick"))
            same = all(r["episodes"] == runs["every_tick"][0]["episodes"] for rs in runs.values() for r in rs)
            row = {"executor": ex, "same_episodes": same}
            for name, rs in runs.items():
                walls = [r["wall_s"] for r in rs]
                row[name] = {"wall_s": walls, "median_wall_s": statistics.median(walls),
                             "env_steps": rs[0]["env_steps"], "frames_rendered": rs[0]["frames_rendered"]}
            row["speedup"] = row["every_tick"]["median_wall_s"] / row["on_demand"]["median_wall_s"]
            rows.append(row)
            print(f"{ex:>24}: every tick {row['every_tick']['median_wall_s']:.1f} s "
                  f"({row['every_tick']['frames_rendered']} frames) -> on demand {row['on_demand']['median_wall_s']:.1f} s "
                  f"({row['on_demand']['frames_rendered']} frames): {row['speedup']:.2f}x, same episodes: {same}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"command": "python benchmarks/eval_frames.py " + " ".join(sys.argv[1:]), "commit": commit,
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
           "tasks": tasks, "episodes_per_task": a.episodes, "num_envs": a.num_envs, "max_steps": a.max_steps,
           "horizon": a.horizon, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
