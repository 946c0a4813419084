"""chunkpolicy serve: openpi's websocket protocol driven by the real `openpi-client` package and by our client.

A tiny random checkpoint served from a background thread on a loopback port; every reply is compared with the
in-process chunk for the same observation and noise.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request

import msgpack
import numpy as np
import pytest
import torch
import websockets

from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.serving import protocol as P
from chunkpolicy.serving.server import PolicyServer
from chunkpolicy.serving.service import PolicyService, resize_frames, seeded_noise
from chunkpolicy.sim.base import obs_to_batch
from helpers import toy_policy

# openpi-client 0.1.2 opens its connection without a context manager, which websockets >= 17.1 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
openpi_ws = pytest.importorskip("openpi_client.websocket_client_policy", reason="openpi-client is not installed "
                                "(scripts/setup.sh installs it without its numpy<2 pin)")
from openpi_client import action_chunk_broker, msgpack_numpy  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from chunkpolicy.serving.client import PolicyClient, RobotLoop, ServerError  # noqa: E402

H = 6


@pytest.fixture(autouse=True)
def _close_openpi_clients(monkeypatch):
    """openpi's client has no close(): each test's connections are closed when it ends, so that no test leaves open
    connections (and their reader threads) behind for the next."""
    opened = []
    orig = openpi_ws.WebsocketClientPolicy._wait_for_server

    def tracked(self):
        conn, meta = orig(self)
        opened.append(conn)
        return conn, meta

    monkeypatch.setattr(openpi_ws.WebsocketClientPolicy, "_wait_for_server", tracked)
    yield
    for conn in opened:
        conn.close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = toy_policy(horizon=H).save_pretrained(tmp_path_factory.mktemp("ckpt") / "toy")
    return ChunkPolicy.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(PolicyService(policy), port=0).start()
    yield srv
    srv.stop()


def wire_obs(i: int = 0, size: tuple[int, int] = (32, 32), seed: int | None = None, prompt: str = "push") -> dict:
    """An openpi-style observation (LIBERO key names) for the toy embodiment (cameras top, wrist; state x, y)."""
    rng = np.random.default_rng(i)
    obs = {"observation/image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
           "observation/state": rng.normal(size=2).astype(np.float32), "prompt": prompt}
    if seed is not None:
        obs["seed"] = seed
    return obs


def in_process(policy, obs: dict, seed: int) -> np.ndarray:
    """The chunk [H, A] the policy computes in process for ``obs`` (trained-size images) and ``seed``."""
    env_obs = {"images": {"top": obs["observation/image"], "wrist": obs["observation/wrist_image"]},
               "state": obs["observation/state"]}
    batch = obs_to_batch([env_obs], policy.space, "toy", [obs["prompt"]])
    return policy.space.unpad(policy.predict_unified(batch, noise=seeded_noise(seed, H, 32)), 0, "action")[0].numpy()


# -- openpi-client --------------------------------------------------------------------------------------------------
def test_metadata_and_infer_match_in_process(server, policy):
    client = openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["server"] == "chunkpolicy" and meta["action_horizon"] == H and meta["action_dim"] == 3
    assert meta["schema"]["cameras"]["top"] == ["observation/images/top", "observation/image"]
    assert meta["schema"]["state"][0] == "observation/state" and meta["schema"]["image_size"] == [32, 32]
    assert meta["rtc"] is True and meta["api_key_required"] is False
    obs = wire_obs(1, seed=7)
    out = client.infer(obs)
    assert out["actions"].shape == (H, 3) and out["actions"].dtype == np.float32
    assert out["server_timing"]["infer_ms"] > 0 and out["policy_timing"]["batch_size"] == 1
    np.testing.assert_allclose(out["actions"], in_process(policy, obs, 7), rtol=0, atol=1e-6)
    # nested maps are the same request as "/" keys; a fresh connection gets the same answer
    nested = {"observation": {"image": obs["observation/image"], "wrist_image": obs["observation/wrist_image"],
                              "state": obs["observation/state"]}, "prompt": "push", "seed": 7}
    again = openpi_ws.WebsocketClientPolicy(f"ws://127.0.0.1:{server.port}").infer(nested)
    np.testing.assert_array_equal(again["actions"], out["actions"])


def test_any_image_size_is_resized_as_training(server):
    client = openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port)
    big = wire_obs(2, size=(48, 80), seed=3)
    small = {**big, "observation/image": resize_frames(big["observation/image"][None], (32, 32))[0],
             "observation/wrist_image": resize_frames(big["observation/wrist_image"][None], (32, 32))[0]}
    np.testing.assert_array_equal(client.infer(big)["actions"], client.infer(small)["actions"])


def test_action_chunk_broker_and_reset(server):
    inner = openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port)
    broker = action_chunk_broker.ActionChunkBroker(inner, action_horizon=3)
    obs = wire_obs(3, seed=11)
    full = inner.infer(obs)["actions"]
    steps = [broker.infer(obs)["actions"] for _ in range(3)]
    np.testing.assert_array_equal(np.stack(steps), full[:3])
    broker.infer(obs)  # a new chunk started (cur_step 1 of it)
    broker.reset()
    np.testing.assert_array_equal(broker.infer(obs)["actions"], full[0])  # after reset: a new chunk from step 0


def test_health_check(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read().strip() == b"OK"


def test_api_key(policy):
    import websockets

    with PolicyServer(PolicyService(policy), port=0, api_key="s3cret") as srv:
        with pytest.raises(websockets.InvalidStatus, match="401"):
            openpi_ws.WebsocketClientPolicy("127.0.0.1", srv.port, api_key="wrong")
        with pytest.raises(websockets.InvalidStatus, match="401"):
            openpi_ws.WebsocketClientPolicy("127.0.0.1", srv.port)
        with pytest.raises(ConnectionError, match="API key"):
            PolicyClient(f"ws://127.0.0.1:{srv.port}", api_key="wrong", connect_timeout=2)
        ok = openpi_ws.WebsocketClientPolicy("127.0.0.1", srv.port, api_key="s3cret")
        assert ok.get_server_metadata()["api_key_required"] is True
        assert ok.infer(wire_obs(0))["actions"].shape == (H, 3)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as r:  # probes need no key
            assert r.status == 200


def _without(key):
    def f(o):
        del o[key]
        return o
    return f


MALFORMED = [
    ("missing image", _without("observation/image"), "observation/images/top: missing"),
    ("missing state", _without("observation/state"), "observation/state: missing"),
    ("missing prompt", _without("prompt"), "prompt: missing"),
    ("state shape", lambda o: {**o, "observation/state": np.zeros(5, np.float32)}, "observation/state: expected [2]"),
    ("state dtype", lambda o: {**o, "observation/state": np.array(["a", "b"])}, "observation/state: expected a numeric"),
    ("state NaN", lambda o: {**o, "observation/state": np.array([np.nan, 0], np.float32)}, "observation/state: contains NaN"),
    ("image dtype", lambda o: {**o, "observation/image": o["observation/image"].astype(np.float32)},
     "observation/image: expected a numpy uint8"),
    ("image CHW", lambda o: {**o, "observation/image": np.zeros((3, 32, 32), np.uint8)}, "observation/image: expected uint8"),
    ("prompt type", lambda o: {**o, "prompt": 42}, "prompt: expected a string, got int"),
    ("prompt bytes", lambda o: {**o, "prompt": b"push"}, "prompt: expected a string, got bytes"),
    ("prompt too long", lambda o: {**o, "prompt": "x" * 500}, "prompt:"),
    ("seed type", lambda o: {**o, "seed": "x"}, "seed: expected a non-negative int"),
    ("noise shape", lambda o: {**o, "noise": np.zeros((2, 2), np.float32)}, "noise: expected a float numpy array [6, 32]"),
    ("rtc prefix shape", lambda o: {**o, "rtc/prefix": np.zeros((2, 5), np.float32), "rtc/prefix_len": 1}, "rtc/prefix: expected"),
    ("rtc prefix_len", lambda o: {**o, "rtc/prefix": np.zeros((2, 3), np.float32), "rtc/prefix_len": 9}, "rtc/prefix_len: expected"),
    ("embodiment", lambda o: {**o, "embodiment": "aloha"}, "embodiment: expected one of ['toy']"),
]


@pytest.mark.parametrize("name,mutate,msg", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_answered_and_the_server_keeps_serving(server, name, mutate, msg):
    client = openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port)
    with pytest.raises(RuntimeError, match="Error in inference server") as e:
        client.infer(mutate(wire_obs(4)))
    assert msg in str(e.value)
    assert client.infer(wire_obs(4))["actions"].shape == (H, 3)  # the same connection still works


def test_request_while_stopping_is_refused_then_closed_going_away(policy):
    """A request that arrives once the graceful stop has begun gets a reply saying so, then the 1001 close (a handler
    that just returned would have closed with 1000 "normal"; seen as a flaky SIGTERM test in CI)."""
    with PolicyServer(PolicyService(policy), port=0) as srv:
        with connect(f"ws://127.0.0.1:{srv.port}", max_size=None) as ws:
            ws.recv()  # metadata
            srv._draining = True  # the state _drain() sets first (white-box: the stop itself would race this client)
            ws.send(msgpack_numpy.packb(wire_obs(0)))
            assert ws.recv() == "server: shutting down, request not served"
            with pytest.raises(websockets.ConnectionClosed) as e:
                ws.recv()
            assert e.value.rcvd.code == 1001
        srv._draining = False


def test_malformed_frames(server, policy):
    """Frames openpi's client cannot even produce: not msgpack, a text frame, lying arrays, over the size limit."""
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        ws.recv()  # metadata
        bad_array = msgpack_numpy.packb(wire_obs(5))
        bad_array = bad_array.replace(b"\xa3<f4", b"\xa3<f8")  # state says float64 but carries 8 bytes
        for frame, msg in [(b"\xc1\xc1garbage", "request: not a msgpack message"),
                           ("hello", "request: expected a binary msgpack frame"),
                           (msgpack_numpy.packb([1, 2]), "request: expected a map"),
                           (bad_array, "numpy array: 8 bytes of data for dtype float64 and shape [2]"),
                           (msgpack.packb({"x": {b"__ndarray__": True, b"data": bytes(16), b"dtype": "<c16", b"shape": [1]}}),
                            "dtype complex128 is refused")]:
            ws.send(frame)
            reply = ws.recv()
            assert isinstance(reply, str) and msg in reply, (frame[:20], reply)
        ws.send(msgpack_numpy.packb(wire_obs(5)))
        assert msgpack_numpy.unpackb(ws.recv())["actions"].shape == (H, 3)
    with PolicyServer(PolicyService(policy), port=0, max_request_bytes=20_000) as small:
        c = openpi_ws.WebsocketClientPolicy("127.0.0.1", small.port)
        with pytest.raises(RuntimeError, match="request: .* bytes exceeds the server's limit of 20000 bytes"):
            c.infer(wire_obs(6, size=(96, 96)))
        assert c.infer(wire_obs(6))["actions"].shape == (H, 3)
        with connect(f"ws://127.0.0.1:{small.port}", max_size=None) as ws:  # over 4x the limit: the websocket layer
            ws.recv()                                                        # closes this connection (1009) ...
            ws.send(msgpack_numpy.packb(wire_obs(6, size=(160, 160))))
            with pytest.raises(websockets.ConnectionClosed) as e:
                ws.recv()
            assert e.value.rcvd.code == 1009
        assert c.infer(wire_obs(6))["actions"].shape == (H, 3)  # ... and nothing else
        small.service.warmup()  # batch-1 chunks (plain and guided) before the first client: runs eagerly on CPU


