"""Integrity check and repair of an :class:`~chunkpolicy.data.store.EpisodeStore` (``chunkpolicy data verify``).

:func:`verify` reads every committed chunk (presence, crc32c checksum, decode), checks shapes, dtypes, the episode
index, NaN/inf and stats freshness, and returns a :class:`VerifyReport` naming each problem's key and episodes; it
changes nothing. :func:`repair_tail` drops only a contiguous tail of damaged episodes (what a crash or a lost write leaves)
in one atomic commit and never rewrites data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from chunkpolicy.data.store import NUMERIC_KEYS, EpisodeStore, StoreCorruptError

__all__ = ["VerifyReport", "verify", "repair_tail", "verify_store"]


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` (each a line naming the key), ``notes`` (not errors),
    ``damaged`` (episode indices the problems touch) and ``global_problems`` (not tied to episodes)."""

    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged: set[int] = field(default_factory=set)
    global_problems: list[str] = field(default_factory=list)
    stats_problems: list[str] = field(default_factory=list)
    num_episodes: int = 0

    def add(self, msg: str, episodes: set[int] | None = None, stats: bool = False) -> None:
        msg = msg.split("; run `chunkpolicy data verify")[0]  # the reader's hint, pointless in verify's own report
        self.problems.append(msg)
        if stats:
            self.stats_problems.append(msg)
        elif episodes:
            self.damaged |= set(episodes)
        else:
            self.global_problems.append(msg)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: EpisodeStore, image_batch: int = 256) -> VerifyReport:
    """Check every committed chunk (presence, checksum, decode), shapes, dtypes, episode index, NaN/inf and stats
    freshness. Returns a :class:`VerifyReport`; nothing is changed."""
    rep = VerifyReport(str(store.path), num_episodes=store.num_episodes)
    if not store.checksummed:
        rep.notes.append(f"format v{store.format_version} store: no checksums (old store), and a missing chunk reads "
                         "as zeros (v1 skipped all-zero chunks): bit flips and lost chunks cannot be detected")
    E, n = store.num_episodes, store.num_frames
    if E == 0:
        rep.notes.append("empty store (0 episodes)")
    root = store._root()
    # episode index (loading already refused non-increasing ends, short meta arrays and out-of-range task indices)
    if len(store._episode_seed) != E:
        rep.add(f"meta/episode_seed: {len(store._episode_seed)} entries for {E} episodes")
    # shapes and dtypes
    expect = {"action": ((store.spec.action_dim,), "float32"), "state": ((store.spec.state_dim,), "float32")}
    expect.update({f"images/{c}": ((*store._image_shapes[c], 3), "uint8") for c in store.cameras})
    for key, (shape, dtype) in expect.items():
        arr = root[f"data/{key}"]
        if tuple(arr.shape[1:]) != tuple(shape) or str(arr.dtype) != dtype:
            rep.add(f"data/{key}: {arr.dtype} {list(arr.shape[1:])} per frame, expected {dtype} {list(shape)}")
        if arr.shape[0] > n:
            rep.notes.append(f"data/{key}: {arr.shape[0] - n} uncommitted frames past the end (left by an "
                             "interrupted append; ignored, overwritten by the next append)")
    # numeric chunks: presence, checksum, decode, NaN/inf
    for key in NUMERIC_KEYS:
        arr = store._open_array(f"data/{key}")
        if arr.shape[1] == 0:
            continue
        step = int(arr.chunks[0])
        for a in range(0, n, step):
            b = min(a + step, n)
            try:
                x = np.asarray(arr[a:b])
            except Exception as e:
                reason = "chunk file missing" if type(e).__name__ == "ChunkNotFoundError" else f"{type(e).__name__}: {str(e).splitlines()[0]}"
                rep.add(str(store._corrupt(key, a, b, f"c/{a // step}/0", reason)), _episodes_in(store, a, b))
                continue
            bad = ~np.isfinite(x)
            if bad.any():
                r, d = np.argwhere(bad)[0]
                f = a + int(r)
                rep.add(f"{key}: {int(bad.sum())} NaN/inf values, first at frame {f} dim {int(d)} "
                        f"({store._episodes_of_frames(f, f + 1)})",
                        {int(np.searchsorted(store.episode_ends, a + int(r2), side="right")) for r2 in np.nonzero(bad.any(1))[0]})
    # image chunks: through the reader training uses
    for c in store.cameras:
        key = f"images/{c}"
        for a in range(0, n, image_batch):
            b = min(a + image_batch, n)
            try:
                store.read_frames(key, np.arange(a, b))
            except StoreCorruptError:
                for i in range(a, b):
                    try:
                        store.read_frames(key, np.array([i]))
                    except StoreCorruptError as e:
                        rep.add(str(e), _episodes_in(store, i, i + 1))
    # stats
    status = store.stats_status()
    if status == "stale":
        rep.add(f"stats: stale (cover {store._stats_frames} frames, the store has {n}); recompute with "
                f"`chunkpolicy data stats {store.path}`", stats=True)
    elif status == "unknown":
        try:
            store.stats
            rep.notes.append("stats: saved by format v1 without a frame count; they match the data")
        except ValueError as e:
            rep.add(f"stats: {e}", stats=True)
    elif status == "none":
        rep.notes.append("stats: not computed")
    return rep

def _episodes_in(store: EpisodeStore, a: int, b: int) -> set[int]:
    ends = store.episode_ends
    e0 = int(np.searchsorted(ends, a, side="right"))
    e1 = int(np.searchsorted(ends, b - 1, side="right"))
    return set(range(e0, min(e1, store.num_episodes - 1) + 1))

def repair_tail(store: EpisodeStore, report: VerifyReport) -> int:
    """Drop the damaged tail episodes ``report`` found, in one atomic commit; returns how many were dropped.

    Only a contiguous tail of damaged episodes is dropped (what a crash or a lost write leaves at the end); damage
    anywhere else, or damage not tied to episodes, is refused with ValueError: repair never drops a good episode
    and never rewrites data. Saved stats are marked stale in the same commit.
    """
    if report.global_problems:
        raise ValueError(f"{store.path}: cannot repair: problems not tied to episodes: {report.global_problems}")
    bad = sorted(report.damaged)
    if not bad:
        return 0
    k = bad[0]
    if bad != list(range(k, store.num_episodes)):
        raise ValueError(
            f"{store.path}: cannot repair: damaged episodes {bad} are not a contiguous tail of the "
            f"{store.num_episodes} episodes; --repair only drops incomplete tail episodes; re-create the store "
            f"(re-import or re-collect) instead")
    with store.write_lock():
        store._reload()
        if store.num_episodes != report.num_episodes:
            raise ValueError(f"{store.path}: changed since it was verified ({report.num_episodes} -> "
                             f"{store.num_episodes} episodes); verify again")
        dropped = store.num_episodes - k
        store._root().attrs.update({"num_episodes": k, "stats_stale": bool(store._stats)})
        store._reload()
    return dropped


def verify_store(path: str | os.PathLike, repair: bool = False) -> tuple[VerifyReport, int]:
    """Verify a store (see :func:`verify`); with ``repair``, drop damaged tail episodes and verify again.
    Returns ``(report, dropped)``. A store that does not even open is one problem in the report."""
    try:
        store = EpisodeStore.open(path, mode="a" if repair else "r")
    except (ValueError, KeyError) as e:
        rep = VerifyReport(str(path))
        rep.add(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
        return rep, 0
    rep, dropped = verify(store), 0
    if repair and rep.damaged:
        dropped = repair_tail(store, rep)
        rep = verify(store)
    return rep, dropped
