"""Training across GPUs: DDP scaling efficiency and FSDP samples/s, peak memory per GPU and the largest batch that fits.

One launch measures one setting on synthetic batches made on the device (model, optimizer, EMA and the collectives;
no data loading) with the trainer's own pieces (``accelerate``'s DDP wrapper, or
:func:`chunkpolicy.training.fsdp.shard_model`), and appends one JSON row per measurement to ``--out`` (JSON lines)
with the command, machine, date and commit. ``--summarize FILE`` prints the scaling table of such a file
(efficiency = samples/s on N GPUs / (N × samples/s on 1 GPU), same per-GPU batch).

    # small preset, DDP scaling (same per-GPU batch on 1, 2, 4 GPUs)
    python benchmarks/multi_gpu.py --mode ddp --preset small --batch-size 32 --mixed-precision bf16 --out R.jsonl
    accelerate launch --num_processes 2 benchmarks/multi_gpu.py --mode ddp --preset small --batch-size 32 --mixed-precision bf16 --out R.jsonl
    accelerate launch --num_processes 4 benchmarks/multi_gpu.py --mode ddp --preset small --batch-size 32 --mixed-precision bf16 --out R.jsonl
    # pi0-size full fine-tune: FSDP on 2 and 4 GPUs, and the largest per-GPU batch that fits (doubling until OOM)
    accelerate launch --num_processes 4 benchmarks/multi_gpu.py --mode fsdp --preset paligemma-3b --batch-size 8 --mixed-precision bf16 --find-max-batch --out R.jsonl
    python benchmarks/multi_gpu.py --summarize R.jsonl
    # CPU smoke (2 gloo processes, tiny preset): what tests/test_distributed.py runs
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 benchmarks/multi_gpu.py --smoke --out /tmp/r.jsonl

With ``--find-max-batch`` a process that runs out of memory writes an ``oom`` row and exits; the launcher then stops
the others (the rows of the batches that fitted are already written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def provenance(argv: list[str]) -> dict[str, Any]:
    """Command, machine, date and commit of a result row."""
    import torch

    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    launcher = f"WORLD_SIZE={os.environ['WORLD_SIZE']} " if "WORLD_SIZE" in os.environ else ""
    return {"command": launcher + " ".join(["benchmarks/multi_gpu.py", *argv]),
            "machine": {"host": socket.gethostname(), "gpus": gpus, "cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def build(args, acc, mode: str):
    """The policy on the device, wrapped for ``mode`` (ddp | fsdp), its optimizer, EMA and synthetic batches."""
    import numpy as np
    import torch

    from chunkpolicy.models.backbone_config import backbone_config
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.normalize import compute_stats
    from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace
    from chunkpolicy.training.distributed import LossModule, unused_parameters
    from chunkpolicy.training.ema import EMA
    from chunkpolicy.training.optim import build_optimizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import synthetic_batch

    dev = acc.device
    names = tuple(f"a{i}" for i in range(args.action_dim))
    spec = EmbodimentSpec("bench", names, names, tuple(f"cam{i}" for i in range(args.cameras)))
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    rng = np.random.default_rng(0)
    stats = {"bench": {"action": compute_stats(rng.normal(size=(256, args.action_dim))),
                       "state": compute_stats(rng.normal(size=(256, args.action_dim)))}}
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone=args.preset, head=args.head, horizon=args.horizon, max_prompt_tokens=48),
                         space, stats)
    policy.to(dev).train()
    size = backbone_config(args.preset).image_size
    g = torch.Generator().manual_seed(1 + acc.process_index)
    batches = [synthetic_batch(space, args.batch_size, args.horizon, args.cameras, size, dev, g) for _ in range(2)]
    if mode == "fsdp":
        from chunkpolicy.training.fsdp import FSDPLossModule, shard_model

        small = {k: v[:2] for k, v in batches[0].items()}  # the probe runs unsharded: two samples, not the batch

        def probe(grad: bool) -> None:
            with torch.set_grad_enabled(grad), acc.autocast():
                loss = policy.compute_loss(small)["loss"]
                if grad:
                    loss.backward()

        shard_model(policy, probe, device=dev, mixed_precision=args.mixed_precision)
        opt = acc.prepare(build_optimizer(policy, 1e-5, (0.9, 0.95), 1e-8, 1e-10))
        wrapper = FSDPLossModule(policy, acc.autocast)
    else:
        if acc.num_processes > 1 and acc.ddp_handler is not None:
            acc.ddp_handler.find_unused_parameters = bool(unused_parameters(policy, batches[0], acc))
            acc.ddp_handler.bucket_cap_mb = args.bucket_cap_mb or acc.ddp_handler.bucket_cap_mb
            acc.ddp_handler.static_graph = args.static_graph
            acc.ddp_handler.gradient_as_bucket_view = args.gradient_as_bucket_view
        wrapper, opt = acc.prepare(LossModule(policy), build_optimizer(policy, 1e-5, (0.9, 0.95), 1e-8, 1e-10))
    ema = EMA(policy, 0.99) if args.ema else None
    return policy, wrapper, opt, ema, batches


def measure(args, acc, mode: str) -> dict[str, Any]:
    """Time ``--steps`` optimizer steps after ``--warmup``; samples/s over all processes (the slowest sets the pace)."""
    import torch

    dev = acc.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import timed_steps

    policy, wrapper, opt, ema, batches = build(args, acc, mode)
    params = [p for p in policy.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, loss = timed_steps(acc, wrapper, opt, ema, policy, params, batches, args.warmup, args.steps, sync)
    step = acc.gather(torch.tensor([statistics.mean(times)], device=dev)).max().item()
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")], device=dev)
    peaks = [x if x == x else None for x in acc.gather(peak).tolist()]  # None: not a GPU
    glob = args.batch_size * acc.num_processes
    row = {"benchmark": "multi_gpu", "mode": mode if acc.num_processes > 1 else "single", "preset": args.preset,
           "head": args.head, "horizon": args.horizon, "cameras": args.cameras, "processes": acc.num_processes,
           "batch_per_process": args.batch_size, "global_batch": glob, "mixed_precision": args.mixed_precision,
           "params": sum(p.numel() for p in policy.parameters()), "steps_timed": len(times),
           "step_time_ms": 1000 * step, "samples_per_s": glob / step, "peak_mem_gb_per_gpu": peaks,
           "final_loss": float(loss.detach().float())}
    if mode == "ddp" and acc.num_processes > 1:
        row["ddp"] = {"bucket_cap_mb": args.bucket_cap_mb, "static_graph": args.static_graph,
                      "gradient_as_bucket_view": args.gradient_as_bucket_view}
    del policy, wrapper, opt, ema, batches
    acc.free_memory()  # accelerate keeps references to what it prepared: the next setting starts empty
    return row


def summarize(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ok = [r for r in rows if r.get("samples_per_s")]
    base = {(r["preset"], r["head"], r["batch_per_process"], r["mixed_precision"]): r["samples_per_s"]
            for r in ok if r["processes"] == 1}
    print(f"{'mode':6} {'preset':14} {'GPUs':>4} {'batch/GPU':>9} {'samples/s':>10} {'efficiency':>10} {'peak GB/GPU':>11}")
    for r in ok:
        b = base.get((r["preset"], r["head"], r["batch_per_process"], r["mixed_precision"]))
        eff = f"{r['samples_per_s'] / (r['processes'] * b):.0%}" if b else "-"
        peak = max((p for p in r["peak_mem_gb_per_gpu"] if p is not None), default=float("nan"))
        print(f"{r['mode']:6} {r['preset']:14} {r['processes']:>4} {r['batch_per_process']:>9} "
              f"{r['samples_per_s']:>10.1f} {eff:>10} {peak:>11.1f}")
    seen = set()
    for r in rows:
        key = (r["mode"], r["preset"], r["processes"], r["batch_per_process"])
        if r.get("oom") and key not in seen:  # every process that ran out of memory wrote one
            seen.add(key)
            print(f"{r['mode']:6} {r['preset']:14} {r['processes']:>4} {r['batch_per_process']:>9} out of memory")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", nargs="+", default=["ddp"], choices=["ddp", "fsdp"], help="one or more, run in turn")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import add_synthetic_args

    add_synthetic_args(p, 32, "per process")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP gradient bucket size (torch's default: 25)")
    p.add_argument("--static-graph", action="store_true", help="DDP static_graph")
    p.add_argument("--gradient-as-bucket-view", action="store_true", help="DDP gradient_as_bucket_view")
    p.add_argument("--find-max-batch", action="store_true", help="double --batch-size until out of memory")
    p.add_argument("--max-batch", type=int, default=1024, help="with --find-max-batch: stop doubling here")
    p.add_argument("--smoke", action="store_true", help="tiny preset, CPU, 2 steps: a smoke test")
    p.add_argument("--out", help="append result rows here (JSON lines)")
    p.add_argument("--summarize", metavar="FILE", help="print the scaling table of a result file and exit")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(Path(args.summarize))
        return 0
    if args.smoke:
        args.preset, args.horizon, args.steps, args.warmup, args.cpu = "tiny", 4, 2, 1, True
        args.batch_size = min(args.batch_size, 2)
    import torch
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    if "fsdp" in args.mode and acc.num_processes < 2:
        p.error("--mode fsdp needs several processes (accelerate launch --num_processes N ...)")
    info = provenance(argv)

    def emit(row: dict[str, Any]) -> None:
        row.update(info)
        if acc.is_main_process:
            print(json.dumps(row))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")

    start = args.batch_size
    for mode in args.mode:
        batch = start
        while True:
            args.batch_size = batch
            try:
                emit(measure(args, acc, mode))
            except torch.OutOfMemoryError:
                if not args.find_max_batch:
                    raise
                row = {"benchmark": "multi_gpu", "mode": mode, "preset": args.preset, "head": args.head,
                       "processes": acc.num_processes, "batch_per_process": batch, "oom": True, **info}
                if args.out:  # this process only: the others are stuck in a collective, the launcher stops them
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(f"process {acc.process_index}: out of memory at batch {batch} per GPU", file=sys.stderr)
                sys.stdout.flush()
                os._exit(3)
            if not args.find_max_batch or batch * 2 > args.max_batch:
                break
            batch *= 2
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