def _gate(srv: PolicyServer):
    """Hold the inference thread at its next batch until the returned event is set; counts the batch sizes."""
    gate, sizes, real = threading.Event(), [], srv.service.run

    def run(reqs):
        gate.wait(20)
        sizes.append(len(reqs))
        return real(reqs)

    srv.service.run = run
    return gate, sizes, real


def test_disconnect_mid_request_does_not_disturb_others(server, policy):
    gate, sizes, real = _gate(server)
    try:
        gone = connect(f"ws://127.0.0.1:{server.port}", max_size=None).__enter__()
        gone.recv()
        gone.send(msgpack_numpy.packb(wire_obs(7, seed=1)))  # held at the gate (running) ...
        other = {}
        t = threading.Thread(target=lambda: other.update(openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port)
                                                         .infer(wire_obs(8, seed=2))))
        t.start()
        gone.close()  # ... and its client leaves before the reply
        gate.set()
        t.join(20)
        np.testing.assert_allclose(other["actions"], in_process(policy, wire_obs(8), 2), atol=1e-6)
    finally:
        server.service.run = real
    assert openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port).infer(wire_obs(9))["actions"].shape == (H, 3)


def test_eight_concurrent_clients_are_batched_and_answered_correctly(server, policy):
    clients = [openpi_ws.WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(8)]
    prompts = ["push", "pick up the red cube", "open the drawer", "x", "push left", "wipe", "stack", "close"]
    obs = [wire_obs(20 + i, seed=100 + i, prompt=prompts[i]) for i in range(8)]
    gate, sizes, real = _gate(server)
    out: list = [None] * 8
    try:
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, clients[i].infer(obs[i]))) for i in range(8)]
        for t in threads:
            t.start()
        while server._inflight < 8:  # every request is queued (the first one held at the gate)
            threading.Event().wait(0.01)
        gate.set()
        for t in threads:
            t.join(30)
    finally:
        server.service.run = real
    assert sum(sizes) == 8 and max(sizes) > 1, sizes  # dynamic batching
    for i in range(8):
        np.testing.assert_allclose(out[i]["actions"], in_process(policy, obs[i], 100 + i), rtol=0, atol=1e-5)
    assert max(o["server_timing"]["batch_size"] for o in out) == max(sizes)


