"""``chunkpolicy serve``: a checkpoint behind openpi's websocket protocol (see :mod:`chunkpolicy.serving.protocol`).

    chunkpolicy serve runs/NAME [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--device cuda] [--compile]

An unmodified ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` connects, reads the metadata and calls
``infer(obs) -> {"actions": [H, A], "server_timing", "policy_timing"}``; ``openpi_client.action_chunk_broker`` works
on top, and so does our torch-free :class:`chunkpolicy.serving.client.PolicyClient` with every executor.

Structure: :class:`PolicyService` (torch side: validates one request into a batch-schema observation, runs groups of
requests as one batch) and :class:`PolicyServer` (asyncio websockets front end + one inference thread). The front end
decodes and validates each request on arrival: a malformed one is answered at once with a text frame naming the field
and the connection stays open. Valid requests go to a queue; the inference thread takes everything queued (up to
``max_batch``, optionally waiting ``batch_wait_ms`` for more), groups requests that can share a forward pass (same
embodiment and, for real-time chunking, same prefix shape) and runs each group as one batch: concurrent clients are
batched dynamically. A batch that fails is retried request by request, so one bad request never fails another. A client
that disconnects mid-request has its queued request dropped (or its reply discarded); the others are not disturbed.

Inference is the library's one path: ``ChunkPolicy.predict_unified`` (or :class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy`
on a GPU), and for real-time chunking :func:`~chunkpolicy.runtime.rtc.rtc_target` + :class:`~chunkpolicy.runtime.rtc.RTCGuidance`
exactly as :func:`~chunkpolicy.runtime.rtc.rtc_predict_fn` does in process. Observations become batches through
:func:`chunkpolicy.sim.base.obs_to_batch`, the same conversion closed-loop evaluation uses, so a served chunk equals the
in-process chunk for the same observation and noise.

Binds to 127.0.0.1 unless told otherwise; ``--api-key`` (or ``$CHUNKPOLICY_API_KEY``) is checked on connect
(``Authorization: Api-Key <key>``, as openpi's client sends it); SIGTERM / SIGINT stop accepting connections, finish
the requests in flight, close the connections (1001 going away) and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hmac
import http
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import websockets
import websockets.asyncio.server as ws_server

from chunkpolicy.serving import protocol as P

log = logging.getLogger("chunkpolicy.serve")

DEFAULT_MAX_REQUEST_BYTES = 32 << 20


# -- the torch side -----------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One validated request: a batch-schema observation with B = 1 (CPU tensors), its initial noise ``[1, H, D]``
    and, for real-time chunking, the previous chunk's remaining actions ``prefix [1, H', A]`` and the delay ``d``."""

    embodiment: str
    emb_id: int
    batch: dict[str, Any]
    noise: torch.Tensor
    prefix: np.ndarray | None = None
    prefix_len: int = 0
    prompt_key: str = "prompt"

    @property
    def group(self) -> tuple:
        """Requests with equal groups run as one batch."""
        n = None if self.prefix is None else self.prefix.shape[1]
        return (self.emb_id, n, self.prefix_len if n is not None else None)


def _field(m: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    for k in keys:
        if k in m:
            return k, m[k]
    return None


def _describe(v: Any) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, np.ndarray) else type(v).__name__


