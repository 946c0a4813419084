"""A run's ``metrics.jsonl``: one JSON record per event (train / val / probe / rollback / stop), written by the main
process, mirrored to the experiment trackers, cut back on resume, drawn as ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chunkpolicy.atomic import atomic_file
from chunkpolicy.training.plots import plot_losses, read_metrics

__all__ = ["MetricsLog"]


class MetricsLog:
    """``run_dir/metrics.jsonl`` and ``run_dir/loss.png``; on other processes than the main one it writes nothing.
    ``trackers``: a :class:`~chunkpolicy.training.trackers.Trackers` that gets every record (set once they start)."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss.png"
        self.title = run_dir.name
        self.is_main = is_main
        self.trackers: Any = None
        self.plotted_at: int | None = None  # the step loss.png was last drawn at, by a checkpoint

    def record(self, rec: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.trackers is not None:
                self.trackers.log_record(rec)

    def truncate(self, step: int) -> None:
        """Drop the records past ``step`` (a resumed run repeats the steps after its checkpoint)."""
        if self.is_main and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def plot(self) -> Path | None:
        try:
            return plot_losses(self.path, self.png, title=self.title)
        except Exception as e:  # a plot never stops training
            print(f"warning: could not write loss.png: {e}")
            return None
