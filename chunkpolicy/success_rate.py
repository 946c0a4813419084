"""Success-rate statistics."""

from __future__ import annotations

import math
from typing import Any, Sequence


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z = 1.96); ``(0, 0)`` is never returned for n > 0."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> dict[str, Any]:
    """Success of method A minus method B on the same episodes (same tasks and seeds, one outcome each).

    Pairing removes the episodes' own difficulty from the comparison, so it is sharper than two independent intervals.
    Returns ``{"n", "both", "only_a", "only_b", "neither", "diff", "ci95", "p_value"}``: ``diff`` = rate A − rate B
    (fraction, not points), ``ci95`` its interval by Newcombe's method 10 for paired proportions (square-and-add of the
    two Wilson intervals, corrected by the correlation of the outcomes; it stays inside [-1, 1] and is sound at rates
    near 0 or 1), ``p_value`` McNemar's exact two-sided test (the discordant pairs against a fair coin; 1.0 when there
    are none).
    """
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired outcomes: {len(a)} for A and {len(b)} for B; pairs need the same episodes")
    n = len(a)
    if n == 0:
        raise ValueError("paired outcomes: no episodes")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, z)
    lb, ub = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    phi = (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0
    d = pa - pb
    lo = d - math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    hi = d + math.sqrt(max(0.0, (ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2))
    disc = only_a + only_b
    p = float(binomtest(only_a, disc, 0.5).pvalue) if disc else 1.0
    return {"n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": neither, "diff": d,
            "ci95": (max(-1.0, lo), min(1.0, hi)), "p_value": p}