def resize_frames(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``[T, h, w, 3]`` → uint8 ``[T, H, W, 3]`` exactly as training resizes stored frames
    (:class:`chunkpolicy.data.windows.ChunkWindowDataset`: bilinear, antialiased, rounded)."""
    if frames.shape[1:3] == tuple(hw):
        return frames
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float()  # a copy: wire arrays are read-only
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class PolicyService:
    """A loaded policy with its observation schemas: validates requests and runs batches of them.

    ``key_map``: ``{camera | "state" | "prompt": wire key}`` for the default embodiment (see
    :meth:`ObservationSchema.with_keys`). ``cuda_graph``: replay chunks from CUDA graphs (one per embodiment, batch
    size and kind, captured on first use; a CUDA device only); ``compile``: ``torch.compile`` the graphs' functions.
    """

    def __init__(self, policy: Any, *, embodiment: str | None = None, key_map: Mapping[str, str] | None = None,
                 default_prompt: str | None = None, num_steps: int | None = None, rtc_beta: float = 5.0,
                 cuda_graph: bool = False, compile: bool = False, seed: int = 0) -> None:
        from chunkpolicy.models.tokenizer import check_prompts

        self.policy = policy.eval()
        self.space = policy.space
        self._check_prompts = check_prompts
        self._prompts_ok: dict[str, None] = {}  # prompts that fit: a control loop repeats one, tokenizing it each time costs
        names = [e.name for e in self.space.embodiments]
        if embodiment is not None and embodiment not in names:
            raise ValueError(f"embodiment: {embodiment!r} is not one of the checkpoint's embodiments {names}")
        self.default_embodiment = embodiment or (names[0] if len(names) == 1 else None)
        if key_map and self.default_embodiment is None:
            raise ValueError(f"key map: the checkpoint has several embodiments {names}; choose one with --embodiment")
        if default_prompt is not None:
            check_prompts(policy.tokenizer, [default_prompt], policy.config.max_prompt_tokens)
        hw = policy.trained_image_size
        self.schemas: dict[str, P.ObservationSchema] = {}
        for spec in self.space.embodiments:
            s = P.ObservationSchema.default(spec.name, list(spec.cameras), spec.state_names, spec.action_names, hw,
                                            policy.config.n_obs_steps, spec.control_hz, default_prompt)
            if key_map and spec.name == self.default_embodiment:
                s = s.with_keys(key_map)
            self.schemas[spec.name] = s
        self.H, self.D = int(policy.config.horizon), int(self.space.dim)
        self.num_steps = num_steps  # None: the head's own default, as in process
        self.rtc = bool(policy.head.caps.velocity)
        self.may_fail = bool(policy.head.caps.may_fail)
        self.rtc_beta = float(rtc_beta)
        dev = policy.device
        if cuda_graph and dev.type != "cuda":
            raise ValueError(f"cuda_graph: CUDA graphs need the policy on a CUDA device, it is on {dev}")
        if cuda_graph and not policy.head.caps.sync_free_sample:
            raise ValueError(f"cuda_graph: the {type(policy.head).__name__} head cannot be captured (sampling has host syncs)")
        if compile and not cuda_graph:
            raise ValueError("compile: compiles the functions a CUDA graph captures; it needs cuda_graph=True")
        self.cuda_graph, self.compile = bool(cuda_graph), bool(compile)
        self._graphs: dict[tuple, Any] = {}
        self._gen = torch.Generator().manual_seed(int(seed))  # noise for requests that bring neither noise nor seed

    # -- metadata -------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What a client needs to build requests and run chunks (msgpack-able; sent on connect)."""
        from chunkpolicy import __version__

        embs = {}
        for spec in self.space.embodiments:
            embs[spec.name] = {"schema": self.schemas[spec.name].to_dict(), "action_dim": spec.action_dim,
                               "action_names": list(spec.action_names), "state_dim": spec.state_dim,
                               "cameras": list(spec.cameras), "control_hz": float(spec.control_hz)}
        default = self.default_embodiment
        meta: dict[str, Any] = {
            "server": "chunkpolicy", "version": __version__, "protocol": P.PROTOCOL, "protocol_version": P.PROTOCOL_VERSION,
            "embodiment": default, "embodiments": embs, "schema": embs[default]["schema"] if default else None,
            "action_horizon": self.H, "unified_dim": self.D, "n_obs_steps": int(self.policy.config.n_obs_steps),
            "head": self.policy.config.head.type, "num_steps": self.num_steps, "rtc": self.rtc, "may_fail": self.may_fail,
            "device": str(self.policy.device), "cuda_graph": self.cuda_graph,
        }
        if default:
            meta["action_dim"] = embs[default]["action_dim"]
            meta["action_names"] = embs[default]["action_names"]
        return meta

    # -- requests -------------------------------------------------------------------------------------------------
    def decode(self, msg: Any) -> Request:
        """Validate one unpacked request; raises ``ValueError`` naming the first bad field."""
        if not isinstance(msg, Mapping):
            raise ValueError(f"request: expected a map of observation fields, got {type(msg).__name__}")
        m = P.flatten(msg)
        emb = m.get(P.EMBODIMENT, self.default_embodiment)
        if emb is None:
            raise ValueError(f"{P.EMBODIMENT}: missing; this server serves several embodiments {list(self.schemas)}")
        if not isinstance(emb, str) or emb not in self.schemas:
            raise ValueError(f"{P.EMBODIMENT}: expected one of {list(self.schemas)}, got {emb!r}")
        schema, e = self.schemas[emb], self.space.id_of(emb)
        spec = self.space.spec(e)
        T = schema.n_obs_steps

        frames: dict[str, np.ndarray] = {}
        for cam, keys in schema.cameras.items():
            hit = _field(m, keys)
            if hit is None:
                raise ValueError(f"{keys[0]}: missing (camera {cam!r} of {emb!r}; accepted keys {keys})")
            k, v = hit
            want = "uint8 [h, w, 3] (HWC)" if T == 1 else f"uint8 [{T}, h, w, 3] (T_obs frames, oldest first, HWC)"
            if not isinstance(v, np.ndarray) or v.dtype != np.uint8:
                raise ValueError(f"{k}: expected a numpy {want}, got {_describe(v)}")
            f = v[None] if v.ndim == 3 and T == 1 else v
            if f.ndim != 4 or f.shape[0] != T or f.shape[3] != 3 or min(f.shape[1:3]) < 1:
                raise ValueError(f"{k}: expected {want}, got {_describe(v)}")
            frames[cam] = resize_frames(f, schema.image_size)

        hit = _field(m, schema.state)
        if hit is None:
            raise ValueError(f"{schema.state[0]}: missing (state {schema.state_names} of {emb!r}; accepted keys {schema.state})")
        k, st = hit
        S = spec.state_dim
        want = f"[{S}]" if T == 1 else f"[{T}, {S}] (T_obs states, oldest first)"
        if not isinstance(st, np.ndarray) or st.dtype.kind not in "fiu":
            raise ValueError(f"{k}: expected a numeric numpy array {want}, got {_describe(st)}")
        if (st.shape != (T, S)) and not (T == 1 and st.shape == (S,)):
            raise ValueError(f"{k}: expected {want} ({', '.join(spec.state_names)}), got {_describe(st)}")
        st = st.astype(np.float32).reshape(T, S)
        if not np.isfinite(st).all():
            raise ValueError(f"{k}: contains NaN or inf")

        hit = _field(m, schema.prompt)
        if hit is None:
            if schema.default_prompt is None:
                raise ValueError(f"{schema.prompt[0]}: missing (a task instruction string; the server has no default prompt)")
            k, prompt = schema.prompt[0], schema.default_prompt
        else:
            k, prompt = hit
        if not isinstance(prompt, str):
            raise ValueError(f"{k}: expected a string, got {type(prompt).__name__}")
        # its length is checked by check_prompt, on the inference thread (a fast tokenizer must not run on two threads)

        noise = self._noise(m)
        prefix, d = self._rtc_fields(m, spec)

        # the conversion closed-loop evaluation uses (uint8 frames, as in training), one call per observation frame
        from chunkpolicy.sim.base import obs_to_batch

        parts = [obs_to_batch([{"images": {c: f[t] for c, f in frames.items()}, "state": st[t]}], self.space, spec, [prompt])
                 for t in range(T)]
        batch = dict(parts[-1])
        if T > 1:
            batch["images"] = torch.cat([p["images"] for p in parts], dim=2)  # [1, N, T, 3, h, w]
            batch["state"] = torch.cat([p["state"] for p in parts], dim=1)  # [1, T, D]
        return Request(emb, e, batch, noise, prefix, d, k)

    def check_prompt(self, req: Request) -> None:
        """Raise ``ValueError`` naming the prompt field if the request's prompt does not fit the policy's tokens."""
        prompts = [p for p in req.batch["prompt"] if p not in self._prompts_ok]
        if not prompts:
            return
        try:
            self._check_prompts(self.policy.tokenizer, prompts, self.policy.config.max_prompt_tokens)
        except ValueError as err:
            raise ValueError(f"{req.prompt_key}: {err}") from None
        if len(self._prompts_ok) >= 1024:  # bounded: many distinct prompts only cost the check again
            self._prompts_ok.pop(next(iter(self._prompts_ok)))
        self._prompts_ok.update(dict.fromkeys(prompts))

    def _noise(self, m: Mapping[str, Any]) -> torch.Tensor:
        if P.NOISE in m and P.SEED in m:
            raise ValueError(f"{P.NOISE}: give noise or seed, not both")
        if P.NOISE in m:
            v = m[P.NOISE]
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.shape != (self.H, self.D):
                raise ValueError(f"{P.NOISE}: expected a float numpy array [{self.H}, {self.D}] (H, unified dim), got {_describe(v)}")
            if not np.isfinite(v).all():
                raise ValueError(f"{P.NOISE}: contains NaN or inf")
            return torch.from_numpy(v.astype(np.float32))[None]
        if P.SEED in m:
            s = m[P.SEED]
            if isinstance(s, np.integer):
                s = int(s)
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
                raise ValueError(f"{P.SEED}: expected a non-negative int, got {s!r}")
            return seeded_noise(s, self.H, self.D)
        return torch.randn(1, self.H, self.D, generator=self._gen)

    def _rtc_fields(self, m: Mapping[str, Any], spec: Any) -> tuple[np.ndarray | None, int]:
        has_p, has_d = P.RTC_PREFIX in m, P.RTC_PREFIX_LEN in m
        if not has_p and not has_d:
            return None, 0
        if not has_p:
            raise ValueError(f"{P.RTC_PREFIX}: missing ({P.RTC_PREFIX_LEN} was given)")
        if not self.rtc:
            raise ValueError(f"{P.RTC_PREFIX}: real-time chunking needs a head with a flow velocity; this server's "
                             f"{self.policy.config.head.type} head has none (metadata 'rtc' is false)")
        v = m[P.RTC_PREFIX]
        A = spec.action_dim
        # n = H - s for an executor running s >= 1 actions per chunk
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu" or v.ndim != 2 or v.shape[1] != A \
                or not 1 <= v.shape[0] < self.H:
            raise ValueError(f"{P.RTC_PREFIX}: expected a numeric numpy array [n, {A}] with 1 <= n < H = {self.H} "
                             f"(the previous chunk's actions still to run), got {_describe(v)}")
        if not np.isfinite(v).all():
            raise ValueError(f"{P.RTC_PREFIX}: contains NaN or inf")
        d = m.get(P.RTC_PREFIX_LEN, 0)
        if isinstance(d, np.integer):
            d = int(d)
        n = v.shape[0]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= n:
            raise ValueError(f"{P.RTC_PREFIX_LEN}: expected an int in [0, {n}] (the prefix has {n} steps), got {d!r}")
        return v.astype(np.float32)[None], d

    # -- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, reqs: Sequence[Request]) -> list[dict[str, Any]]:
        """Replies for requests of one :attr:`Request.group`, computed as one batch: ``{"actions": float32 [H, A],
        "policy_timing": {"infer_ms"}}`` (+ ``"valid"`` when the head may fail)."""
        if len({r.group for r in reqs}) != 1:
            raise ValueError("run: requests of different groups cannot share a batch")
        t0 = time.perf_counter()
        pol, e, B = self.policy, reqs[0].emb_id, len(reqs)
        if self.cuda_graph:  # a graph per batch size: pad to a power of two so few are captured
            reqs = list(reqs) + [reqs[0]] * ((1 << (B - 1).bit_length()) - B)
        batch = {k: torch.cat([r.batch[k] for r in reqs]) if isinstance(reqs[0].batch[k], torch.Tensor)
                 else [p for r in reqs for p in r.batch[k]] for k in reqs[0].batch}
        noise = torch.cat([r.noise for r in reqs]).to(pol.device, pol.backbone.state_proj.weight.dtype)
        if reqs[0].prefix is None:
            out = self._graph(("plain", e, len(reqs)), batch)(batch, noise=noise) if self.cuda_graph else \
                pol.predict_unified(batch, num_steps=self.num_steps, noise=noise)
        else:
            from chunkpolicy.runtime.rtc import RTCGuidance, rtc_target

            batch = {k: v.to(pol.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            inp = pol.prepare_inputs(batch, pol.validate(batch, training=False))
            prefix = np.concatenate([r.prefix for r in reqs])
            target, w = rtc_target(pol, prefix, inp, None, reqs[0].prefix_len)
            if self.cuda_graph:
                g = self._graph(("rtc", e, len(reqs)), batch, RTCGuidance(torch.zeros_like(target), torch.zeros_like(w), self.rtc_beta))
                g.guidance.set(target, w)
                out = g(batch, noise=noise)
            else:
                out = pol.infer(inp, noise, self.num_steps, guidance=RTCGuidance(target, w, self.rtc_beta))
        actions = self.space.unpad(out, e, "action").float()
        valid = torch.isfinite(actions).flatten(1).all(1)
        if self.may_fail and pol.head.last_valid is not None:
            valid &= torch.as_tensor(pol.head.last_valid).reshape(-1).to(valid.device).bool()
        actions, valid = actions.cpu().numpy(), valid.cpu().numpy()
        ms = 1000 * (time.perf_counter() - t0)
        replies = []
        for b in range(B):  # padding rows (CUDA graphs) are dropped here
            r: dict[str, Any] = {"actions": np.ascontiguousarray(actions[b], dtype=np.float32),
                                 "policy_timing": {"infer_ms": ms, "batch_size": B}}
            if self.may_fail:
                r["valid"] = bool(valid[b])
            elif not valid[b]:  # a head that cannot fail returned NaN: a bug, never passed on as actions
                raise RuntimeError("inference: the policy returned NaN or inf actions")
            replies.append(r)
        return replies

    def warmup(self) -> None:
        """Capture the batch-1 graphs (plain and, for flow heads, guided) before the first client arrives: a capture
        (and compilation) takes seconds, which a robot's first request should not wait for."""
        e = self.default_embodiment or self.space.embodiments[0].name
        sch, spec = self.schemas[e], self.space.spec(self.space.id_of(e))
        T, (h, w) = sch.n_obs_steps, sch.image_size
        req = {sch.cameras[c][0]: np.zeros((T, h, w, 3), np.uint8) for c in spec.cameras}
        req.update({sch.state[0]: np.zeros((T, spec.state_dim), np.float32), sch.prompt[0]: "warm up", P.EMBODIMENT: e})
        self.run([self.decode(req)])
        if self.rtc and self.H > 1:
            req.update({P.RTC_PREFIX: np.zeros((self.H - 1, spec.action_dim), np.float32), P.RTC_PREFIX_LEN: 1})
            self.run([self.decode(req)])

    def _graph(self, key: tuple, example: Mapping[str, Any], guidance: Any = None) -> Any:
        if key not in self._graphs:
            from chunkpolicy.runtime.graphs import CudaGraphPolicy

            ex = {k: v.to(self.policy.device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
            self._graphs[key] = CudaGraphPolicy(self.policy, ex, num_steps=self.num_steps, compile=self.compile,
                                                guidance=guidance)
        return self._graphs[key]


def seeded_noise(seed: int, horizon: int, dim: int) -> torch.Tensor:
    """The initial noise ``[1, H, D]`` a request with ``seed`` gets: ``torch.randn`` from a CPU generator seeded
    with it (so a test or a second process can reproduce a served chunk in process)."""
    return torch.randn(1, horizon, dim, generator=torch.Generator().manual_seed(int(seed)))


# -- the network side ---------------------------------------------------------------------------------------------------
class PolicyServer:
    """Websocket front end + one inference thread with dynamic batching (see the module docstring).

    ``port=0`` picks a free port (read :attr:`port` once started). ``max_request_bytes``: a larger request is
    answered with an error (the connection stays); one over 4× that is refused by the websocket layer (connection
    closed with 1009). Use :meth:`serve_forever` in a process of its own, or :meth:`start` / :meth:`stop` to run it in
    a background thread (tests, notebooks).
    """

    def __init__(self, service: PolicyService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_batch: int = 8, batch_wait_ms: float = 0.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 drain_timeout_s: float = 30.0) -> None:
        if max_batch < 1 or batch_wait_ms < 0 or max_request_bytes < 1:
            raise ValueError(f"need max_batch >= 1, batch_wait_ms >= 0, max_request_bytes >= 1; got {max_batch}, "
                             f"{batch_wait_ms}, {max_request_bytes}")
        self.service, self.host, self.port, self.api_key = service, host, int(port), api_key or None
        self.max_batch, self.batch_wait_s, self.max_request_bytes = int(max_batch), batch_wait_ms / 1000, int(max_request_bytes)
        self.drain_timeout_s = float(drain_timeout_s)
        self.metadata = {**service.metadata(), "max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes,
                         "api_key_required": self.api_key is not None}
        self._packed_metadata = P.pack(self.metadata)
        self._queue: queue.Queue = queue.Queue()
        self._conns: set[Any] = set()
        self._inflight = 0
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self.stats = {"requests": 0, "errors": 0, "batches": 0, "dropped": 0}

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve until :meth:`request_stop`; then drain and close gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._worker_stop.clear()
        worker = threading.Thread(target=self._work, name="chunkpolicy-infer", daemon=True)
        worker.start()
        try:
            async with ws_server.serve(self._handler, self.host, self.port, compression=None,
                                       max_size=4 * self.max_request_bytes, process_request=self._process_request) as srv:
                self.port = srv.sockets[0].getsockname()[1]
                log.info("listening on ws://%s:%d", self.host, self.port)
                self._ready.set()
                await self._stop_event.wait()
                await self._drain(srv)
        finally:
            self._worker_stop.set()
            worker.join(timeout=self.drain_timeout_s)

    async def _drain(self, srv: Any) -> None:
        self._draining = True
        srv.close(close_connections=False)  # no new connections; open ones finish their request in flight
        deadline = time.monotonic() + self.drain_timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.gather(*(c.close(1001, "server shutting down") for c in list(self._conns)), return_exceptions=True)
        await srv.wait_closed()

    def request_stop(self) -> None:
        """Ask a running server to shut down gracefully (thread-safe; what SIGTERM does)."""
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)

    def serve_forever(self) -> None:
        """Run in this thread until SIGTERM / SIGINT (graceful shutdown)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            await self.serve()

        asyncio.run(main())

    def start(self, timeout: float = 60.0) -> "PolicyServer":
        """Serve from a background thread; returns once listening (:attr:`port` is then the bound port)."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
            self._ready.set()  # a failed start must not leave start() waiting

        self._thread = threading.Thread(target=run, name="chunkpolicy-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or errors:
            raise RuntimeError(f"serve: the server did not start ({errors[0] if errors else 'timeout'})")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown of a server started with :meth:`start`."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def uri(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # -- connections ----------------------------------------------------------------------------------------------
    def _process_request(self, conn: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return conn.respond(http.HTTPStatus.OK, "OK\n")
        if self._draining:
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            want = f"Api-Key {self.api_key}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                log.warning("refused %s: missing or wrong API key", conn.remote_address)
                return conn.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Api-Key ...)\n")
        return None

    async def _handler(self, ws: Any) -> None:
        self._conns.add(ws)
        log.info("connection from %s", ws.remote_address)
        try:
            await ws.send(self._packed_metadata)
            prev_total: float | None = None
            while True:
                try:
                    msg = await ws.recv()
                except websockets.ConnectionClosed:
                    break
                t0 = time.perf_counter()
                if self._draining:
                    await ws.send("server: shutting down, request not served")
                    # say "going away" ourselves: a handler that just returns would close with 1000 (normal)
                    await ws.close(1001, "server shutting down")
                    break
                reply = await self._answer(ws, msg, t0, prev_total)
                if reply is None:  # the client went away mid-request
                    break
                try:
                    await ws.send(reply)
                except websockets.ConnectionClosed:
                    break
                prev_total = time.perf_counter() - t0
        except websockets.ConnectionClosed:
            pass
        finally:
            self._conns.discard(ws)
            log.info("connection from %s closed", ws.remote_address)

    async def _answer(self, ws: Any, msg: Any, t0: float, prev_total: float | None) -> bytes | str | None:
        """The reply frame for one request: packed reply, an error line (text frame), or None (client gone)."""
        self.stats["requests"] += 1
        if isinstance(msg, str):
            return self._error("request: expected a binary msgpack frame, got a text frame")
        if len(msg) > self.max_request_bytes:
            return self._error(f"request: {len(msg)} bytes exceeds the server's limit of {self.max_request_bytes} bytes "
                               "(chunkpolicy serve --max-request-mb; send smaller images: the server resizes anyway)")
        try:
            req = self.service.decode(P.unpack(msg))
        except ValueError as e:  # ProtocolError included
            return self._error(str(e))
        except Exception as e:  # noqa: BLE001 - a request never takes the server down
            log.exception("decoding a request failed")
            return self._error(f"request: could not be decoded ({type(e).__name__}: {e})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inflight += 1
        try:
            self._queue.put((req, fut, time.perf_counter()))
            wrapped = asyncio.wrap_future(fut)
            closed = asyncio.ensure_future(ws.wait_closed())
            done, _ = await asyncio.wait({wrapped, closed}, return_when=asyncio.FIRST_COMPLETED)
            if wrapped not in done:
                fut.cancel()  # still queued: the inference thread skips it; running: its reply is dropped
                wrapped.cancel()
                self.stats["dropped"] += 1
                return None
            closed.cancel()
            try:
                reply = wrapped.result()
            except ValueError as e:
                return self._error(str(e))
            except Exception as e:  # noqa: BLE001
                log.error("inference failed: %s: %s", type(e).__name__, e)
                return self._error(f"server: inference failed ({type(e).__name__}: {e})")
        finally:
            self._inflight -= 1
        timing = {"infer_ms": reply["policy_timing"]["infer_ms"], "queue_ms": reply.pop("_queue_ms"),
                  "batch_size": reply["policy_timing"]["batch_size"],
                  "total_ms": 1000 * (time.perf_counter() - t0)}
        if prev_total is not None:
            timing["prev_total_ms"] = 1000 * prev_total  # the previous round trip as the server saw it, send included
        reply["server_timing"] = timing
        return P.pack(reply)

    def _error(self, text: str) -> str:
        self.stats["errors"] += 1
        log.info("refused a request: %s", text)
        return text

    # -- inference thread -----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=0.05)]
            except queue.Empty:
                if self._worker_stop.is_set():
                    return
                continue
            deadline = time.perf_counter() + self.batch_wait_s
            while len(items) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    items.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            live = []
            for it in items:
                if not it[1].set_running_or_notify_cancel():  # its client is gone
                    continue
                try:
                    self.service.check_prompt(it[0])
                    live.append(it)
                except ValueError as e:
                    it[1].set_exception(e)
            groups: dict[tuple, list] = {}
            for it in live:
                groups.setdefault(it[0].group, []).append(it)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list) -> None:
        start = time.perf_counter()
        try:
            replies = self.service.run([r for r, _, _ in group])
        except Exception as e:  # noqa: BLE001
            if len(group) > 1:  # one bad request must not fail the others: run them one by one
                for it in group:
                    self._run_group([it])
                return
            group[0][1].set_exception(e)
            return
        self.stats["batches"] += 1
        for (_, fut, queued), reply in zip(group, replies):
            reply["_queue_ms"] = 1000 * (start - queued)
            fut.set_result(reply)


# -- command line -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory or a training run directory (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for every interface — then set an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Api-Key KEY' on connect "
                   "(default: $CHUNKPOLICY_API_KEY if set, else no key)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the chunk before capturing its CUDA graph (GPU)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run eagerly on a GPU (default: replay CUDA graphs)")
    p.add_argument("--num-steps", type=int, default=None, help="integration / denoising steps (default: the head's)")
    p.add_argument("--embodiment", default=None, help="embodiment of requests that name none (default: the only one)")
    p.add_argument("--key", action="append", default=[], metavar="NAME=WIRE_KEY",
                   help="wire key for a camera, 'state' or 'prompt', e.g. --key top=observation/image (repeatable)")
    p.add_argument("--default-prompt", default=None, help="prompt for requests that send none")
    p.add_argument("--max-batch", type=int, default=8, help="most requests run as one batch (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="wait this long for more requests before running a batch (default 0: run what is queued)")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                   help="largest request answered (default 32 MiB)")
    p.add_argument("--rtc-beta", type=float, default=5.0, help="real-time chunking guidance cap β (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise for requests without noise or seed")
    return p


def _key_map(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        name, sep, key = it.partition("=")
        if not sep or not name or not key:
            raise ValueError(f"--key: expected NAME=WIRE_KEY, got {it!r}")
        out[name] = key
    return out


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        from chunkpolicy.config import resolve_checkpoint
        from chunkpolicy.models.policy import ChunkPolicy

        ck = resolve_checkpoint(a.checkpoint)
        if ck is None:
            raise FileNotFoundError(f"{a.checkpoint}: not a chunkpolicy checkpoint (no config.json + model.safetensors) "
                                    "nor a run directory with checkpoints/step_* in it")
        dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        policy = ChunkPolicy.from_pretrained(ck, map_location=dev)
        graph = dev.type == "cuda" and not a.no_cuda_graph and policy.head.caps.sync_free_sample
        if a.compile and not graph:
            raise ValueError("--compile: compiles the CUDA-graph path; it needs a CUDA device and a graph-capturable head")
        service = PolicyService(policy, embodiment=a.embodiment, key_map=_key_map(a.key), default_prompt=a.default_prompt,
                                num_steps=a.num_steps, rtc_beta=a.rtc_beta, cuda_graph=graph, compile=a.compile, seed=a.seed)
        if graph:
            print("chunkpolicy serve: capturing CUDA graphs" + (" (compiling: minutes)" if a.compile else ""), flush=True)
            service.warmup()
        server = PolicyServer(service, a.host, a.port, api_key=a.api_key or os.environ.get("CHUNKPOLICY_API_KEY"),
                              max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
                              max_request_bytes=int(a.max_request_mb * 2**20))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"chunkpolicy serve: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    if a.host not in ("127.0.0.1", "localhost", "::1") and server.api_key is None:
        print(f"chunkpolicy serve: warning: listening on {a.host} without an API key", file=sys.stderr)
    print(f"chunkpolicy serve: {ck} on {dev} ({'CUDA graphs' if graph else 'eager'}); listening on ws://{a.host}:"
          f"{a.port if a.port else '<free port>'} (health: GET /healthz); Ctrl-C or SIGTERM stops", flush=True)
    try:
        server.serve_forever()
    except OSError as e:  # port in use, address not available
        print(f"chunkpolicy serve: error: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    print("chunkpolicy serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
