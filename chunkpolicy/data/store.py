"""Zarr v3 episode store: per-key arrays concatenated over time plus episode boundaries.

Layout of ``STORE.zarr``::

    zarr.json                 attributes: format_version, embodiment (spec dict), fps, tasks, num_episodes, stats
    data/action               float32 [N, A]
    data/state                float32 [N, S]
    data/images/<camera>      uint8 [N, h, w, 3], one compressed chunk per frame (one frame = one read)
    meta/episode_ends         int64 [E]   exclusive end frame of each episode
    meta/episode_task         int32 [E]   index into the `tasks` attribute
    meta/episode_seed         int64 [E]   seed that produced the episode (-1 if unknown)

Crash safety: an append writes frames and per-episode metadata first and then commits by rewriting the root attributes
(``num_episodes``, ``tasks``) in one atomic file write (zarr's local store writes to a temp file and renames). Readers
trust only ``num_episodes``; the next append truncates anything an interrupted append left past the committed end.

One writer at a time: every write (append, saved stats, repair) holds an advisory ``fcntl.flock`` on ``.write.lock``
inside the store across its read-modify-commit. A second writer waits up to ``lock_timeout`` seconds (default 600, env
``CHUNKPOLICY_STORE_LOCK_TIMEOUT``; 0 = fail at once) and then fails with :class:`StoreLockedError` naming the store and
the holder's pid. Readers never take the lock (they see the last commit).

Integrity (format v2): every chunk inside the committed range exists (arrays are written with
``write_empty_chunks=True``, and read with ``read_missing_chunks=False``), and every chunk ends with a zarr v3
``crc32c`` checksum. A missing, truncated or bit-flipped chunk is one :class:`StoreCorruptError` naming the store, the
key, the chunk and the episodes/frames it holds, from the fast frame reader and the numeric/meta readers alike. Format
v1 stores (before checksums) still open and read as before: no checksums, and a missing chunk reads as zeros (v1 skipped
all-zero chunks, so it cannot be told from data); ``chunkpolicy data verify`` says so.

Checking and repairing a store (``chunkpolicy data verify [--repair]``): :mod:`chunkpolicy.data.store_verify`.

Stats: ``stats`` are saved with the frame count they cover (``stats_frames``); an append or a repair marks them stale
in its commit (``stats_stale``), and :attr:`EpisodeStore.stats` on stale stats raises, saying to recompute.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from chunkpolicy.atomic import FileLock, LockTimeout, atomic_dir
from chunkpolicy.normalize import compute_stats, stats_from_json, stats_to_json
from chunkpolicy.spaces import EmbodimentSpec

FORMAT_NAME = "chunkpolicy.episode_store"
FORMAT_VERSION = 2  # 2: crc32c per chunk and empty chunks written (see the module docstring); 1 still opens
SUPPORTED_FORMAT_VERSIONS = (1, 2)
LOCK_FILE = ".write.lock"
_CRC_BYTES = 4
_BLOSC_MAX_OVERHEAD = 16  # bytes of header Blosc adds to a chunk that does not compress
NUMERIC_KEYS = ("action", "state")
_META_CHUNK = 4096
_NUMERIC_CHUNK = 8192


IMAGE_CODECS = ("lz4", "zstd")


class StoreCorruptError(ValueError):
    """A chunk inside the committed range of a store is missing, truncated, fails its checksum or does not decode."""


class StoreLockedError(TimeoutError):
    """Another process holds the store's write lock for longer than the caller was willing to wait."""


def _default_lock_timeout() -> float:
    return float(os.environ.get("CHUNKPOLICY_STORE_LOCK_TIMEOUT", "600"))


def _numeric_codecs() -> list:
    return [ZstdCodec(level=0), Crc32cCodec()]


