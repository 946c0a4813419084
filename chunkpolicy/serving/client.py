"""The robot side: a thin client for ``chunkpolicy serve`` that plugs into the chunk executors. No torch.

Imports only numpy, msgpack, websockets, :mod:`chunkpolicy.serving.protocol` and :mod:`chunkpolicy.runtime.executors`
(numpy only), so it runs on a robot computer without torch or a GPU::

    from chunkpolicy.serving.client import PolicyClient, RobotLoop

    client = PolicyClient("ws://gpu-box:8000", api_key=..., prompt="push the T into the target")
    loop = RobotLoop(client, "open_loop:8")          # or "temporal_ensemble:0.01"
    loop.reset()
    while running:
        obs = {"images": {"top": rgb_uint8_hwc}, "state": joint_positions}   # any image size: the server resizes
        robot.command(loop.act(obs))                                        # [A] in robot units

``client.predict_fn()`` is the ``predict_fn(obs, prefix=None, prefix_len=0) -> [H, A]`` of
:mod:`chunkpolicy.runtime.executors`; real-time chunking (the ``rtc`` executor,
:class:`~chunkpolicy.runtime.executors.RealTimeChunking`) sends the previous chunk's remaining actions and the committed
delay ``d`` with the observation (``rtc/prefix``, ``rtc/prefix_len``) and the server guides its sampler with them.
:class:`RobotLoop` with ``auto_delay=True`` sets ``d`` before every switch from the round-trip latency it measured
(``ceil(latency · control_hz)``, the worst of the recent round trips). Each reply's round trip is in
:attr:`PolicyClient.latencies`. Every executor, ``rtc`` included, is torch-free; the guidance runs on the server.
The executors call ``predict_fn`` synchronously: the request at a switch tick blocks that tick for one round trip.

An openpi ``WebsocketClientPolicy`` speaks to the same server; this client adds the schema (env-style observations →
wire keys from the server's metadata), a clear :class:`ServerError` for refused requests, real-time chunking and
latency measurement.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from typing import Any, Callable, Mapping

import numpy as np
import websockets
import websockets.sync.client as ws_client

from chunkpolicy.runtime.executors import ChunkExecutor, PredictFn, make_executor
from chunkpolicy.serving import protocol as P

__all__ = ["PolicyClient", "RobotLoop", "ServerError"]


class ServerError(RuntimeError):
    """The server refused a request (the message names the field) or failed it; the connection is still usable."""


class PolicyClient:
    """One websocket connection to a policy server.

    ``embodiment``: which of the server's embodiments requests are for (default: the server's default);
    ``prompt``: the instruction sent with every request unless one is passed. Raises ``ConnectionError`` when the
    server cannot be reached within ``connect_timeout`` seconds or refuses the API key.
    """

    def __init__(self, uri: str = "ws://127.0.0.1:8000", api_key: str | None = None, *, embodiment: str | None = None,
                 prompt: str | None = None, connect_timeout: float = 30.0, history: int = 100) -> None:
        self.uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        deadline = time.monotonic() + connect_timeout
        while True:  # a server that is still loading its checkpoint refuses connections: retry until the deadline
            try:
                conn = ws_client.connect(self.uri, additional_headers=headers, compression=None, max_size=None,
                                         open_timeout=max(1.0, deadline - time.monotonic()))
                break
            except websockets.InvalidStatus as e:
                code = e.response.status_code
                raise ConnectionError(f"{self.uri}: the server refused the connection (HTTP {code}"
                                      f"{': missing or wrong API key' if code == 401 else ''})") from None
            except (OSError, TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"{self.uri}: no policy server reachable ({e})") from None
                time.sleep(0.2)
        self._stack = contextlib.ExitStack()  # the connection is a context manager, closed by close()
        self._ws = self._stack.enter_context(conn)
        self.metadata: dict[str, Any] = P.unpack(self._ws.recv())
        if self.metadata.get("server") != "chunkpolicy":
            raise ConnectionError(f"{self.uri}: not a chunkpolicy server (metadata {sorted(self.metadata)[:8]})")
        emb = embodiment or self.metadata.get("embodiment")
        embs = self.metadata["embodiments"]
        if emb not in embs:
            raise ValueError(f"embodiment: {emb!r} is not served by {self.uri} (it serves {list(embs)})")
        self.embodiment = emb
        self.schema = P.ObservationSchema.from_dict(embs[emb]["schema"])
        self.horizon = int(self.metadata["action_horizon"])
        self.action_dim = int(embs[emb]["action_dim"])
        self.unified_dim = int(self.metadata["unified_dim"])
        self.control_hz = float(embs[emb]["control_hz"])
        self.prompt = prompt
        self.latencies: deque[float] = deque(maxlen=history)  # round trips in seconds, newest last

    # -- requests -------------------------------------------------------------------------------------------------
    def request(self, obs: Mapping[str, Any], prompt: str | None = None, *, noise: np.ndarray | None = None,
                seed: int | None = None, prefix: np.ndarray | None = None, prefix_len: int | None = None) -> P.Reply:
        """One chunk. ``obs``: env-style ``{"images": {camera: uint8 [h, w, 3]}, "state": [S]}`` (``[T_obs, ...]``
        stacks when the policy uses several frames), or a request already in wire keys. ``noise [H, D]`` / ``seed``:
        a reproducible sample; ``prefix [H', A]`` + ``prefix_len``: real-time chunking guidance."""
        prompt = prompt if prompt is not None else self.prompt
        if "images" in obs and isinstance(obs["images"], Mapping):
            req = self.schema.encode(obs["images"], obs["state"], prompt)
        else:
            req = dict(obs)
            if prompt is not None:
                req.setdefault(self.schema.prompt[0], prompt)
        if self.embodiment != self.metadata.get("embodiment"):
            req[P.EMBODIMENT] = self.embodiment
        if noise is not None:
            req[P.NOISE] = np.asarray(noise, dtype=np.float32)
        if seed is not None:
            req[P.SEED] = int(seed)
        if prefix is not None:
            req[P.RTC_PREFIX] = np.asarray(prefix, dtype=np.float32)
            req[P.RTC_PREFIX_LEN] = int(prefix_len or 0)
        t0 = time.perf_counter()
        self._ws.send(P.pack(req))
        raw = self._ws.recv()
        dt = time.perf_counter() - t0
        if isinstance(raw, str):
            raise ServerError(raw)
        rep = P.unpack(raw)
        self.latencies.append(dt)
        actions = np.asarray(rep["actions"], dtype=np.float32)
        if actions.shape != (self.horizon, self.action_dim):
            raise ServerError(f"actions: expected [{self.horizon}, {self.action_dim}] from the server, got {list(actions.shape)}")
        return P.Reply(actions, bool(rep.get("valid", True)), rep.get("server_timing", {}), rep.get("policy_timing", {}), dt)

    def infer(self, obs: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        """openpi's ``BasePolicy.infer`` shape: ``{"actions": [H, A], "server_timing", "policy_timing"}``."""
        r = self.request(obs, **kw)
        return {"actions": r.actions, "server_timing": r.server_timing, "policy_timing": r.policy_timing}

    def delay_ticks(self, control_hz: float | None = None, window: int = 10) -> int:
        """Control ticks one inference takes: ``ceil(worst of the last window round trips · control_hz)`` (0 before
        the first reply)."""
        if not self.latencies:
            return 0
        worst = max(list(self.latencies)[-window:])
        return int(math.ceil(worst * (control_hz or self.control_hz) - 1e-9))

    def predict_fn(self, prompt: str | None = None, on_reply: Callable[[P.Reply], None] | None = None) -> PredictFn:
        """``predict_fn(obs, prefix=None, prefix_len=0) -> float32 [H, A]`` for the executors; a list of ``B``
        observations gives ``[B, H, A]`` (one request each). A chunk the head could not produce raises."""

        def predict(obs: Any, prefix: Any = None, prefix_len: int = 0) -> np.ndarray:
            many = isinstance(obs, (list, tuple))
            obs_list = list(obs) if many else [obs]
            pre = None if prefix is None else np.asarray(prefix)
            if pre is not None and pre.ndim == 2:
                pre = pre[None]
            out = []
            for b, o in enumerate(obs_list):
                r = self.request(o, prompt, prefix=None if pre is None else pre[b], prefix_len=prefix_len)
                if on_reply is not None:
                    on_reply(r)
                if not r.valid:
                    raise ServerError("the server's head could not produce this chunk (invalid decode)")
                out.append(r.actions)
            return np.stack(out) if many else out[0]

        return predict

    def reset(self) -> None:
        """Nothing to reset on the server (requests carry all their state); kept for openpi's policy interface."""

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RobotLoop:
    """An executor driven through a :class:`PolicyClient`, one :meth:`act` per control tick.

    ``auto_delay`` (``rtc`` executors): before each switch to a new chunk, the executor's delay ``d`` is set to
    :meth:`PolicyClient.delay_ticks` (clipped to what the executor allows), so the committed prefix the server
    receives covers the actions that run while it computes.
    """

    def __init__(self, client: PolicyClient, executor: str | ChunkExecutor = "open_loop:8", prompt: str | None = None,
                 auto_delay: bool = True) -> None:
        self.client = client
        self.executor = make_executor(executor)
        self.auto_delay = auto_delay and hasattr(self.executor, "d") and hasattr(self.executor, "s")
        self._predict = client.predict_fn(prompt)
        self._t = 0

    def reset(self) -> None:
        self.executor.reset()
        self._t = 0

    def act(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action ``[A]`` (robot units) for this tick."""
        ex = self.executor
        if self.auto_delay and ex.prediction_ticks and self._t - ex.prediction_ticks[-1] == ex.s:
            ex.d = max(0, min(self.client.delay_ticks(), ex.s, self.client.horizon - ex.s))  # type: ignore[attr-defined]
        a = ex.act(self._t, obs, self._predict)
        self._t += 1
        return a
