"""Served chunk latency: `chunkpolicy serve` round trips on loopback vs the same chunk in process.

The server (PolicyServer + PolicyService, the code `chunkpolicy serve` runs) serves a random-weight policy from this
process; the robot side runs in a spawned process of its own that never imports torch (chunkpolicy.serving.client),
as on a robot computer. Each of N client threads opens its own connection and sends --requests observations back to
back (uint8 HWC images of --image-size, a state vector, a prompt); a round trip is send → reply decoded. Reported per
N in --clients: round-trip p50 / p99, throughput (replies per second over the whole run) and the mean batch size the
server formed (dynamic batching). "In process" is the same chunk without the network: PolicyService.run on a request
already decoded (the policy's validation, prompt tokens, chunk, unpad and copy to host), plus the request decoding
(schema checks, obs → batch) measured on its own.

    python benchmarks/serve.py --device cuda --preset paligemma-3b --out serve.json   # GPU, pi0-size, CUDA graphs
    python benchmarks/serve.py --device cpu --preset tiny --horizon 16 --requests 20    # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ACT_DIM, STATE_DIM, PROMPT = 7, 8, "pick up the red block and put it in the bowl"


def _obs(i: int, n_cam: int, size: int) -> dict:
    rng = np.random.default_rng(i)
    return {"images": {f"cam{c}": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in range(n_cam)},
            "state": rng.normal(size=STATE_DIM).astype(np.float32)}


def _drive(uri: str, n_clients: int, n_requests: int, warmup: int, n_cam: int, size: int, out: "mp.Queue") -> None:
    """Robot side (spawned, torch-free): N connections, N threads, back-to-back requests; puts the results on out."""
    from chunkpolicy.serving.client import PolicyClient

    try:
        clients = [PolicyClient(uri, prompt=PROMPT) for _ in range(n_clients)]
        obs = [_obs(i, n_cam, size) for i in range(8)]
        for c in clients:
            for k in range(warmup):
                c.request(obs[k % 8])
        lat: list[list[float]] = [[] for _ in clients]
        batch: list[list[int]] = [[] for _ in clients]
        server: list[list[tuple[float, float, float]]] = [[] for _ in clients]  # server total, infer, queue (s)
        start = threading.Barrier(n_clients + 1)

        def run(j: int) -> None:
            start.wait()
            for k in range(n_requests):
                r = clients[j].request(obs[(j + k) % 8])
                lat[j].append(r.latency_s)
                batch[j].append(int(r.server_timing.get("batch_size", 1)))
                server[j].append(tuple(r.server_timing.get(k, float("nan")) / 1000 for k in ("total_ms", "infer_ms", "queue_ms")))

        threads = [threading.Thread(target=run, args=(j,)) for j in range(n_clients)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        out.put({"latency_s": [x for xs in lat for x in xs], "batch": [x for xs in batch for x in xs], "wall_s": wall,
                 "server_s": [x for xs in server for x in xs],
                 "torch_imported": "torch" in sys.modules})
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        out.put({"error": f"{type(e).__name__}: {e}"})


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--preset", default=None, help="backbone preset (default: paligemma-3b on a GPU, tiny on CPU)")
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224, help="frames the client sends and the policy was trained on")
    p.add_argument("--horizon", type=int, default=50)
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=100, help="requests per client (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per client (graph capture, allocations)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    import torch

    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.normalize import compute_stats
    from chunkpolicy.serving import protocol as P
    from chunkpolicy.serving.server import PolicyServer
    from chunkpolicy.serving.service import PolicyService
    from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("paligemma-3b" if dev.startswith("cuda") else "tiny")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if dev.startswith("cuda") else "fp32")]
    spec = EmbodimentSpec("arm", tuple(f"j{i}" for i in range(ACT_DIM - 1)) + ("gripper",),
                          tuple(f"j{i}" for i in range(STATE_DIM - 1)) + ("gripper",),
                          tuple(f"cam{c}" for c in range(a.cameras)), 50.0, gripper_dims=("gripper",))
    rng = np.random.default_rng(0)
    stats = {"arm": {"action": compute_stats(rng.normal(size=(100, ACT_DIM))),
                     "state": compute_stats(rng.normal(size=(100, STATE_DIM)))}}
    torch.manual_seed(0)
    with torch.device(dev):
        policy = ChunkPolicy(PolicyConfig(backbone=preset, horizon=a.horizon, max_prompt_tokens=48),
                             UnifiedSpace(32, "pad", embodiments=[spec]), stats)
    policy = policy.to(dtype).eval()
    policy.trained_on = {"image_size": [a.image_size, a.image_size]}  # the client sends frames of the training size
    graph = dev.startswith("cuda") and not a.no_cuda_graph
    service = PolicyService(policy, cuda_graph=graph, compile=a.compile)

    # in process: the same chunk without the network (decode measured apart)
    wire = P.unpack(P.pack(P.ObservationSchema.from_dict(service.metadata()["schema"]).encode(
        _obs(0, a.cameras, a.image_size)["images"], _obs(0, a.cameras, a.image_size)["state"], PROMPT)))
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    req = service.decode(wire)
    for _ in range(a.warmup + 2):
        service.run([req])
    n_local = max(20, a.requests)
    local, decode = [], []
    for _ in range(n_local):
        t0 = time.perf_counter()
        r = service.decode(wire)
        t1 = time.perf_counter()
        service.run([r])
        sync()
        local.append(time.perf_counter() - t1)
        decode.append(t1 - t0)
    rows = []
    inproc = {"p50_ms": _pct(local, 50), "p99_ms": _pct(local, 99), "decode_p50_ms": _pct(decode, 50)}
    print(f"{preset} on {dev} ({'CUDA graphs' if graph else 'eager'}, {str(dtype).split('.')[-1]}), H={a.horizon}, "
          f"{a.cameras} camera(s) {a.image_size}x{a.image_size}, request {len(P.pack(wire)) / 1024:.0f} KiB")
    print(f"in process: chunk p50 {inproc['p50_ms']:.2f} ms, p99 {inproc['p99_ms']:.2f} ms; request decoding p50 "
          f"{inproc['decode_p50_ms']:.2f} ms")

    with PolicyServer(service, port=0, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms) as srv:
        ctx = mp.get_context("spawn")
        print("| clients | round trip p50 ms | p99 ms | served − in-process p50 ms | throughput chunks/s | mean batch | "
              "server decode + packing p50 ms | queue p50 ms | transport p50 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in [int(x) for x in a.clients.split(",")]:
            q = ctx.Queue()
            proc = ctx.Process(target=_drive, args=(srv.uri, n, a.requests, a.warmup, a.cameras, a.image_size, q))
            proc.start()
            res = q.get(timeout=3600)
            proc.join()
            if "error" in res:
                print(f"clients={n}: {res['error']}", file=sys.stderr)
                return 1
            row = {"clients": n, "p50_ms": _pct(res["latency_s"], 50), "p99_ms": _pct(res["latency_s"], 99),
                   "throughput_per_s": len(res["latency_s"]) / res["wall_s"], "mean_batch": float(np.mean(res["batch"])),
                   "client_imported_torch": res["torch_imported"]}
            row["overhead_p50_ms"] = row["p50_ms"] - inproc["p50_ms"]
            # where a round trip goes, per request: server total = receive → reply packed (decode, queue, inference,
            # packing); transport = the rest (client packing and unpacking, both sends, both event loops)
            stimes = np.asarray(res["server_s"], dtype=float)
            lat = np.asarray(res["latency_s"], dtype=float)
            row["server_total_p50_ms"] = _pct(list(stimes[:, 0]), 50)
            row["server_infer_p50_ms"] = _pct(list(stimes[:, 1]), 50)
            row["server_queue_p50_ms"] = _pct(list(stimes[:, 2]), 50)
            row["server_other_p50_ms"] = _pct(list(stimes[:, 0] - stimes[:, 1] - stimes[:, 2]), 50)
            row["transport_p50_ms"] = _pct(list(lat - stimes[:, 0]), 50)
            rows.append(row)
            print(f"| {n} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['overhead_p50_ms']:+.2f} | "
                  f"{row['throughput_per_s']:.1f} | {row['mean_batch']:.2f} | {row['server_other_p50_ms']:.2f} | "
                  f"{row['server_queue_p50_ms']:.2f} | {row['transport_p50_ms']:.2f} |", flush=True)
    if a.out:
        info = {"preset": preset, "device": dev, "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None,
                "cuda_graph": graph, "compile": a.compile, "dtype": str(dtype), "horizon": a.horizon, "cameras": a.cameras,
                "image_size": a.image_size, "requests_per_client": a.requests, "max_batch": a.max_batch,
                "batch_wait_ms": a.batch_wait_ms, "torch": torch.__version__, "python": platform.python_version()}
        Path(a.out).write_text(json.dumps({"config": info, "in_process": inproc, "served": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