def _image_codec(name: str) -> BloscCodec:
    """Blosc codec for image frames. ``lz4`` (default) decodes a 224x224 frame ~10x faster than ``zstd`` (~0.01 vs
    ~0.13 ms here) at a lower ratio; ``zstd`` when disk matters more than loading speed. No shuffle: uint8 pixels gain
    nothing from it."""
    if name not in IMAGE_CODECS:
        raise ValueError(f"image_codec must be one of {IMAGE_CODECS}, got {name!r}")
    return BloscCodec(cname=name, clevel=5 if name == "lz4" else 3, shuffle="noshuffle")


class EpisodeStore:
    """A store of episodes for one embodiment. Use :meth:`create` or :meth:`open`.

    Picklable: only the path and mode travel; each DataLoader worker reopens the zarr group lazily.
    Numeric keys (``action``, ``state``) are small and are read into memory once per process for fast windows.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", lock_timeout: float | None = None) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path, self.mode = Path(path), mode
        self.lock_timeout = _default_lock_timeout() if lock_timeout is None else float(lock_timeout)
        self._lock: FileLock | None = None  # held write lock
        self._group: zarr.Group | None = None
        self._cache: dict[str, np.ndarray] = {}
        self._arrays: dict[str, zarr.Array] = {}  # opening an array reads its metadata: do it once per process
        self._direct: dict[str, Path | None] = {}
        self._load_meta()

    # -- opening / creating ---------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        spec: EmbodimentSpec,
        fps: float,
        image_shapes: Mapping[str, tuple[int, int]] | None = None,
        overwrite: bool = False,
        image_codec: str = "lz4",
    ) -> "EpisodeStore":
        """Create an empty store. ``image_shapes`` maps every camera of ``spec`` to its ``(h, w)``.

        The store is built in a temp directory next to ``path`` and renamed into place, so a crash never leaves a
        half-created store (and ``overwrite`` replaces an old one only once the new one is complete).
        """
        path = Path(path)
        codec = _image_codec(image_codec)
        image_shapes = dict(image_shapes or {})
        if set(image_shapes) != set(spec.cameras):
            raise ValueError(
                f"image_shapes: cameras {sorted(image_shapes)} do not match the spec's cameras {sorted(spec.cameras)}"
            )
        for cam, hw in image_shapes.items():
            if len(hw) != 2 or min(hw) <= 0:
                raise ValueError(f"image_shapes[{cam!r}]: expected (h, w) > 0, got {hw!r}")
        if not (np.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive, got {fps!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        with atomic_dir(path) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            data = root.create_group("data")
            data.create_array("action", shape=(0, spec.action_dim), chunks=(_NUMERIC_CHUNK, max(spec.action_dim, 1)),
                              dtype="float32", compressors=_numeric_codecs())
            data.create_array("state", shape=(0, spec.state_dim), chunks=(_NUMERIC_CHUNK, max(spec.state_dim, 1)),
                              dtype="float32", compressors=_numeric_codecs())
            imgs = data.create_group("images")
            for cam in spec.cameras:
                h, w = (int(v) for v in image_shapes[cam])
                imgs.create_array(cam, shape=(0, h, w, 3), chunks=(1, h, w, 3), dtype="uint8",
                                  compressors=[codec, Crc32cCodec()])
            meta = root.create_group("meta")
            meta.create_array("episode_ends", shape=(0,), chunks=(_META_CHUNK,), dtype="int64", compressors=_numeric_codecs())
            meta.create_array("episode_task", shape=(0,), chunks=(_META_CHUNK,), dtype="int32", compressors=_numeric_codecs())
            meta.create_array("episode_seed", shape=(0,), chunks=(_META_CHUNK,), dtype="int64", compressors=_numeric_codecs())
            (tmp / LOCK_FILE).touch()
            root.attrs.update(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "embodiment": spec.to_dict(),
                    "fps": float(fps),
                    "tasks": [],
                    "num_episodes": 0,
                }
            )
        return cls(path, mode="a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", lock_timeout: float | None = None) -> "EpisodeStore":
        return cls(path, mode, lock_timeout)

    def _root(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r+" if self.mode == "a" else "r", zarr_format=3)
        return self._group

    # -- integrity helpers ----------------------------------------------------------------------------------------
    @property
    def checksummed(self) -> bool:
        """Format v2: chunks carry crc32c and every committed chunk exists (v1: neither)."""
        return self.format_version >= 2

    def _zarr_config(self) -> dict[str, Any]:
        # empty chunks are always written from now on (also into a v1 store); a missing chunk is an error in v2 stores
        return {"array.write_empty_chunks": True, "array.read_missing_chunks": not self.checksummed}

    def _open_array(self, arr_key: str) -> zarr.Array:
        with zarr.config.set(self._zarr_config()):  # an array takes its config when opened
            return self._root()[arr_key]

    def _episodes_of_frames(self, a: int, b: int) -> str:
        """``episode i, frame j`` / ``episodes i..k`` text for committed frames [a, b)."""
        ends = self.episode_ends
        if len(ends) == 0 or a >= int(ends[-1]):
            return "past the committed end"
        e0 = int(np.searchsorted(ends, a, side="right"))
        e1 = int(np.searchsorted(ends, min(b, int(ends[-1])) - 1, side="right"))
        start0 = int(ends[e0 - 1]) if e0 else 0
        if b - a == 1:
            return f"episode {e0}, frame {a - start0} of it"
        return f"episode {e0}" if e0 == e1 else f"episodes {e0}..{e1}"

    def _corrupt(self, key: str, a: int, b: int, chunk: str, reason: str, unit: str = "frame") -> StoreCorruptError:
        rows = f"{unit} {a}" if b - a == 1 else f"{unit}s {a}..{b - 1}"
        if unit == "frame":
            where = self._episodes_of_frames(a, b)
        else:  # rows are episodes: name their frames when the episode index is known
            where = f"episode {a}" if b - a == 1 else f"episodes {a}..{b - 1}"
            ends = self.episode_ends
            if len(ends) >= b:
                where += f", frames {int(ends[a - 1]) if a else 0}..{int(ends[b - 1]) - 1}"
            else:
                where += ", frames unknown (the episode index is unreadable)"
        return StoreCorruptError(
            f"corrupt store: {key} {rows} cannot be decoded ({reason}) [store {self.path}, key {key}, chunk {chunk}, "
            f"{where}]; run `chunkpolicy data verify {self.path}`"
        )

    def _read_rows(self, arr_key: str, n: int, unit: str = "frame") -> np.ndarray:
        """Rows ``[0, n)`` of a numeric/meta array; any bad chunk is one :class:`StoreCorruptError` naming it."""
        arr = self._open_array(arr_key)
        try:
            return np.asarray(arr[:n])
        except Exception:
            pass
        step = int(arr.chunks[0])  # find the first bad chunk for the message
        for a in range(0, n, step):
            b = min(a + step, n)
            chunk = "c/" + "/".join([str(a // step)] + ["0"] * (arr.ndim - 1))
            try:
                np.asarray(arr[a:b])
            except Exception as e:
                reason = "chunk file missing" if type(e).__name__ == "ChunkNotFoundError" else f"{type(e).__name__}: {str(e).splitlines()[0]}"
                raise self._corrupt(arr_key.removeprefix("data/"), a, b, chunk, reason, unit) from None
        return np.asarray(arr[:n])  # transient failure: read again (raises as zarr does)

    # -- the write lock -------------------------------------------------------------------------------------------
    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the store's advisory write lock (re-entrant within this object); waits up to ``lock_timeout``."""
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open with mode='a' to write")
        if self._lock is not None:
            yield
            return
        lock = FileLock(self.path / LOCK_FILE, timeout=self.lock_timeout, create_parent=False)
        try:
            lock.__enter__()
        except LockTimeout as e:
            raise StoreLockedError(
                f"{self.path}: another process (pid {e.holder}) is writing to this episode store; gave up "
                f"after waiting {self.lock_timeout:g}s for its write lock {e.path} (one writer at a time; "
                f"raise lock_timeout / CHUNKPOLICY_STORE_LOCK_TIMEOUT to wait longer)") from None
        self._lock = lock
        try:
            yield
        finally:
            self._lock = None
            lock.__exit__(None, None, None)

    def _load_meta(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"episode store {self.path} does not exist")
        try:
            root = self._root()
            attrs = dict(root.attrs)
        except Exception as e:  # zarr raises several types for a broken/missing zarr.json
            raise ValueError(f"{self.path}: not a readable zarr v3 episode store ({type(e).__name__}: {e})") from e
        if attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.path}: attribute 'format' is {attrs.get('format')!r}, expected {FORMAT_NAME!r}")
        if attrs.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"{self.path}: format_version {attrs.get('format_version')!r} is not supported "
                f"(expected one of {SUPPORTED_FORMAT_VERSIONS})"
            )
        self.format_version = int(attrs["format_version"])
        for key in ("embodiment", "fps", "tasks", "num_episodes"):
            if key not in attrs:
                raise ValueError(f"{self.path}: missing attribute {key!r}")
        self.spec = EmbodimentSpec.from_dict(attrs["embodiment"])
        self.fps = float(attrs["fps"])
        self.tasks: list[str] = list(attrs["tasks"])
        self.num_episodes = int(attrs["num_episodes"])
        self._stats = attrs.get("stats")
        self._stats_frames = attrs.get("stats_frames")
        self._stats_stale = bool(attrs.get("stats_stale", False))
        self.episode_ends = np.zeros(0, dtype=np.int64)  # for error messages while loading
        try:
            ends = np.asarray(self._read_rows("meta/episode_ends", self.num_episodes, "episode"), dtype=np.int64)
            if len(ends) and np.all(np.diff(ends) > 0) and ends[0] > 0:
                self.episode_ends = ends  # lets an error in the arrays below name the frames too
            task_idx = np.asarray(self._read_rows("meta/episode_task", self.num_episodes, "episode"), dtype=np.int64)
            seeds = np.asarray(self._read_rows("meta/episode_seed", self.num_episodes, "episode"), dtype=np.int64)
            arrays = {k: root[f"data/{k}"] for k in NUMERIC_KEYS}
            arrays.update({f"images/{c}": root[f"data/images/{c}"] for c in self.spec.cameras})
        except KeyError as e:
            raise ValueError(f"{self.path}: corrupt store, missing array {e}") from e
        if len(ends) != self.num_episodes or len(task_idx) != self.num_episodes:
            raise ValueError(f"{self.path}: corrupt store, meta arrays shorter than num_episodes={self.num_episodes}")
        if self.num_episodes and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            raise ValueError(f"{self.path}: corrupt store, meta/episode_ends is not strictly increasing")
        n = int(ends[-1]) if self.num_episodes else 0
        for key, arr in arrays.items():
            if arr.shape[0] < n:
                raise ValueError(f"{self.path}: corrupt store, data/{key} has {arr.shape[0]} frames < committed {n}")
        if self.num_episodes and (task_idx.min() < 0 or task_idx.max() >= len(self.tasks)):
            raise ValueError(f"{self.path}: corrupt store, meta/episode_task points outside the tasks list")
        self.episode_ends, self._episode_task, self._episode_seed = ends, task_idx, seeds
        self.num_frames = n
        self._image_shapes = {c: tuple(arrays[f"images/{c}"].shape[1:3]) for c in self.spec.cameras}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"], state["_cache"], state["_arrays"], state["_direct"] = None, {}, {}, {}  # reopened lazily in the receiving process
        state["_lock"] = None  # a lock is never inherited
        return state

    # -- metadata -------------------------------------------------------------------------------------------------
    @property
    def cameras(self) -> tuple[str, ...]:
        return self.spec.cameras

    def image_shape(self, camera: str) -> tuple[int, int]:
        if camera not in self._image_shapes:
            raise KeyError(f"{self.path}: no camera {camera!r}; cameras: {list(self.cameras)}")
        return self._image_shapes[camera]

    def episode_range(self, i: int) -> tuple[int, int]:
        """``(start, stop)`` frame indices of episode ``i`` (stop exclusive)."""
        if not 0 <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range: store has {self.num_episodes} episodes")
        return (int(self.episode_ends[i - 1]) if i else 0), int(self.episode_ends[i])

    def episode_task(self, i: int) -> str:
        self.episode_range(i)
        return self.tasks[int(self._episode_task[i])]

    def episode_seed(self, i: int) -> int | None:
        self.episode_range(i)
        s = int(self._episode_seed[i])
        return None if s < 0 else s

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    # -- reading --------------------------------------------------------------------------------------------------
    def _array_key(self, key: str) -> str:
        if key in NUMERIC_KEYS:
            return f"data/{key}"
        if key.startswith("images/") and key[len("images/"):] in self.cameras:
            return f"data/{key}"
        raise KeyError(f"{self.path}: unknown key {key!r}; keys: {list(NUMERIC_KEYS) + [f'images/{c}' for c in self.cameras]}")

    def _array(self, arr_key: str) -> zarr.Array:
        if arr_key not in self._arrays:
            self._arrays[arr_key] = self._open_array(arr_key)
        return self._arrays[arr_key]

    def _direct_frame_path(self, arr_key: str) -> tuple[Path, bool] | None:
        """Directory of per-frame chunk files when frames can be decoded without zarr's async machinery.

        Our image arrays are one Blosc-compressed chunk per frame in a local directory; reading the chunk file and
        decompressing it directly is ~4x faster than a zarr read (which pays an event-loop round trip per call).
        Anything else (another store type, codec or chunking) returns None and goes through zarr. The flag says whether
        chunks end with a crc32c (format v2).
        """
        if arr_key in self._direct:
            return self._direct[arr_key]
        arr, ok = self._array(arr_key), False
        try:
            m = arr.metadata
            codecs = [type(c).__name__ for c in m.codecs]
            crc = codecs == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
            ok = (
                isinstance(arr.store, zarr.storage.LocalStore)
                and (codecs == ["BytesCodec", "BloscCodec"] or crc)
                and tuple(m.chunk_grid.chunk_shape) == (1, *arr.shape[1:])
                and getattr(m.chunk_key_encoding, "separator", None) == "/"
                and type(m.chunk_key_encoding).__name__ == "DefaultChunkKeyEncoding"
            )
        except AttributeError:
            ok = False
        self._direct[arr_key] = (self.path / arr_key / "c", crc) if ok else None
        return self._direct[arr_key]

    def _read_frames_direct(self, base: Path, crc: bool, shape: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
        import google_crc32c
        from numcodecs import blosc

        out = np.empty((len(idx), *shape), dtype=np.uint8)
        prefix, tail = f"{base}{os.sep}", "/" + "/".join("0" * len(shape))  # plain strings: pathlib costs ~40 µs/frame
        # one read buffer for the call (os.open/readv into it: ~3 µs less per frame than open().read()); a valid chunk
        # is at most the frame plus Blosc's 16-byte header (plus the crc32c), so a full buffer means a corrupt chunk
        extra = _CRC_BYTES if crc else 0
        buf = bytearray(math.prod(shape) + _BLOSC_MAX_OVERHEAD + extra + 1)
        view, arr = memoryview(buf), np.frombuffer(buf, dtype=np.uint8)
        key = f"{base.parent.parent.name}/{base.parent.name}"
        for k, i in enumerate(idx):
            try:
                fd = os.open(f"{prefix}{int(i)}{tail}", os.O_RDONLY)
            except FileNotFoundError:
                if crc:  # v2 stores write every chunk: a missing one is damage, never zeros
                    raise self._corrupt(key, int(i), int(i) + 1, f"c/{int(i)}{tail}", "chunk file missing") from None
                out[k] = 0  # v1 store: never-written (all-zero) chunk, zarr's fill value
                continue
            try:
                n = os.readv(fd, [buf])
            finally:
                os.close(fd)
            try:
                if n == len(buf):
                    raise ValueError(f"chunk larger than any valid one ({n}+ bytes)")
                if crc:
                    if n < _CRC_BYTES or google_crc32c.value(arr[: n - _CRC_BYTES]) != int.from_bytes(buf[n - _CRC_BYTES : n], "little"):
                        raise ValueError(f"crc32c checksum mismatch ({n} bytes)")
                    n -= _CRC_BYTES
                # Blosc trusts its header's sizes and the buffer is longer than this chunk: check them first
                # (Blosc 1 header: decoded bytes at offset 4, compressed bytes at 12, both uint32 little-endian)
                if n < _BLOSC_MAX_OVERHEAD:
                    raise ValueError(f"{n} bytes is shorter than a Blosc header")
                nbytes, cbytes = int.from_bytes(buf[4:8], "little"), int.from_bytes(buf[12:16], "little")
                if cbytes != n or nbytes != out[k].nbytes:
                    raise ValueError(f"header says {cbytes} compressed / {nbytes} decoded bytes, file has {n}, frame needs {out[k].nbytes}")
                blosc.decompress(view[:n], out[k])  # straight into the output frame, no intermediate copy
            except (RuntimeError, ValueError) as e:  # truncated / garbled chunk, or a frame of another size
                raise self._corrupt(key, int(i), int(i) + 1, f"c/{int(i)}{tail}", f"as uint8 {list(shape)}: {e}") from None
        return out

    def _numeric(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._read_rows(f"data/{key}", self.num_frames)
        return self._cache[key]

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key`` (``action``, ``state`` or ``images/<camera>``)."""
        self._array_key(key)  # an unknown key is an error naming it
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"{key}: frames [{start}, {stop}) outside [0, {self.num_frames})")
        if key in NUMERIC_KEYS:
            return self._numeric(key)[start:stop]
        return self.read_frames(key, np.arange(start, stop))

    def read_frames(self, key: str, idx: np.ndarray) -> np.ndarray:
        """Frames at integer indices ``idx`` (any order, repeats allowed) of ``key``."""
        arr_key = self._array_key(key)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_frames):
            raise IndexError(f"{key}: frame indices outside [0, {self.num_frames})")
        if key in NUMERIC_KEYS:
            return self._numeric(key)[idx]
        direct = self._direct_frame_path(arr_key)
        if direct is not None:
            return self._read_frames_direct(direct[0], direct[1], self._array(arr_key).shape[1:], idx)
        uniq, inv = np.unique(idx, return_inverse=True)
        arr = self._array(arr_key)
        try:
            if len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq):  # contiguous: one slice read
                frames = np.asarray(arr[int(uniq[0]) : int(uniq[-1]) + 1])
            else:
                frames = np.asarray(arr.get_orthogonal_selection((uniq,)))
        except Exception:
            for i in uniq:  # name the first bad frame
                try:
                    np.asarray(arr[int(i) : int(i) + 1])
                except Exception as e:
                    reason = "chunk file missing" if type(e).__name__ == "ChunkNotFoundError" else f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    raise self._corrupt(key, int(i), int(i) + 1, f"c/{int(i)}/0/0/0", reason) from None
            raise
        return frames[inv]

    def read_episode(self, i: int) -> dict[str, Any]:
        """``{"action", "state", "images": {cam: ...}, "task", "seed"}`` of episode ``i``."""
        a, b = self.episode_range(i)
        return {
            "action": self.read("action", a, b).copy(),
            "state": self.read("state", a, b).copy(),
            "images": {c: self.read(f"images/{c}", a, b) for c in self.cameras},
            "task": self.episode_task(i),
            "seed": self.episode_seed(i),
        }

    # -- writing --------------------------------------------------------------------------------------------------
    def validate_episode(self, episode: Mapping[str, Any]) -> int:
        """Check an episode against the spec; returns its length T. Raises ValueError naming the field."""
        missing = [k for k in ("action", "state", "images", "task") if k not in episode]
        if missing:
            raise ValueError(f"episode: missing fields {missing}")
        lengths: dict[str, int] = {}
        for key, dim in (("action", self.spec.action_dim), ("state", self.spec.state_dim)):
            x = episode[key]
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != dim:
                got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise ValueError(f"{key}: expected float32 [T, {dim}], got {got}")
            if not np.isfinite(x).all():
                bad = np.argwhere(~np.isfinite(x))[0]
                raise ValueError(f"{key}: contains NaN or inf (first at frame {bad[0]}, dim {bad[1]})")
            lengths[key] = x.shape[0]
        images = episode["images"]
        if not isinstance(images, Mapping) or set(images) != set(self.cameras):
            got = sorted(images) if isinstance(images, Mapping) else type(images).__name__
            raise ValueError(f"images: expected cameras {sorted(self.cameras)}, got {got}")
        for cam in self.cameras:
            x, (h, w) = images[cam], self.image_shape(cam)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (h, w, 3):
                got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise ValueError(f"images/{cam}: expected uint8 [T, {h}, {w}, 3], got {got}")
            lengths[f"images/{cam}"] = x.shape[0]
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode: lengths disagree {lengths}")
        T = next(iter(lengths.values()))
        if T < 1:
            raise ValueError("episode: needs at least one frame (T >= 1)")
        task = episode["task"]
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"task: expected a non-empty string, got {task!r}")
        return T

    def append_episode(self, episode: Mapping[str, Any], seed: int | None = None, *, if_absent: bool = False) -> int | None:
        """Validate and append one episode; returns its index. See the module docstring for crash safety.

        Holds the store's write lock from re-reading the committed state to the commit, so concurrent appenders
        (other processes) are serialized, never interleaved. ``if_absent``: when an episode with the same task and
        (non-None) seed is already committed (e.g. by another ``collect --resume``), write nothing and return None.
        """
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open with mode='a' to append")
        T = self.validate_episode(episode)
        task = episode["task"]
        with self.write_lock():
            self._reload()  # another process may have appended since we opened
            if if_absent and seed is not None and task in self.tasks:
                t = self.tasks.index(task)
                if np.any((self._episode_task == t) & (self._episode_seed == int(seed))):
                    return None
            n, e = self.num_frames, self.num_episodes
            with zarr.config.set(self._zarr_config() | {"array.read_missing_chunks": True}):  # past the end: never written
                root = self._root()
                # 1. frames (any leftovers of an interrupted append past the committed end are overwritten)
                writes = [("action", episode["action"]), ("state", episode["state"])]
                writes += [(f"images/{c}", episode["images"][c]) for c in self.cameras]
                for key, x in writes:
                    arr = root[f"data/{key}"]
                    arr.resize((n + T, *arr.shape[1:]))
                    arr[n : n + T] = x
                # 2. per-episode metadata
                tasks = self.tasks + ([task] if task not in self.tasks else [])
                for name, value in (("episode_ends", n + T), ("episode_task", tasks.index(task)), ("episode_seed", -1 if seed is None else int(seed))):
                    arr = root[f"meta/{name}"]
                    arr.resize((e + 1,))
                    arr[e] = value
                # 3. commit: one atomic rewrite of the root attributes (saved stats no longer cover every frame)
                root.attrs.update({"tasks": tasks, "num_episodes": e + 1, "stats_stale": bool(self._stats)})
            self._reload()
        return e

    def _reload(self) -> None:
        self._group = None
        self._cache.clear()
        self._arrays.clear()
        self._direct.clear()
        self._load_meta()

    # -- stats and info -------------------------------------------------------------------------------------------
    def compute_stats(self, save: bool = True) -> dict[str, dict[str, np.ndarray]]:
        """Exact stats of ``action`` and ``state`` over all committed frames (see :func:`compute_stats`)."""
        if save:
            if self.mode != "a":
                raise PermissionError(f"{self.path} is open read-only; open with mode='a' to save stats")
            with self.write_lock():
                self._reload()  # stats of what is committed now, saved before anyone can append
                stats = self.compute_stats(save=False)
                doc = stats_to_json(stats)
                self._root().attrs.update({"stats": doc, "stats_frames": self.num_frames, "stats_stale": False})
                self._stats, self._stats_frames, self._stats_stale = doc, self.num_frames, False
            return stats
        if self.num_frames == 0:
            raise ValueError(f"{self.path}: cannot compute stats of an empty store")
        return {k: compute_stats(self._numeric(k), field=k) for k in NUMERIC_KEYS if self._numeric(k).shape[1] > 0}

    def stats_status(self) -> str:
        """``none``, ``fresh``, ``stale`` or ``unknown`` (saved by format v1 without the frame count they cover)."""
        if not self._stats:
            return "none"
        if self._stats_stale or (self._stats_frames is not None and int(self._stats_frames) != self.num_frames):
            return "stale"
        return "fresh" if self._stats_frames is not None else "unknown"

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Saved stats; raises if they no longer cover every committed frame (never returns stale stats). Stats of a
        v1 store (no frame count saved) are checked against a recomputation."""
        status = self.stats_status()
        if status == "none":
            raise KeyError(f"{self.path}: no stats saved; run `chunkpolicy data stats {self.path}` or store.compute_stats()")
        if status == "stale":
            raise ValueError(
                f"{self.path}: saved stats are stale (they cover {self._stats_frames} frames, the store now has "
                f"{self.num_frames} after an append or repair); recompute with `chunkpolicy data stats {self.path}` "
                f"or store.compute_stats()")
        saved = stats_from_json(self._stats)
        if status == "unknown":
            fresh = self.compute_stats(save=False)
            same = set(fresh) == set(saved) and all(
                np.allclose(np.asarray(saved[k][f], dtype=np.float64), np.asarray(v, dtype=np.float64), rtol=1e-5, atol=1e-6)
                for k in fresh for f, v in fresh[k].items() if f in saved[k])
            if not same:
                raise ValueError(f"{self.path}: saved stats (format v1, no frame count) do not match the data; recompute "
                                 f"with `chunkpolicy data stats {self.path}` or store.compute_stats()")
        return saved

    def info(self) -> dict[str, Any]:
        root = self._root()
        keys = {}
        for k in list(NUMERIC_KEYS) + [f"images/{c}" for c in self.cameras]:
            arr = root[f"data/{k}"]
            keys[k] = {"shape": [self.num_frames, *arr.shape[1:]], "dtype": str(arr.dtype)}
        lengths = self.episode_lengths
        return {
            "path": str(self.path),
            "format_version": self.format_version,
            "episodes": self.num_episodes,
            "frames": self.num_frames,
            "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())} if len(lengths) else None,
            "keys": keys,
            "embodiment": self.spec.to_dict(),
            "fps": self.fps,
            "tasks": self.tasks,
            "has_stats": bool(self._stats),
            "stats_status": self.stats_status(),
            "stats_frames": self._stats_frames,
            "checksums": "crc32c" if self.checksummed else None,
        }

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return f"EpisodeStore({str(self.path)!r}, episodes={self.num_episodes}, frames={self.num_frames}, embodiment={self.spec.name!r})"
