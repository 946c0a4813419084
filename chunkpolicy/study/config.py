"""Study configs: named data sources and result rows, one YAML file per study (``configs/study/*.yaml``).

```yaml
name: issue16
out_dir: runs/study                     # working dirs: out_dir/data/<data>.zarr, out_dir/rows/<row>/...
results_dir: benchmarks/results/study   # one <row>.json per row (the study's result files)
defaults:                               # merged under every row (a row's own keys win, mappings key by key)
  eval: {episodes: 50, max_steps: 150, executor: open_loop:8}
data:
  mt10:
    env: metaworld
    tasks: MT10                         # a list, a comma-separated string, or a Meta-World set (TASK_SETS)
    collect: {episodes: 20, image_size: [64, 64], cameras: [corner]}   # or  store: path/to/demos.zarr
rows:
  4a-mt10-flow_expert:
    group: 4a
    data: mt10
    method: {config: configs/study/mt10_small.yaml, overrides: [model.head=flow_expert]}
    train: {max_minutes: 10}
  4a-mt10-lerobot_act:
    data: mt10
    method: {lerobot: act, steps: 20000}
    eval: {executor: native}
  4b-mt10-rtc:
    data: mt10
    method: {from_row: 4a-mt10-flow_expert}   # evaluate that row's checkpoint again (no training)
    eval: {executor: "rtc:8,2"}
  4c-pretrain:
    data: ml45_test20                   # evaluated here (zero-shot); trained on the mixture
    mixture: [ml45_train, fetch, {data: aloha_4c, weight: 1.0}]
    method: {config: configs/study/xemb_pretrain_small.yaml}
  4c-ml45test20-lora:
    data: ml45_test20
    method: {config: configs/study/xemb_posttrain_small.yaml, init_from_row: 4c-pretrain,
             overrides: [posttrain.mode=lora]}
comparisons:                            # paired differences a − b in the aggregate (rows evaluated alike)
  - {a: 4c-ml45test20-lora, b: 4c-ml45test20-scratch, target_points: 15}
```

Rows: ``group`` (table it belongs to, default the text before the first ``-`` of its name), ``data`` (a key of
``data``), ``method`` (exactly one of ``config`` = a chunkpolicy experiment YAML with ``overrides``, ``lerobot`` =
``diffusion`` | ``act`` | another LeRobot policy type trained by LeRobot's own trainer with its defaults and ``args``
for ``steps`` optimizer steps (an int, or ``same_as:ROW``: the steps that chunkpolicy row reached),
``from_row`` = another row's trained checkpoint; with ``config``, ``init_from_row: ROW`` post-trains from that
chunkpolicy row's final checkpoint, trained first if it is missing: ``posttrain.init_from`` is set to it and
``posttrain.mode`` comes from the overrides), ``mixture`` (the data a ``config`` row trains on when it is not its
``data`` alone: a list of data keys or ``{data: KEY, weight: W}``; the sampling probabilities are
``weight · frames^data.alpha`` per the method config; ``data`` is then only what the row is evaluated on),
``train`` (``max_minutes``, ``steps``, ``ckpt_every``; ``eval_checkpoints``: ``last`` or ``all``, the latter
evaluating every kept checkpoint for success vs training steps)
and ``eval`` (``episodes`` per task, ``seed`` (default: ``chunkpolicy eval``'s held-out evaluation seed, never a collection seed), ``max_steps``, ``executor``,
``num_envs``, ``workers``, ``videos``, ``device``, ``latency_calls``; ``curve_episodes``: episodes per task for the
checkpoints before the last with ``eval_checkpoints: all``, default ``episodes``: the curve's points are cheaper, the
row's result, from the last checkpoint, always has ``episodes``; ``cuda_graph``: true | false | auto, chunks replayed
as CUDA graphs (``chunkpolicy eval --cuda-graph``; auto: for chunkpolicy heads that sample without host syncs on a
CUDA device, the choice recorded in the row's results). ``comparisons``: pairs of rows evaluated on the same
episodes (same ``data``, ``eval.seed`` and ``eval.episodes``), each ``{a, b, target_points}``, which
``chunkpolicy study aggregate --study`` tabulates as paired differences a − b (target: the points the study aims for).
Every error names the key (``rows.4a-mt10-flow_expert.method.overrides``) and the file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["StudyError", "Study", "Row", "Comparison", "DataSource", "load_study", "expand_tasks", "EVAL_KEYS",
           "TRAIN_KEYS", "TASK_SETS"]

TOP_KEYS = {"name", "out_dir", "results_dir", "defaults", "data", "rows", "comparisons", "notes"}
COMPARISON_KEYS = {"a", "b", "target_points", "notes"}
DATA_KEYS = {"env", "tasks", "collect", "store", "notes"}
COLLECT_KEYS = {"episodes", "image_size", "cameras", "seed", "max_steps", "workers", "env_kwargs"}
ROW_KEYS = {"group", "data", "mixture", "method", "train", "eval", "notes"}
METHOD_KEYS = {"config", "overrides", "lerobot", "args", "steps", "from_row", "init_from_row", "label"}
# Meta-World task sets a data source may name (expanded by the runner from chunkpolicy.sim.metaworld_env)
TASK_SETS = ("MT10", "MT50", "ML45_TRAIN", "ML45_TEST")
TRAIN_KEYS = {"max_minutes", "steps", "ckpt_every", "eval_checkpoints", "keep_last"}
EVAL_KEYS = {"episodes", "seed", "max_steps", "executor", "num_envs", "workers", "videos", "device", "latency_calls",
             "num_steps", "curve_episodes", "cuda_graph"}
# seed: chunkpolicy.evaluation.rollout.EVAL_SEED (checked in tests; not imported here: that module needs torch)
EVAL_DEFAULTS: dict[str, Any] = {"episodes": 50, "seed": 100_000, "max_steps": None, "executor": "open_loop:8",
                                 "num_envs": 10, "workers": 0, "videos": 1, "device": None, "latency_calls": 20,
                                 "num_steps": None, "curve_episodes": None, "cuda_graph": False}


class StudyError(ValueError):
    """A bad study config; the message names the key and the file."""


@dataclass(frozen=True)
class DataSource:
    """Demonstrations of one env: an existing ``store`` or a ``collect`` recipe (written to ``store``)."""

    name: str
    env: str
    tasks: list[str]
    store: str  # the episode store (collected there when ``collect`` is set)
    collect: dict[str, Any] | None = None


@dataclass(frozen=True)
class Row:
    """One result row, resolved (defaults merged, data looked up)."""

    name: str
    group: str
    data: DataSource  # what the row is evaluated on (and trained on, without a mixture)
    method: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    kind: str  # "chunkpolicy" | "lerobot" | "from_row"
    raw: dict[str, Any] = field(default_factory=dict)  # the row as written plus defaults (saved in its results)
    mixture: tuple[tuple[DataSource, float], ...] = ()  # (source, weight) trained on; () = ((data, 1.0),)

    @property
    def train_data(self) -> tuple[tuple[DataSource, float], ...]:
        """The (source, weight) pairs the row trains on: its ``mixture``, else its ``data``."""
        return self.mixture or ((self.data, 1.0),)

    @property
    def label(self) -> str:
        """What the tables call the method: ``method.label``, else the head / LeRobot type / source row."""
        m = self.method
        if m.get("label"):
            return str(m["label"])
        if self.kind == "lerobot":
            return f"lerobot:{m['lerobot']}"
        if self.kind == "from_row":
            return f"{m['from_row']}"
        if m.get("init_from_row"):
            modes = [o.split("=", 1)[1] for o in m.get("overrides", []) if o.startswith("posttrain.mode=")]
            return f"{modes[-1] if modes else 'full'} from {m['init_from_row']}"
        heads = [o.split("=", 1)[1] for o in m.get("overrides", []) if o.startswith("model.head=")]
        return heads[-1] if heads else Path(m["config"]).stem


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` against row ``b`` on the same evaluation episodes (the aggregate's paired difference, a − b), and
    the difference in success points the study aims for, if any."""

    a: str
    b: str
    target_points: float | None = None


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    out_dir: Path
    results_dir: Path
    rows: dict[str, Row]
    data: dict[str, DataSource]
    comparisons: tuple[Comparison, ...] = ()


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _keys(d: Any, allowed: set[str], where: str, src: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise StudyError(f"{where}: expected a mapping, got {type(d).__name__} [{src}]")
    bad = sorted(set(d) - allowed)
    if bad:
        raise StudyError(f"{where}.{bad[0]}: unknown key; allowed: {sorted(allowed)} [{src}]")
    return d


def _tasks(env: str, tasks: Any, where: str, src: str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise StudyError(f"{where}.tasks: expected a non-empty list of task names [{src}]")
    if env == "metaworld" and len(tasks) == 1 and tasks[0].upper() in TASK_SETS:
        return [tasks[0].upper()]  # expanded by the runner (the simulator module is not imported here)
    return list(tasks)


def expand_tasks(env: str, tasks: list[str]) -> list[str]:
    """A data source's task names, a Meta-World task set (``MT10``, ``ML45_TRAIN``, ...) expanded to its tasks."""
    if env == "metaworld" and len(tasks) == 1 and tasks[0] in TASK_SETS:
        from chunkpolicy.sim import metaworld_env

        return list(getattr(metaworld_env, tasks[0]))
    return list(tasks)


def _mixture(spec: Any, data: dict[str, DataSource], kind: str, where: str,
             src: str) -> tuple[tuple[DataSource, float], ...]:
    """A row's ``mixture``: data keys or ``{data: KEY, weight: W}`` mappings, as (source, weight) pairs."""
    if spec is None:
        return ()
    if kind != "chunkpolicy":
        raise StudyError(f"{where}.mixture: only a method.config row trains on a mixture [{src}]")
    if not isinstance(spec, list) or not spec:
        raise StudyError(f"{where}.mixture: expected a non-empty list of data keys or {{data: KEY, weight: W}} [{src}]")
    out: list[tuple[DataSource, float]] = []
    for i, item in enumerate(spec):
        item = {"data": item} if isinstance(item, str) else _keys(item, {"data", "weight"}, f"{where}.mixture.{i}", src)
        key, weight = item.get("data"), item.get("weight", 1.0)
        if key not in data:
            raise StudyError(f"{where}.mixture.{i}: {key!r} is not a key of data ({sorted(data)}) [{src}]")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise StudyError(f"{where}.mixture.{i}.weight: expected a positive number, got {weight!r} [{src}]")
        if key in [d.name for d, _ in out]:
            raise StudyError(f"{where}.mixture.{i}: {key!r} is listed twice [{src}]")
        out.append((data[key], float(weight)))
    return tuple(out)


def _check_init_chain(rows: dict[str, Row], name: str, src: str) -> None:
    """``init_from_row`` names a chunkpolicy training row of the study, and following it never comes back."""
    seen, cur = [name], name
    while rows[cur].method.get("init_from_row") is not None:
        ref = rows[cur].method["init_from_row"]
        if ref not in rows or rows[ref].kind != "chunkpolicy":
            raise StudyError(f"rows.{cur}.method.init_from_row: {ref!r} must be a method.config training row of this "
                             f"study ({sorted(n for n, r in rows.items() if r.kind == 'chunkpolicy')}) [{src}]")
        if ref in seen:
            raise StudyError(f"rows.{name}.method.init_from_row: a cycle ({' -> '.join(seen + [ref])}) [{src}]")
        seen.append(ref)
        cur = ref


def load_study(path: str | os.PathLike) -> Study:
    """Parse and check a study YAML (no simulator or model is touched); :class:`StudyError` naming the key."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"--study: file {str(p)!r} does not exist")
    src = str(p)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"{src}: invalid YAML ({e})") from None
    _keys(raw, TOP_KEYS, "<root>", src)
    for k in ("name", "data", "rows"):
        if not raw.get(k):
            raise StudyError(f"{k}: missing [{src}]")
    out_dir = Path(raw.get("out_dir") or "runs/study")
    results_dir = Path(raw.get("results_dir") or out_dir / "results")
    defaults = _keys(raw.get("defaults"), {"train", "eval", "method"}, "defaults", src)

    data: dict[str, DataSource] = {}
    for name, d in _keys(raw["data"], set(raw["data"]), "data", src).items():
        where = f"data.{name}"
        d = _keys(d, DATA_KEYS, where, src)
        if not d.get("env"):
            raise StudyError(f"{where}.env: missing [{src}]")
        tasks = _tasks(d["env"], d.get("tasks"), where, src)
        collect = _keys(d.get("collect"), COLLECT_KEYS, f"{where}.collect", src) if d.get("collect") is not None else None
        if collect is not None and not isinstance(collect.get("episodes"), int):
            raise StudyError(f"{where}.collect.episodes: expected an int (demos per task) [{src}]")
        if collect is None and not d.get("store"):
            raise StudyError(f"{where}: give store (an existing episode store) or collect (a recipe) [{src}]")
        store = d.get("store") or str(out_dir / "data" / f"{name}.zarr")
        data[name] = DataSource(name, str(d["env"]), tasks, str(store), collect)

    rows: dict[str, Row] = {}
    for name, r in _keys(raw["rows"], set(raw["rows"]), "rows", src).items():
        where = f"rows.{name}"
        r = _keys(r, ROW_KEYS, where, src)
        if "/" in name or name.startswith("."):
            raise StudyError(f"{where}: a row name is a file name (no '/', no leading '.') [{src}]")
        merged = _merge({k: defaults.get(k, {}) for k in ("train", "eval", "method")}, r)
        method = _keys(merged.get("method"), METHOD_KEYS, f"{where}.method", src)
        kinds = [k for k in ("config", "lerobot", "from_row") if method.get(k)]
        if len(kinds) != 1:
            raise StudyError(f"{where}.method: give exactly one of config, lerobot, from_row (got {kinds or 'none'}) [{src}]")
        kind = {"config": "chunkpolicy", "lerobot": "lerobot", "from_row": "from_row"}[kinds[0]]
        if not isinstance(method.get("overrides", []), list):
            raise StudyError(f"{where}.method.overrides: expected a list of key=value strings [{src}]")
        if not isinstance(method.get("args", []), list):
            raise StudyError(f"{where}.method.args: expected a list of --key=value strings [{src}]")
        steps = method.get("steps")
        if kind == "lerobot" and not (isinstance(steps, int) and steps > 0) and not str(steps).startswith("same_as:"):
            raise StudyError(f"{where}.method.steps: a LeRobot row needs its optimizer steps: a positive int, or "
                             f"same_as:<row> (the steps that chunkpolicy row reached), got {steps!r} [{src}]")
        train = _keys(merged.get("train"), TRAIN_KEYS, f"{where}.train", src)
        if train.get("eval_checkpoints", "last") not in ("last", "all"):
            raise StudyError(f"{where}.train.eval_checkpoints: expected last or all, got {train['eval_checkpoints']!r} [{src}]")
        ev = {**EVAL_DEFAULTS, **_keys(merged.get("eval"), EVAL_KEYS, f"{where}.eval", src)}
        if ev["cuda_graph"] not in (True, False, "auto"):
            raise StudyError(f"{where}.eval.cuda_graph: expected true, false or auto, got {ev['cuda_graph']!r} [{src}]")
        if not isinstance(ev["episodes"], int) or ev["episodes"] < 1:
            raise StudyError(f"{where}.eval.episodes: expected a positive int, got {ev['episodes']!r} [{src}]")
        ce = ev["curve_episodes"]
        if ce is not None and (not isinstance(ce, int) or isinstance(ce, bool) or not 1 <= ce <= ev["episodes"]):
            raise StudyError(f"{where}.eval.curve_episodes: expected an int in [1, eval.episodes = {ev['episodes']}], "
                             f"got {ce!r} [{src}]")
        if r.get("data") not in data:
            raise StudyError(f"{where}.data: {r.get('data')!r} is not a key of data ({sorted(data)}) [{src}]")
        mixture = _mixture(r.get("mixture"), data, kind, where, src)
        if method.get("init_from_row") is not None and kind != "chunkpolicy":
            raise StudyError(f"{where}.method.init_from_row: post-training needs method.config (the training recipe) "
                             f"[{src}]")
        if method.get("init_from_row") is not None and any(
                str(o).split("=", 1)[0].strip() == "posttrain.init_from" for o in method.get("overrides", [])):
            raise StudyError(f"{where}.method.overrides: posttrain.init_from is set by init_from_row; give one of them "
                             f"[{src}]")
        group = str(r.get("group") or name.split("-", 1)[0])
        rows[name] = Row(name, group, data[r["data"]], method, train, ev, kind, merged, mixture)
    for name, row in rows.items():
        same = str(row.method.get("steps", ""))
        if row.kind == "lerobot" and same.startswith("same_as:"):
            ref = rows.get(same[len("same_as:"):])
            if ref is None or ref.kind != "chunkpolicy":
                raise StudyError(f"rows.{name}.method.steps: {same!r} must name a chunkpolicy training row of this "
                                 f"study ({sorted(n for n, r in rows.items() if r.kind == 'chunkpolicy')}) [{src}]")
        if row.kind == "from_row":
            src_row = rows.get(row.method["from_row"])
            if src_row is None or src_row.kind == "from_row":
                raise StudyError(f"rows.{name}.method.from_row: {row.method['from_row']!r} must be a training row of "
                                 f"this study ({sorted(n for n, r in rows.items() if r.kind != 'from_row')}) [{src}]")
            if src_row.data.name != row.data.name:
                raise StudyError(f"rows.{name}.data: {row.data.name!r} differs from its from_row's data "
                                 f"{src_row.data.name!r} [{src}]")
        if row.method.get("init_from_row") is not None:
            _check_init_chain(rows, name, src)
    return Study(str(raw["name"]), p, out_dir, results_dir, rows, data, _comparisons(raw.get("comparisons"), rows, src))


def _comparisons(items: Any, rows: dict[str, Row], src: str) -> tuple[Comparison, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise StudyError(f"comparisons: expected a list of {{a: ROW, b: ROW, target_points: P}} [{src}]")
    out = []
    for i, item in enumerate(items):
        where = f"comparisons.{i}"
        c = _keys(item, COMPARISON_KEYS, where, src)
        for k in ("a", "b"):
            if c.get(k) not in rows:
                raise StudyError(f"{where}.{k}: {c.get(k)!r} is not a row of this study [{src}]")
        ra, rb = rows[c["a"]], rows[c["b"]]
        # a paired difference needs the same episodes: same tasks (data) and the same seeds and count
        for what, x, y in (("data", ra.data.name, rb.data.name), ("eval.seed", ra.eval.get("seed"), rb.eval.get("seed")),
                           ("eval.episodes", ra.eval.get("episodes"), rb.eval.get("episodes"))):
            if x != y:
                raise StudyError(f"{where}: rows {c['a']} and {c['b']} are not evaluated on the same episodes "
                                 f"({what} {x!r} vs {y!r}) [{src}]")
        t = c.get("target_points")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise StudyError(f"{where}.target_points: expected a number of success points, got {t!r} [{src}]")
        out.append(Comparison(str(c["a"]), str(c["b"]), None if t is None else float(t)))
    return tuple(out)