# -- our client -----------------------------------------------------------------------------------------------------
def env_obs(i: int) -> dict:
    o = wire_obs(i)
    return {"images": {"top": o["observation/image"], "wrist": o["observation/wrist_image"]}, "state": o["observation/state"]}


@pytest.mark.parametrize("spec", ["open_loop:4", "temporal_ensemble:0.1", "rtc:2,1"])
def test_our_client_drives_every_executor(server, spec):
    client = PolicyClient(f"ws://127.0.0.1:{server.port}", prompt="push")
    loop = RobotLoop(client, spec, auto_delay=False)
    actions = [loop.act(env_obs(30 + t)) for t in range(5)]
    assert all(a.shape == (3,) and np.isfinite(a).all() for a in actions)
    want = {"open_loop:4": [0, 4], "temporal_ensemble:0.1": [0, 1, 2, 3, 4], "rtc:2,1": [0, 2, 4]}[spec]
    assert loop.executor.prediction_ticks == want
    assert len(client.latencies) == len(want)
    with pytest.raises(ServerError, match="observation/state: expected"):
        client.request({"images": env_obs(0)["images"], "state": np.zeros(3)})
    client.close()


def test_rtc_prefix_guides_the_server_as_in_process(server, policy):
    """The server's RTC-guided chunk equals runtime/rtc.py's in-process guided chunk for the same prefix and noise."""
    from chunkpolicy.runtime.rtc import RTCGuidance, rtc_target

    client = PolicyClient(f"ws://127.0.0.1:{server.port}", prompt="push")
    prev = client.request(env_obs(40), seed=1).actions
    noise = torch.randn(H, 32, generator=torch.Generator().manual_seed(5)).numpy()
    prefix = np.array(prev[2:])  # [4, 3]: the previous chunk's remaining actions, 1 committed
    served = client.request(env_obs(41), noise=noise, prefix=prefix, prefix_len=1).actions
    plain = client.request(env_obs(41), noise=noise).actions
    o = env_obs(41)
    batch = obs_to_batch([o], policy.space, "toy", ["push"])
    inp = policy.prepare_inputs(batch, policy.validate(batch, training=False))
    target, w = rtc_target(policy, prefix[None], inp, None, 1)
    with torch.no_grad():
        ref = policy.infer(inp, torch.from_numpy(noise)[None], None, guidance=RTCGuidance(target, w, 5.0))
    np.testing.assert_allclose(served, policy.space.unpad(ref, 0, "action")[0].numpy(), atol=1e-5)
    assert np.abs(served - plain).max() > 1e-4  # guidance changed the chunk
    assert np.abs(served[0] - prefix[0]).max() < np.abs(plain[0] - prefix[0]).max()  # toward the committed action


