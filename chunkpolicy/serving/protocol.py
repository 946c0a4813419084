"""The wire protocol of ``chunkpolicy serve``: openpi's websocket protocol (msgpack frames, numpy arrays inline).

Torch-free: the robot-side client (:mod:`chunkpolicy.serving.client`) imports only this module, numpy, msgpack and
websockets.

One connection::

    client → server   websocket handshake (optional header ``Authorization: Api-Key <key>``)
    server → client   metadata: one msgpack map (:func:`pack`), sent right after the handshake
    client → server   an observation: one msgpack map per request (binary frame)
    server → client   the reply: ``{"actions": float32 [H, A], "server_timing": {...}, "policy_timing": {...}}``
                      or, for a request the server refuses, a text frame with one line naming the field
                      (openpi's client raises ``RuntimeError`` on a text frame; the connection stays usable)

``GET /healthz`` answers ``200 OK`` (no API key needed: load balancers and orchestrators probe it).

Numpy arrays travel as openpi's ``openpi_client.msgpack_numpy`` encodes them: a map ``{b"__ndarray__": True,
b"data": raw bytes, b"dtype": dtype.str, b"shape": [...]}`` (scalars: ``{b"__npgeneric__": True, b"data", b"dtype"}``).
No pickle: object, void and complex dtypes are refused in both directions, and a decoded array must have exactly the
bytes its dtype and shape call for.

Observation keys (what the server reads from a request; nested maps are flattened with ``/``, so
``{"observation": {"image": ...}}`` and ``{"observation/image": ...}`` are the same request):

* one image per camera: uint8 ``[h, w, 3]`` (HWC, any size: the server resizes to the training size), or
  ``[T_obs, h, w, 3]`` oldest first when the policy uses ``T_obs > 1`` observation frames;
* ``state``: numeric ``[S]`` (or ``[T_obs, S]``) in robot units, the embodiment's state names in order;
* ``prompt``: str (may be left out when the server has a default prompt);
* optional ``embodiment``: str (needed only when the checkpoint has several embodiments and no server default);
* optional ``noise``: float ``[H, D]`` initial noise in the normalized unified space, or ``seed``: int — a
  reproducible sample (tests, A/B comparisons); neither: the server draws fresh noise;
* optional real-time chunking: ``rtc/prefix`` float ``[H', A]``, ``1 <= H' < H`` (robot units) — the previous
  chunk's actions that are still to run, aligned with the new chunk's first steps — and ``rtc/prefix_len`` int ``d`` — how many of them
  are committed (run during the inference delay). Heads with a flow velocity only (metadata ``rtc``).

Which wire key feeds which camera / state / prompt is the :class:`ObservationSchema`, published in the metadata
(``schema``); by default it accepts openpi's usual names (``observation/image``, ``observation/wrist_image``,
``observation/state``, ``prompt``) next to ``observation/images/<camera>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

PROTOCOL = "openpi-websocket/msgpack-numpy"
PROTOCOL_VERSION = 1

# request fields other than the observation itself
EMBODIMENT = "embodiment"
NOISE = "noise"
SEED = "seed"
RTC_PREFIX = "rtc/prefix"
RTC_PREFIX_LEN = "rtc/prefix_len"

_ND, _NG = b"__ndarray__", b"__npgeneric__"
_BAD_KINDS = ("O", "V", "c")  # object (pickle), void/structured, complex: never on the wire


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol; the message names the field."""


# -- msgpack with numpy -------------------------------------------------------------------------------------------------
def _default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _BAD_KINDS:
        raise ProtocolError(f"cannot send a numpy array of dtype {obj.dtype} (object, void and complex are refused)")
    if isinstance(obj, np.ndarray):
        return {_ND: True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {_NG: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__} (send numpy arrays, numbers, strings, lists and maps)")


def _hook(obj: dict) -> Any:
    if _ND in obj:
        return _decode_array(obj)
    if _NG in obj:
        dt = _dtype(obj.get(b"dtype"))
        try:
            return dt.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"numpy scalar of dtype {dt}: {e}") from None
    return obj


def _dtype(raw: Any) -> np.dtype:
    if not isinstance(raw, (str, bytes)):
        raise ProtocolError(f"numpy array: dtype must be a string like '<f4', got {type(raw).__name__}")
    try:
        dt = np.dtype(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"numpy array: unknown dtype {raw!r} ({e})") from None
    if dt.kind in _BAD_KINDS:
        raise ProtocolError(f"numpy array: dtype {dt} is refused (object, void and complex)")
    return dt


def _decode_array(obj: dict) -> np.ndarray:
    dt = _dtype(obj.get(b"dtype"))
    shape, data = obj.get(b"shape"), obj.get(b"data")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError(f"numpy array: shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"numpy array: data must be bytes, got {type(data).__name__}")
    n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) != n:
        raise ProtocolError(f"numpy array: {len(data)} bytes of data for dtype {dt} and shape {list(shape)} (expected {n})")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with numpy arrays inline (what ``openpi_client.msgpack_numpy.packb`` writes)."""
    return msgpack.packb(obj, default=_default)


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`; a malformed frame raises :class:`ProtocolError`. Arrays are read-only views."""
    try:
        return msgpack.unpackb(data, object_hook=_hook, strict_map_key=False)
    except ProtocolError:
        raise
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
            ValueError, TypeError) as e:
        raise ProtocolError(f"request: not a msgpack message ({type(e).__name__}: {e})") from None


