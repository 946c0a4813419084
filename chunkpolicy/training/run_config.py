"""A run's ``config.yaml``: the full experiment config, rewritten at each start; on resume, the differences from the
saved one are printed as a warning (the run continues with the new config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["write_run_config", "config_diff"]


def write_run_config(run_dir: Path, config: Mapping[str, Any], resume: bool) -> None:
    import yaml

    path = run_dir / "config.yaml"
    new = yaml.safe_dump(config, sort_keys=False)
    if path.exists() and resume:
        old = yaml.safe_load(path.read_text()) or {}
        diffs = config_diff(old, config)
        if diffs:
            print("warning: config differs from the run's saved config.yaml: " + ", ".join(diffs[:10]))
    path.write_text(new)


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """``dotted.key: old -> new`` for each leaf that differs between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]