def test_rtc_delay_is_measured(server):
    client = PolicyClient(f"ws://127.0.0.1:{server.port}", prompt="push")
    loop = RobotLoop(client, "rtc:3,0", auto_delay=True)
    client.control_hz = 1e4  # any real round trip spans ticks at 10 kHz
    for t in range(4):
        loop.act(env_obs(50 + t))
    assert loop.executor.prediction_ticks == [0, 3]
    assert loop.executor.d == min(client.delay_ticks(), 3) >= 1  # set from the measured latency before the switch


def test_client_errors_without_a_server():
    with pytest.raises(ConnectionError, match="no policy server reachable"):
        PolicyClient("ws://127.0.0.1:9", connect_timeout=0.3)


def test_client_imports_no_torch():
    code = ("import sys; import chunkpolicy.serving.client, chunkpolicy.serving.protocol; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_robot_loop_with_rtc_imports_no_torch(server):
    """A robot computer drives the server with real-time chunking (RobotLoop + the rtc executor) without torch."""
    code = ("import sys, numpy as np; from chunkpolicy.serving.client import PolicyClient, RobotLoop\n"
            f"client = PolicyClient('ws://127.0.0.1:{server.port}', prompt='push')\n"
            "loop = RobotLoop(client, 'rtc:2,1', auto_delay=True); loop.reset(); rng = np.random.default_rng(0)\n"
            "obs = lambda: {'images': {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in ('top', 'wrist')},"
            " 'state': rng.normal(size=2).astype(np.float32)}\n"
            "acts = [loop.act(obs()) for _ in range(5)]\n"
            "assert all(a.shape == (3,) and np.isfinite(a).all() for a in acts)\n"
            "assert loop.executor.prediction_ticks == [0, 2, 4], loop.executor.prediction_ticks\n"
            "client.close(); assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_protocol_round_trip_is_openpi_compatible():
    x = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3), "c": "s", "d": [1, 2]}
    for packed in (P.pack(x), msgpack_numpy.packb(x)):
        for unpacked in (P.unpack(packed), msgpack_numpy.unpackb(packed)):
            np.testing.assert_array_equal(unpacked["a"], x["a"])
            assert unpacked["b"] == 3 and unpacked["c"] == "s" and list(unpacked["d"]) == [1, 2]
    with pytest.raises(P.ProtocolError, match="object"):
        P.pack({"x": np.array([object()])})