def flatten(obj: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{"observation": {"image": x}}`` → ``{"observation/image": x}`` (keys must be strings)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        if not isinstance(k, str):
            raise ProtocolError(f"{prefix or 'request'}: keys must be strings, got {k!r}")
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# -- observation schema -------------------------------------------------------------------------------------------------
@dataclass
class ObservationSchema:
    """What the server reads from a request for one embodiment, and under which wire keys (published in metadata).

    ``cameras``: ``{camera: [wire keys]}`` in the embodiment's camera order; ``state`` / ``prompt``: accepted wire
    keys, the first one canonical. ``image_size``: ``(h, w)`` the policy was trained on (images of another size are
    resized to it, bilinear + antialias, as training did). ``state_names``: the ``[S]`` state vector's dims in order.
    """

    embodiment: str
    cameras: dict[str, list[str]]
    state: list[str]
    prompt: list[str]
    image_size: tuple[int, int]
    state_names: list[str]
    action_names: list[str]
    n_obs_steps: int = 1
    control_hz: float = 10.0
    default_prompt: str | None = None

    @classmethod
    def default(cls, embodiment: str, cameras: Sequence[str], state_names: Sequence[str], action_names: Sequence[str],
                image_size: tuple[int, int], n_obs_steps: int = 1, control_hz: float = 10.0,
                default_prompt: str | None = None) -> "ObservationSchema":
        """openpi's usual names: the first camera also as ``observation/image``, a camera named ``*wrist*`` (the first
        one, if it is not the first camera) also as ``observation/wrist_image``; ``observation/state``; ``prompt``."""
        cams: dict[str, list[str]] = {c: [f"observation/images/{c}"] for c in cameras}
        if cameras:
            cams[cameras[0]].append("observation/image")
        wrist = [c for c in cameras[1:] if "wrist" in c.lower()]
        if wrist:
            cams[wrist[0]].append("observation/wrist_image")
        return cls(embodiment, cams, ["observation/state", "state"], ["prompt"], tuple(int(x) for x in image_size),
                   list(state_names), list(action_names), int(n_obs_steps), float(control_hz), default_prompt)

    def with_keys(self, mapping: Mapping[str, str]) -> "ObservationSchema":
        """A copy whose canonical key for ``name`` (a camera, ``state`` or ``prompt``) is ``mapping[name]``; the
        previous keys stay accepted. Unknown names raise."""
        cams = {c: list(k) for c, k in self.cameras.items()}
        state, prompt = list(self.state), list(self.prompt)
        for name, key in mapping.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"key map: wire key for {name!r} must be a non-empty string, got {key!r}")
            if name in cams:
                cams[name] = [key] + [k for k in cams[name] if k != key]
            elif name == "state":
                state = [key] + [k for k in state if k != key]
            elif name == "prompt":
                prompt = [key] + [k for k in prompt if k != key]
            else:
                raise ValueError(f"key map: {name!r} is not a camera of {self.embodiment!r} {list(cams)} nor 'state' "
                                 "or 'prompt'")
        out = ObservationSchema(**{**asdict(self), "cameras": cams, "state": state, "prompt": prompt})
        out.check_unique()
        return out

    def check_unique(self) -> None:
        seen: dict[str, str] = {}
        for name, keys in [*self.cameras.items(), ("state", self.state), ("prompt", self.prompt)]:
            for k in keys:
                if k in seen and seen[k] != name:
                    raise ValueError(f"key map: wire key {k!r} is used for both {seen[k]!r} and {name!r}")
                seen[k] = name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ObservationSchema":
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    def encode(self, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str | None = None) -> dict[str, Any]:
        """A request in canonical wire keys from an env-style observation (``images {camera: uint8 [h, w, 3]}``,
        ``state [S]``); stacks of ``T_obs`` frames pass through unchanged."""
        unknown = sorted(set(images) - set(self.cameras))
        if unknown:
            raise ValueError(f"images: cameras {unknown} are not cameras of {self.embodiment!r} {list(self.cameras)}")
        req: dict[str, Any] = {self.cameras[c][0]: np.asarray(img) for c, img in images.items()}
        req[self.state[0]] = np.asarray(state, dtype=np.float32)
        if prompt is not None:
            req[self.prompt[0]] = prompt
        return req


@dataclass
class Reply:
    """One decoded server reply: ``actions`` float32 ``[H, A]`` (robot units), ``valid`` (False: the head could not
    produce this chunk, e.g. an invalid token decode; ``actions`` is NaN then), the server's timings and the
    client-measured round trip ``latency_s``."""

    actions: np.ndarray
    valid: bool = True
    server_timing: dict[str, float] = field(default_factory=dict)
    policy_timing: dict[str, float] = field(default_factory=dict)
    latency_s: float = 0.0
