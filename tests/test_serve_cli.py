"""`chunkpolicy serve` as a command (SIGTERM, graceful drain) and closed-loop evaluation through the server."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.serving.server import PolicyServer
from chunkpolicy.serving.service import PolicyService
from helpers import toy_policy

# openpi-client 0.1.2 opens its connection without a context manager, which websockets >= 17.1 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
openpi_ws = pytest.importorskip("openpi_client.websocket_client_policy", reason="openpi-client is not installed")
import websockets  # noqa: E402

from test_serve import _gate, wire_obs  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_cli_serves_and_stops_gracefully_on_sigterm(tmp_path, capsys):
    from chunkpolicy.cli import main

    ckpt = toy_policy(horizon=6).save_pretrained(tmp_path / "toy")
    port = _free_port()
    seen: dict = {}

    def robot() -> None:
        try:
            _wait_healthy(port)
            client = openpi_ws.WebsocketClientPolicy("127.0.0.1", port, api_key="k")
            seen["meta"] = client.get_server_metadata()
            seen["actions"] = client.infer(wire_obs(0, seed=1))["actions"]
            os.kill(os.getpid(), signal.SIGTERM)  # the server's handler turns it into a graceful stop
            # the handler runs when the main thread gets to it: requests sent before then are still answered
            deadline = time.monotonic() + 20
            while "closed" not in seen and time.monotonic() < deadline:
                try:
                    client.infer(wire_obs(0))
                    seen["answered_before_stop"] = seen.get("answered_before_stop", 0) + 1
                except RuntimeError as e:  # arrived while stopping: refused with a reply, the connection still open
                    if "shutting down, request not served" not in str(e):
                        raise
                    seen["refused_while_stopping"] = seen.get("refused_while_stopping", 0) + 1
                except websockets.ConnectionClosed as e:
                    seen["closed"] = e.rcvd.code if e.rcvd else None
        except Exception as e:  # noqa: BLE001 - reported below
            seen["error"] = e
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=robot)
    t.start()
    rc = main(["serve", str(ckpt), "--port", str(port), "--api-key", "k", "--key", "top=cam/top"])
    t.join(30)
    out = capsys.readouterr().out
    assert "error" not in seen, seen.get("error")
    assert rc == 0 and "listening on ws://127.0.0.1:" in out and "stopped" in out
    assert seen["meta"]["schema"]["cameras"]["top"][0] == "cam/top" and seen["actions"].shape == (6, 3)
    assert seen["closed"] == 1001  # going away
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # handler removed with the loop


def test_cli_errors(tmp_path, capsys):
    from chunkpolicy.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "not a chunkpolicy checkpoint" in capsys.readouterr().err
    ckpt = toy_policy(horizon=6).save_pretrained(tmp_path / "toy")
    assert main(["serve", str(ckpt), "--key", "front=observation/image"]) == 2
    assert "'front' is not a camera of 'toy'" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--compile"]) == 2
    assert "--compile" in capsys.readouterr().err


def test_stop_finishes_the_request_in_flight(tmp_path):
    policy = ChunkPolicy.from_pretrained(toy_policy(horizon=6).save_pretrained(tmp_path / "toy"))
    srv = PolicyServer(PolicyService(policy), port=0).start()
    gate, sizes, _ = _gate(srv)
    client = openpi_ws.WebsocketClientPolicy("127.0.0.1", srv.port)
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(client.infer(wire_obs(1))))
    t.start()
    while srv._inflight < 1:
        time.sleep(0.01)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(Exception):  # no new connections while draining
        openpi_ws.WebsocketClientPolicy("127.0.0.1", srv.port)
    gate.set()
    t.join(20)
    stopper.join(20)
    assert got["actions"].shape == (6, 3) and sizes == [1]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=2)


# -- closed loop through the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mw_server(tmp_path_factory):
    pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")
    from test_eval import _mw_policy

    _, ckpt = _mw_policy(tmp_path_factory.mktemp("mw"))
    with PolicyServer(PolicyService(ChunkPolicy.from_pretrained(ckpt)), port=0) as srv:
        yield ckpt, srv


def test_closed_loop_through_the_server_reproduces_in_process(mw_server):
    """Open-loop and real-time chunking (its guided chunks included) on the same seeds: identical episodes."""
    from chunkpolicy.evaluation.rollout import Method, evaluate
    from test_eval import HW

    ckpt, srv = mw_server
    for executor in ("open_loop:2", "rtc:2,1"):
        rtc = executor.startswith("rtc")
        res = evaluate([Method("local", str(ckpt), 4, rtc=rtc), Method("served", srv.uri, 4, rtc=rtc, kind="server")],
                       "metaworld", ["reach-v3"], 2, executor, num_envs=1, video_episodes=0, progress=False,
                       env_kwargs={"image_size": HW, "max_steps": 6})
        a, b = res["local"]["episodes"], res["served"]["episodes"]
        assert [r["seed"] for r in a] == [r["seed"] for r in b] == [100000, 100001]
        for ra, rb in zip(a, b):  # same steps, success, predictions and return: the same trajectories
            assert (ra["success"], ra["steps"], ra["predictions"]) == (rb["success"], rb["steps"], rb["predictions"])
            assert np.isclose(ra["return"], rb["return"], rtol=1e-6, atol=1e-6), (executor, ra["return"], rb["return"])
        assert a[0]["return"] != a[1]["return"]  # the seeds differ, so returns tell trajectories apart


def test_eval_cli_with_server(mw_server, tmp_path, capsys):
    import json

    from chunkpolicy.evaluation.cli import main as eval_main

    ckpt, srv = mw_server
    args = ["--env", "metaworld", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "4", "--num-envs", "1",
            "--executor", "open_loop:2", "--videos", "0", "--no-progress"]
    assert eval_main(["--server", srv.uri, "--out", str(tmp_path / "e"), *args]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["server"] == srv.uri and res["env_kwargs"]["image_size"] == [32, 32]
    assert [r["steps"] for r in res["episodes"]["policy"]] == [4]
    assert eval_main(["--server", srv.uri, "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), *args]) == 2
    assert "not both" in capsys.readouterr().err
    assert eval_main(["--server", srv.uri, "--image-size", "64", "64", "--out", str(tmp_path / "x"), *args]) == 2
    assert "trained on 32x32" in capsys.readouterr().err