def test_observation_history_for_two_obs_steps():
    """A policy with T_obs = 2 takes stacks [2, h, w, 3] / [2, S], oldest first; one frame is an error naming the key."""
    policy = toy_policy(horizon=H, n_obs_steps=2).eval()
    service = PolicyService(policy)
    a, b = wire_obs(60), wire_obs(61)
    stacked = {k: np.stack([a[k], b[k]]) for k in ("observation/image", "observation/wrist_image", "observation/state")}
    req = service.decode({**stacked, "prompt": "push", "seed": 4})
    served = service.run([req])[0]["actions"]
    parts = [obs_to_batch([{"images": {"top": o["observation/image"], "wrist": o["observation/wrist_image"]},
                            "state": o["observation/state"]}], policy.space, "toy", ["push"]) for o in (a, b)]
    batch = {**parts[1], "images": torch.cat([p["images"] for p in parts], 2), "state": torch.cat([p["state"] for p in parts], 1)}
    want = policy.space.unpad(policy.predict_unified(batch, noise=seeded_noise(4, H, 32)), 0, "action")[0].numpy()
    np.testing.assert_allclose(served, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"observation/image: expected uint8 \[2, h, w, 3\] \(T_obs frames"):
        service.decode({**stacked, "observation/image": a["observation/image"], "prompt": "push"})
    with pytest.raises(ValueError, match=r"observation/state: expected \[2, 2\] \(T_obs states"):
        service.decode({**stacked, "observation/state": np.zeros((3, 2), np.float32), "prompt": "push"})


def test_start_reports_a_port_in_use(server, policy):
    with pytest.raises(RuntimeError, match="did not start"):
        PolicyServer(PolicyService(policy), port=server.port).start()
