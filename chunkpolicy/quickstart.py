"""``chunkpolicy quickstart``: the README's main job — collect, train, evaluate — in a few minutes on 2 CPU cores.

1. **Collect** scripted-expert Meta-World demonstrations (``metaworld.policies``) into a zarr episode store, in worker
   processes, keeping successful episodes only.
2. **Train** a tiny flow-matching policy on them with the library's trainer (``configs/quickstart_metaworld.yaml``).
3. **Evaluate** it in closed loop on held-out seeds with ``open_loop:8``, next to a do-nothing baseline on the same
   seeds: per-task success with 95% Wilson intervals, a bar chart and rollout videos.

Everything lands in ``runs/quickstart/``: ``demos.zarr``, ``train/`` (checkpoint, ``loss.png``), ``eval/``
(``results.json``, ``results.md``, ``success.png``, ``videos/*.mp4``) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

TASKS = ("handle-press-v3", "coffee-button-v3", "drawer-close-v3", "button-press-topdown-v3")
CAMERAS = ("corner",)  # one 64×64 view: rendering dominates a CPU rollout step
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart_metaworld.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run directory (replaced if it exists)")
    p.add_argument("--tasks", default=",".join(TASKS), help="Meta-World tasks (comma-separated)")
    p.add_argument("--episodes", type=int, default=15, help="expert demonstrations per task")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per task and method")
    p.add_argument("--max-steps", type=int, default=120, help="evaluation episode limit (experts need 35-80 steps)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for collection and evaluation")
    p.add_argument("--config", default=str(CONFIG), help="training config (its data path and output dir are set here)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chunkpolicy.sim.base import setup_headless_gl

    setup_headless_gl()
    from rich.console import Console
    from rich.table import Table

    from chunkpolicy.atomic import atomic_file
    from chunkpolicy.config import load_config
    from chunkpolicy.evaluation.cli import run_eval
    from chunkpolicy.sim.collect import collect
    from chunkpolicy.training.experiment import run as train

    console = Console()
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    console.rule(f"[bold]1/3 collect {a.episodes} expert demos × {len(tasks)} Meta-World tasks")
    t = time.perf_counter()
    demos = collect("metaworld", tasks, a.episodes, out / "demos.zarr", workers=a.workers, seed=0, image_size=(64, 64),
                    cameras=CAMERAS)
    times["collect"] = time.perf_counter() - t

    console.rule("[bold]2/3 train a tiny flow-matching policy")
    t = time.perf_counter()
    overrides = [f"data.datasets.0.path={out / 'demos.zarr'}", f"train.output_dir={out / 'train'}"]
    if a.steps is not None:
        overrides.append(f"train.steps={a.steps}")
    cfg = load_config(a.config, overrides)
    trained = train(cfg)
    times["train"] = time.perf_counter() - t

    console.rule(f"[bold]3/3 evaluate on held-out seeds, next to a do-nothing baseline ({a.eval_episodes} episodes/task)")
    t = time.perf_counter()
    res = run_eval(trained["checkpoint"], "metaworld", tasks, episodes=a.eval_episodes, executor="open_loop:8",
                   num_envs=5, workers=a.workers, image_size=(64, 64), max_steps=a.max_steps, baseline=True, videos=1,
                   device="cpu", out=out / "eval", command="chunkpolicy quickstart")
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    s = res["summary"]
    table = Table(title=f"Meta-World success, {a.eval_episodes} held-out episodes per task (95% Wilson CI)")
    for col in ("task", "expert (demos)", "policy", "do-nothing"):
        table.add_column(col)

    def cell(d: dict) -> str:
        return f"{100 * d['rate']:.0f}% [{100 * d['ci95'][0]:.0f}–{100 * d['ci95'][1]:.0f}]"

    for task in tasks:
        e = demos["tasks"][task]
        table.add_row(task, f"{e['successes']}/{e['attempts']}", cell(s["policy"]["tasks"][task]),
                      cell(s["do-nothing"]["tasks"][task]))
    table.add_row("[bold]mean", "", cell(s["policy"]["mean"]), cell(s["do-nothing"]["mean"]))
    console.print(table)
    margin = s["policy"]["mean"]["rate"] - s["do-nothing"]["mean"]["rate"]
    summary = {
        "tasks": tasks, "demos_per_task": a.episodes, "train_steps": trained["steps"],
        "final_train_loss": trained["final_train_loss"], "checkpoint": trained["checkpoint"],
        "success": {m: {"mean": v["mean"], "tasks": v["tasks"]} for m, v in s.items()},
        "margin_points": 100 * margin, "times_s": times,
    }
    with atomic_file(out / "summary.json") as tmp:
        import json

        tmp.write_text(json.dumps(summary, indent=2))
    videos = [p for p in res["videos"] if "/policy_" in p]
    console.print(
        f"policy − do-nothing: [bold]{100 * margin:+.0f} points[/bold] mean success.  "
        f"Time: collect {times['collect']:.0f}s, train {times['train']:.0f}s, eval {times['eval']:.0f}s, "
        f"total {times['total'] / 60:.1f} min.\n"
        f"Plots: {out / 'train' / 'loss.png'}, {out / 'eval' / 'success.png'}; video: {videos[0] if videos else '-'}; "
        f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
