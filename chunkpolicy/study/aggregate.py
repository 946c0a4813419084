"""``chunkpolicy study aggregate DIR``: the study's tables and plots from the row results JSON files in ``DIR``.

Writes into ``--out`` (default ``DIR``):

* ``STUDY.md``: the total GPU cost, then per group (``4a``, ``4b``, ...) one summary table (method, executor, data,
  training steps and minutes, GPU-minutes, chunk latency, mean success with its 95% Wilson interval, the command) and
  per env of the group one per-task table (tasks as rows, the group's rows as columns: ``rate% [lo, hi] (n)``).
* ``success_<group>_<env>.png``: success bars with Wilson intervals per task and the mean, one colour per row.
* ``steps_<group>_<env>.png`` (when a row evaluated several checkpoints): mean success vs training steps, one line per
  row, the 95% interval as a band.
* with ``--study FILE`` (its ``comparisons``) or ``--compare A:B``: a table of paired differences, row A − row B on
  the same episodes (matched by task and seed), with Newcombe's 95% interval, McNemar's exact p and, where the study
  states a target in points, whether it is met (the whole interval at or above it), not met (the whole interval
  below it) or not established.

Every file is written atomically. A JSON file in ``DIR`` that is not a row result (no ``row`` / ``success`` keys) is
skipped and listed; an unreadable one is an error naming it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from chunkpolicy.atomic import atomic_file, read_json
from chunkpolicy.study.config import Comparison, load_study
from chunkpolicy.success_rate import paired_difference

__all__ = ["load_rows", "aggregate", "summary_table", "task_table", "compare_rows", "comparison_table"]


def load_rows(directory: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Row results in ``directory`` (sorted by group, then row name) and the JSON files that are not row results."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory of study results")
    rows, skipped = [], []
    for p in sorted(d.glob("*.json")):
        doc = read_json(p)  # corrupt JSON: one error naming the file
        if isinstance(doc, dict) and "row" in doc and "success" in doc:
            doc["_file"] = str(p)
            rows.append(doc)
        else:
            skipped.append(str(p))
    rows.sort(key=lambda r: (str(r.get("group")), str(r["row"])))
    return rows, skipped


def _pct(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    lo, hi = d["ci95"]
    return f"{100 * d['rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={d['n']})"


def _num(x: Any, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per row: method, executor, data, steps, minutes, GPU-minutes, latency, mean success, the rate of
    chunks a head could not produce (tokens heads; ``—`` for heads that cannot fail), command."""
    lines = ["| row | method | executor | data | steps | train min | GPU-min | chunk ms, median: eager / CUDA graph | mean success "
             "| invalid decodes | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, lat = r.get("train") or {}, r.get("latency") or {}
        gpu = "shared with " + t["source_row"] if t.get("source_row") else _num(r.get("gpu_minutes"))
        if int(r.get("gpu_shared_by") or 1) > 1:  # minutes and latency measured beside other rows on the GPU
            gpu += f" (GPU shared by {r['gpu_shared_by']} rows)"
        init = t.get("init_from") or {}
        if init.get("trained_now") and not t.get("source_row"):
            gpu += f" (incl. {init['row']}'s training)"
        data = r.get("data") or {}
        mix = [d["name"] for d in t.get("datasets") or []]
        data_txt = (f"{'+'.join(mix)} (eval: {data.get('name', '')})" if len(mix) > 1
                    else f"{data.get('name', '')} ({data.get('episodes', '?')} demos)")
        graph = lat.get("cuda_graph") or {}
        lat_txt = _num(lat.get("median_ms"), "{:.2f}") + (f" / {graph['median_ms']:.2f}" if "median_ms" in graph else " / —")
        mean = r["success"]["mean"]
        bad = (f"{100 * mean['invalid_rate']:.1f}% ({mean['invalid_chunks']}/{mean['chunks']})"
               if mean.get("invalid_rate") is not None else "—")
        lines.append(
            f"| {r['row']} | {r.get('label', '')} | {r['eval']['executor']} | {data_txt} "
            f"| {t.get('steps', '—')} | {_num(t.get('train_minutes'))} | {gpu} | "
            f"{lat_txt} | **{_pct(mean)}** | {bad} | `{r.get('command', '')}` |")
    return "\n".join(lines)


def task_table(rows: Sequence[dict[str, Any]]) -> str:
    """Tasks as rows, study rows as columns, then the mean."""
    tasks: list[str] = []
    for r in rows:
        tasks += [t for t in r["success"]["tasks"] if t not in tasks]
    head = "| task | " + " | ".join(f"{r['row']}" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(_pct(r["success"]["tasks"].get(t)) for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_pct(r['success']['mean'])}**" for r in rows) + " |")
    return "\n".join(lines)


def _outcomes(r: dict[str, Any]) -> dict[tuple[str, int], bool]:
    eps = r.get("episodes")
    if not eps:
        raise ValueError(f"{r.get('_file', r['row'])}: no per-episode outcomes ('episodes'), which a paired comparison "
                         "needs")
    return {(str(e["task"]), int(e["seed"])): bool(e["success"]) for e in eps}


def compare_rows(rows: Sequence[dict[str, Any]], comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """Per comparison: ``{"a", "b", "target_points", "missing"}`` plus, when both rows have results, the paired
    difference (:func:`~chunkpolicy.success_rate.paired_difference` over the episodes matched by task and seed, in
    fractions), both mean rates and ``verdict``: met (the whole interval at or above the target), not met (the whole
    interval below it), not established, or None (no target, or a row without results). Rows whose episodes differ
    are an error naming both."""
    by_name = {r["row"]: r for r in rows}
    out = []
    for c in comparisons:
        res: dict[str, Any] = {"a": c.a, "b": c.b, "target_points": c.target_points, "verdict": None,
                               "missing": [x for x in (c.a, c.b) if x not in by_name]}
        out.append(res)
        if res["missing"]:
            continue
        oa, ob = _outcomes(by_name[c.a]), _outcomes(by_name[c.b])
        if oa.keys() != ob.keys():
            raise ValueError(f"comparison {c.a} − {c.b}: the rows ran different episodes ({len(oa.keys() - ob.keys())} "
                             f"only in {c.a}, {len(ob.keys() - oa.keys())} only in {c.b}); a paired difference needs "
                             "the same tasks and seeds")
        keys = sorted(oa)
        res.update(paired_difference([oa[k] for k in keys], [ob[k] for k in keys]))
        res["rate_a"], res["rate_b"] = (by_name[x]["success"]["mean"]["rate"] for x in (c.a, c.b))
        lo, hi = (100 * x for x in res["ci95"])
        res["verdict"] = None if c.target_points is None else (
            "met" if lo >= c.target_points else "not met" if hi < c.target_points
            else "not established (the interval holds the target)")
    return out


def _diff_text(res: dict[str, Any]) -> str:
    lo, hi = (100 * x for x in res["ci95"])
    return f"{100 * res['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def comparison_table(rows: Sequence[dict[str, Any]], comparisons: Sequence[Comparison]) -> str:
    """One line per comparison (:func:`compare_rows`): success of row a − row b in points with its 95% interval, the
    episodes only one of them solved, McNemar's p, the target and the verdict; a row without results yet is listed
    as such."""
    return _comparison_lines(compare_rows(rows, comparisons))


def _comparison_lines(compared: Sequence[dict[str, Any]]) -> str:
    lines = ["| a − b | a | b | difference, points [95% CI] | solved by a only / b only (of n) | McNemar p | target "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for res in compared:
        target = "—" if res["target_points"] is None else f"≥ {res['target_points']:+g}"
        name = f"{res['a']} − {res['b']}"
        if res["missing"]:
            lines.append(f"| {name} | | | not run yet: {', '.join(res['missing'])} | | | {target} | — |")
            continue
        lines.append(f"| {name} | {100 * res['rate_a']:.1f}% | {100 * res['rate_b']:.1f}% | **{_diff_text(res)}** | "
                     f"{res['only_a']} / {res['only_b']} (of {res['n']}) | {res['p_value']:.2g} | {target} | "
                     f"{res['verdict'] or '—'} |")
    return "\n".join(lines)


def _steps_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        pts = sorted(r["success_vs_steps"], key=lambda e: e["step"])
        x = [e["step"] for e in pts]
        y = [e["mean"]["rate"] for e in pts]
        ax.plot(x, y, marker="o", label=r["row"])
        ax.fill_between(x, [e["mean"]["ci95"][0] for e in pts], [e["mean"]["ci95"][1] for e in pts], alpha=0.2)
    ax.set_xlabel("training steps")
    ax.set_ylabel("mean success")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def aggregate(directory: str | os.PathLike, out: str | os.PathLike | None = None,
              comparisons: Sequence[Comparison] = ()) -> dict[str, Any]:
    """Build ``STUDY.md`` and the PNGs (see the module docstring); returns ``{"markdown", "plots", "rows",
    "skipped", "gpu_minutes", "comparisons"}`` (the last: :func:`compare_rows` of ``comparisons``)."""
    from chunkpolicy.evaluation.report import bar_chart

    rows, skipped = load_rows(directory)
    if not rows:
        raise ValueError(f"{directory}: no row results (*.json with 'row' and 'success'); run `chunkpolicy study run` first")
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(float(r.get("gpu_minutes") or 0.0) / int(r.get("gpu_shared_by") or 1) for r in rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("group")), []).append(r)
    md = [f"# Study results ({len(rows)} rows)", "",
          f"Total GPU cost of these rows: **{total:.1f} GPU-minutes** ({total / 60:.2f} GPU-hours; training + "
          "evaluation; a row that reuses another row's checkpoint counts only its evaluation; a row that ran while n rows "
          "shared the GPU counts 1/n of its minutes, an approximation). Success: 95% Wilson "
          "intervals. Commits: " + ", ".join(sorted({str((r.get('git') or {}).get('commit') or '?')[:7]
                                                      + ('+dirty' if (r.get('git') or {}).get('dirty') else '')
                                                      for r in rows})) + ".", ""]
    plots: list[str] = []
    for g, grows in groups.items():
        md += [f"## {g}", "", summary_table(grows), ""]
        by_env: dict[str, list[dict[str, Any]]] = {}
        for r in grows:
            by_env.setdefault(str(r.get("env")), []).append(r)
        for env, erows in by_env.items():
            md += [f"### {g} · {env}: success per task", "", task_table(erows), ""]
            png = out / f"success_{g}_{env}.png"
            summary = {r["row"]: r["success"] for r in erows}
            tmp_png = png.with_name(f".{png.name}.tmp.png")
            bar_chart(summary, tmp_png, title=f"{g} · {env}: success (95% Wilson CI)")
            os.replace(tmp_png, png)
            plots.append(str(png))
            md += [f"![{g} {env}]({png.name})", ""]
            multi = [r for r in erows if len(r.get("success_vs_steps") or []) > 1]
            if multi:
                sp = _steps_plot(multi, out / f"steps_{g}_{env}.png", f"{g} · {env}: success vs training steps")
                plots.append(str(sp))
                md += [f"![{g} {env} steps]({sp.name})", ""]
    compared = compare_rows(rows, comparisons) if comparisons else []
    if comparisons:
        md += ["## Paired comparisons", "",
               "Row a − row b on the same evaluation episodes (matched by task and seed), in success points: Newcombe's "
               "95% interval for paired proportions and McNemar's exact test; a target is met when the whole interval "
               "is at or above it.", "", _comparison_lines(compared), ""]
    if skipped:
        md += ["Files in the results folder that are not row results: " + ", ".join(Path(s).name for s in skipped), ""]
    text = "\n".join(md)
    with atomic_file(out / "STUDY.md") as tmp:
        tmp.write_text(text)
    return {"markdown": str(out / "STUDY.md"), "plots": plots, "rows": [r["row"] for r in rows], "skipped": skipped,
            "gpu_minutes": total, "comparisons": compared}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chunkpolicy study aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder of row results (the study's results_dir)")
    p.add_argument("--out", default=None, help="where STUDY.md and the PNGs go (default: DIR)")
    p.add_argument("--study", default=None, help="study YAML whose `comparisons` are tabulated")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="also compare row A with row B (paired, same episodes); repeatable")
    a = p.parse_args(argv)
    comps = list(load_study(a.study).comparisons) if a.study else []
    for spec in a.compare:
        x, sep, y = spec.partition(":")
        if not (sep and x and y):
            raise ValueError(f"--compare: expected ROW_A:ROW_B, got {spec!r}")
        comps.append(Comparison(x, y))
    res = aggregate(a.dir, a.out, comps)
    print(f"{len(res['rows'])} rows, {res['gpu_minutes']:.1f} GPU-minutes: wrote {res['markdown']} and "
          f"{len(res['plots'])} plots")
    done = [c for c in res["comparisons"] if not c["missing"]]
    if res["comparisons"]:
        print(f"paired comparisons (a − b, points [95% CI]): {len(done)} of {len(res['comparisons'])} have both rows")
    for c in done:
        target = "" if c["target_points"] is None else f"  target ≥ {c['target_points']:+g}: {c['verdict']}"
        print(f"  {c['a']} − {c['b']}: {_diff_text(c)}, p = {c['p_value']:.2g}{target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
