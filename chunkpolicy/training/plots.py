"""Loss curves from ``metrics.jsonl`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chunkpolicy.atomic import atomic_file


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_losses(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path:
    """Train loss (per log interval) and validation loss against the optimizer step (log y-axis for wide ranges)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    # a record whose steps were all skipped by the non-finite guard has loss None
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "val" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val (EMA)" if any(r.get("ema") for r in recs if r.get("kind") == "val") else "val", ms=4)
    ys = [y for _, y in train + val]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 5:  # log only when the losses span a wide range
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3, which="both")
    if train or val:
        ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
