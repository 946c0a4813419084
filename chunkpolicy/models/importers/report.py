"""What an import did: tensors mapped (source key → our key), tensors left out (with the reason), settings taken
from the source, and what had to be assumed because the source does not record it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImportReport:
    src: Path
    out: Path | None = None
    fmt: str = ""
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (source key, our key)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (source key or setting, why)
    settings: list[tuple[str, str]] = field(default_factory=list)  # (our setting, from where / value)
    assumed: list[str] = field(default_factory=list)  # values the source does not record
    notes: list[str] = field(default_factory=list)  # disagreements inside the source and how they were resolved

    def summary(self, max_keys: int = 6) -> str:
        """Human-readable report; key lists are grouped by their first components."""
        lines = [f"import {self.fmt}: {self.src} -> {self.out}"]
        lines.append(f"mapped {len(self.mapped)} tensors:")
        for (s, d), n in _groups(self.mapped).items():
            lines.append(f"  {s}.* -> {d}.*  ({n})")
        if self.left_out:
            lines.append(f"left out {len(self.left_out)}:")
            for k, why in self.left_out:
                lines.append(f"  {k}: {why}")
        if self.settings:
            lines.append("settings:")
            lines.extend(f"  {k} = {v}" for k, v in self.settings)
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  {n}" for n in self.notes)
        if self.assumed:
            lines.append("assumed (not recorded in the source):")
            lines.extend(f"  {a}" for a in self.assumed)
        return "\n".join(lines)


def _groups(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Count mapped pairs by (source prefix, our prefix), cutting keys before their first numbered component."""
    out: dict[tuple[str, str], int] = {}

    def cut(k: str) -> str:
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[:i])
        return ".".join(parts[:-1])

    for s, d in pairs:
        key = (cut(s), cut(d))
        out[key] = out.get(key, 0) + 1
    return out
