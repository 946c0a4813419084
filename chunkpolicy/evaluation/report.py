"""Evaluation reports: per-task success with 95% Wilson intervals as JSON, a markdown table and a PNG bar chart.

Input is a mapping ``{method: {task: [bool per episode]}}`` (e.g. the trained policy and a do-nothing baseline), so the
same report puts several methods side by side. Methods whose head may fail to produce a chunk (the ``tokens`` head's
invalid token decodes) also pass ``{method: {task: (invalid_chunks, chunks)}}``: the summary then carries the
invalid-decode rate per task and overall, and the table shows it in its own column (also when it is 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from chunkpolicy.atomic import atomic_file
from chunkpolicy.success_rate import wilson_interval


def _invalid(bad: int, chunks: int) -> dict:
    return {"invalid_chunks": bad, "chunks": chunks, "invalid_rate": bad / chunks if chunks else None}


def summarize(results: Mapping[str, Mapping[str, Sequence[bool]]],
              invalid: Mapping[str, Mapping[str, tuple[int, int]]] | None = None) -> dict:
    """``{method: {"tasks": {task: {successes, n, rate, ci95}}, "mean": {...}}}``.

    The mean row pools episodes over tasks (each task weighted by its episode count). ``invalid[method][task] =
    (invalid_chunks, chunks)`` adds ``invalid_chunks, chunks, invalid_rate`` (pooled over chunks in the mean row) to
    that method's entries; every task of such a method needs its counts.
    """
    out: dict = {}
    invalid = invalid or {}
    for method, per_task in results.items():
        tasks, tot_s, tot_n, tot_bad, tot_c = {}, 0, 0, 0, 0
        counts = invalid.get(method)
        for task, eps in per_task.items():
            s, n = int(sum(bool(e) for e in eps)), len(eps)
            if n == 0:
                raise ValueError(f"results[{method!r}][{task!r}]: no episodes")
            lo, hi = wilson_interval(s, n)
            tasks[task] = {"successes": s, "n": n, "rate": s / n, "ci95": [lo, hi]}
            tot_s, tot_n = tot_s + s, tot_n + n
            if counts is not None:
                if task not in counts:
                    raise ValueError(f"invalid[{method!r}]: no chunk counts for task {task!r}")
                bad, c = (int(x) for x in counts[task])
                if not 0 <= bad <= c:
                    raise ValueError(f"invalid[{method!r}][{task!r}]: need 0 <= invalid_chunks <= chunks, got {bad}, {c}")
                tasks[task].update(_invalid(bad, c))
                tot_bad, tot_c = tot_bad + bad, tot_c + c
        lo, hi = wilson_interval(tot_s, tot_n)
        out[method] = {"tasks": tasks, "mean": {"successes": tot_s, "n": tot_n, "rate": tot_s / tot_n, "ci95": [lo, hi]}}
        if counts is not None:
            out[method]["mean"].update(_invalid(tot_bad, tot_c))
    return out


def invalid_counts(records: Sequence[Mapping]) -> dict[str, tuple[int, int]]:
    """``{task: (invalid_chunks, chunks)}`` summed over episode records
    (:func:`~chunkpolicy.evaluation.rollout.evaluate`)."""
    out: dict[str, tuple[int, int]] = {}
    for r in records:
        bad, c = out.get(r["task"], (0, 0))
        out[r["task"]] = (bad + int(r["invalid_chunks"]), c + int(r["chunks"]))
    return out


def markdown_table(summary: Mapping[str, dict]) -> str:
    """Tasks as rows, methods as columns: ``rate% [lo, hi]``, then the mean row. A method with invalid-decode counts
    (see :func:`summarize`) gets a second column ``<method> invalid decodes``: ``rate% (invalid/chunks)``."""
    methods = list(summary)
    counted = [m for m in methods if "invalid_chunks" in summary[m]["mean"]]
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in summary[m]["tasks"] if t not in tasks]

    def cell(d: dict | None) -> str:
        if d is None:
            return "—"
        lo, hi = d["ci95"]
        return f"{100 * d['rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={d['n']})"

    def bad(d: dict | None) -> str:
        if d is None or d["invalid_rate"] is None:
            return "—"
        return f"{100 * d['invalid_rate']:.1f}% ({d['invalid_chunks']}/{d['chunks']})"

    def row(label: str, get) -> str:
        return f"| {label} | " + " | ".join([cell(get(m)) for m in methods] + [bad(get(m)) for m in counted]) + " |"

    heads = methods + [f"{m} invalid decodes" for m in counted]
    lines = ["| task | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for t in tasks:
        lines.append(row(t, lambda m: summary[m]["tasks"].get(t)))  # noqa: B023 (called at once)
    lines.append(row("**mean**", lambda m: summary[m]["mean"]))
    return "\n".join(lines)


def bar_chart(summary: Mapping[str, dict], path: str | os.PathLike, title: str = "success rate (95% Wilson CI)") -> Path:
    """Grouped bars per task (plus the mean), one colour per method, error bars = Wilson interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(summary)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in summary[m]["tasks"] if t not in tasks]
    labels = tasks + ["mean"]
    x, width = np.arange(len(labels)), 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) * max(1, len(methods)) / 2 + 2), 3.5))
    for i, m in enumerate(methods):
        rows = [summary[m]["tasks"].get(t) for t in tasks] + [summary[m]["mean"]]
        rate = np.array([r["rate"] if r else np.nan for r in rows])
        lo = np.array([r["rate"] - r["ci95"][0] if r else 0 for r in rows])
        hi = np.array([r["ci95"][1] - r["rate"] if r else 0 for r in rows])
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, rate, width, yerr=[lo, hi], capsize=3, label=m)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """Write JSON to a temp file in the same folder, then rename (never a half-written results file)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
    return path
