"""``chunkpolicy serve``: a checkpoint behind openpi's websocket protocol (see :mod:`chunkpolicy.serving.protocol`).

    chunkpolicy serve runs/NAME [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--device cuda] [--compile]

An unmodified ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` connects, reads the metadata and calls
``infer(obs) -> {"actions": [H, A], "server_timing", "policy_timing"}``; ``openpi_client.action_chunk_broker`` works
on top, and so does our torch-free :class:`chunkpolicy.serving.client.PolicyClient` with every executor.

Structure: :class:`~chunkpolicy.serving.service.PolicyService` (:mod:`.service`, the policy side: validates one
request into a batch-schema observation, runs groups of requests as one batch) and :class:`PolicyServer` (here:
asyncio websockets front end + one inference thread). The front end
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
from typing import Any, Sequence

import torch
import websockets
import websockets.asyncio.server as ws_server

from chunkpolicy.serving import protocol as P
from chunkpolicy.serving.service import PolicyService

log = logging.getLogger("chunkpolicy.serve")

DEFAULT_MAX_REQUEST_BYTES = 32 << 20


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
