"""``chunkpolicy study run ROW --smoke``: the same row at toy scale on any machine, to catch a broken row before it
costs GPU time.

Everything that decides whether a row *runs* is kept: its method config and overrides (the real model), its data
sources' envs, cameras and image sizes, its mixture, ``init_from_row`` / ``from_row`` / ``same_as`` links, its
executor and its evaluation code path. What only decides how *long* it runs is cut: two tasks per data source and one
demo each, two optimizer steps (checkpoints at step 2), one evaluation episode of four steps per task, one latency
call, no compilation or CUDA graph, CPU. Results go to ``<out_dir>/smoke/`` (never mixed with the real rows'); the
numbers mean nothing."""

from __future__ import annotations

import dataclasses

from chunkpolicy.study.config import DataSource, Row, Study, expand_tasks

__all__ = ["smoke_study", "SMOKE_OVERRIDES"]

# appended to every chunkpolicy row's overrides (later overrides win)
SMOKE_OVERRIDES = ("train.batch_size=2", "data.num_workers=0", "train.progress=false", "train.log_every=1",
                   "train.warmup_steps=0", "train.compile=false", "train.cuda_graph=false", "train.cpu=true")


def smoke_study(study: Study) -> Study:
    """``study`` at toy scale (see the module docstring); a pure transform, nothing is run or written."""
    out = study.out_dir / "smoke"
    data: dict[str, DataSource] = {}
    for name, d in study.data.items():
        if d.collect is None:  # an existing store: read as it is
            data[name] = d
            continue
        collect = {**d.collect, "episodes": 1, "workers": 0}
        data[name] = dataclasses.replace(d, tasks=expand_tasks(d.env, d.tasks)[:2], collect=collect, store=str(out / "data" / f"{name}.zarr"))
    rows: dict[str, Row] = {}
    for name, r in study.rows.items():
        method = dict(r.method)
        if r.kind == "chunkpolicy":
            method["overrides"] = list(method.get("overrides", [])) + list(SMOKE_OVERRIDES)
        elif r.kind == "lerobot" and not str(method.get("steps", "")).startswith("same_as:"):
            method["steps"] = 2
        train = {**r.train, "steps": 2, "ckpt_every": 2, "max_minutes": 5}
        train.pop("keep_last", None)
        ev = {**r.eval, "episodes": 1, "curve_episodes": None, "max_steps": 4, "num_envs": 1, "workers": 0,
              "videos": 0, "latency_calls": 1, "device": "cpu"}
        rows[name] = dataclasses.replace(r, data=data[r.data.name], method=method, train=train, eval=ev,
                                         mixture=tuple((data[d.name], w) for d, w in r.mixture))
    return dataclasses.replace(study, out_dir=out, results_dir=out / "results", rows=rows, data=data)
