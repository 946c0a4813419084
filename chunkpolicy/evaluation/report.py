"""Evaluation reports: per-task success with 95% Wilson intervals as JSON, a markdown table and a PNG bar chart.

Input is a mapping ``{method: {task: [bool per episode]}}`` (e.g. the trained policy and a do-nothing baseline), so the
same report puts several methods side by side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from chunkpolicy.atomic import atomic_file
from chunkpolicy.evaluation.stats import wilson_interval


def summarize(results: Mapping[str, Mapping[str, Sequence[bool]]]) -> dict:
    """``{method: {"tasks": {task: {successes, n, rate, ci95}}, "mean": {...}}}``.

    The mean row pools episodes over tasks (each task weighted by its episode count).
    """
    out: dict = {}
    for method, per_task in results.items():
        tasks, tot_s, tot_n = {}, 0, 0
        for task, eps in per_task.items():
            s, n = int(sum(bool(e) for e in eps)), len(eps)
            if n == 0:
                raise ValueError(f"results[{method!r}][{task!r}]: no episodes")
            lo, hi = wilson_interval(s, n)
            tasks[task] = {"successes": s, "n": n, "rate": s / n, "ci95": [lo, hi]}
            tot_s, tot_n = tot_s + s, tot_n + n
        lo, hi = wilson_interval(tot_s, tot_n)
        out[method] = {"tasks": tasks, "mean": {"successes": tot_s, "n": tot_n, "rate": tot_s / tot_n, "ci95": [lo, hi]}}
    return out


def markdown_table(summary: Mapping[str, dict]) -> str:
    """Tasks as rows, methods as columns: ``rate% [lo, hi]``, then the mean row."""
    methods = list(summary)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in summary[m]["tasks"] if t not in tasks]

    def cell(d: dict | None) -> str:
        if d is None:
            return "—"
        lo, hi = d["ci95"]
        return f"{100 * d['rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={d['n']})"

    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(summary[m]["tasks"].get(t)) for m in methods) + " |")
    lines.append("| **mean** | " + " | ".join(cell(summary[m]["mean"]) for m in methods) + " |")
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
