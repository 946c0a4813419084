"""Training throughput (samples/s) of a policy preset on the available device(s).

Two modes:

* synthetic (default): batches generated on the device (model + optimizer only: forward, backward, clipping, AdamW,
  EMA), for ``--preset`` / ``--head``;
* ``--config CFG.yaml [key=value ...]``: the real trainer end to end on the config's stores (data loading included),
  for ``--steps`` steps, checkpoints and validation off; samples/s from its summary.

Runs the same under ``accelerate launch``; samples/s is global (all processes)::

    python benchmarks/train_throughput.py --quick                                  # CPU smoke (tiny preset)
    python benchmarks/train_throughput.py --preset small --batch-size 32 --mixed-precision bf16
    accelerate launch --num_processes 2 benchmarks/train_throughput.py --preset small --batch-size 32 --mixed-precision bf16
    python benchmarks/train_throughput.py --config configs/small_flow.yaml --steps 50
    python benchmarks/train_throughput.py --config configs/small_flow.yaml --steps 50 --repeat-batch   # no data path
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed_steps(acc, wrapper, opt, ema, policy, params, batches, warmup: int, steps: int, sync) -> tuple[list[float], object]:
    """Seconds of each of ``steps`` whole optimizer steps (forward, backward, clip, AdamW, EMA) after ``warmup``,
    and the last step's loss."""
    times = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss = wrapper(batches[i % len(batches)])["loss"]
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(policy)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, loss


def synthetic_batch(space, B: int, H: int, n_cam: int, size: int, device, g):
    import torch

    D = space.dim
    return {
        "images": torch.randint(0, 256, (B, n_cam, 1, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "image_mask": torch.ones(B, n_cam, dtype=torch.bool, device=device),
        "state": space.pad(torch.randn(B, 1, space.embodiments[0].state_dim, generator=g), 0, "state").to(device),
        "actions": space.pad(torch.randn(B, H, space.embodiments[0].action_dim, generator=g), 0, "action").to(device),
        "action_mask": torch.from_numpy(space.mask(0, "action"))[None].repeat(B, 1).to(device),
        "action_is_pad": torch.zeros(B, H, dtype=torch.bool, device=device),
        "prompt": ["pick up the red block and place it in the bowl"] * B,
        "embodiment": torch.zeros(B, dtype=torch.long, device=device),
    }


def run_synthetic(args) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from chunkpolicy.models.backbone_config import backbone_config
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.normalize import compute_stats
    from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace
    from chunkpolicy.training.ema import EMA
    from chunkpolicy.training.optim import build_optimizer
    from chunkpolicy.training.distributed import LossModule, unused_parameters

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)])
    dev = acc.device
    spec = EmbodimentSpec("bench", tuple(f"a{i}" for i in range(args.action_dim)), tuple(f"s{i}" for i in range(args.action_dim)),
                          tuple(f"cam{i}" for i in range(args.cameras)))
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    rng = np.random.default_rng(0)
    stats = {"bench": {"action": compute_stats(rng.normal(size=(256, args.action_dim))),
                       "state": compute_stats(rng.normal(size=(256, args.action_dim)))}}
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone=args.preset, head=args.head, horizon=args.horizon, max_prompt_tokens=48), space, stats)
    policy.to(dev).train()
    size = backbone_config(args.preset).image_size
    g = torch.Generator().manual_seed(1 + acc.process_index)
    batches = [synthetic_batch(space, args.batch_size, args.horizon, args.cameras, size, dev, g) for _ in range(4)]
    unused = []
    if acc.num_processes > 1 and acc.ddp_handler is not None:
        unused = unused_parameters(policy, batches[0], acc)
        acc.ddp_handler.find_unused_parameters = bool(unused) or args.find_unused_parameters
    opt = build_optimizer(policy, 1e-4, (0.9, 0.95), 1e-8, 1e-10)
    wrapper, opt = acc.prepare(LossModule(policy), opt)
    ema = EMA(policy, 0.99) if args.ema else None
    params = [p for p in policy.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, loss = timed_steps(acc, wrapper, opt, ema, policy, params, batches, args.warmup, args.steps, sync)
    step_t = torch.tensor([statistics.mean(times)], device=dev)
    step_t = acc.gather(step_t).max().item()  # the slowest process sets the pace
    glob = args.batch_size * acc.num_processes
    return {
        "mode": "synthetic", "preset": args.preset, "head": args.head, "horizon": args.horizon, "cameras": args.cameras,
        "image_size": size, "batch_per_process": args.batch_size, "processes": acc.num_processes, "global_batch": glob,
        "mixed_precision": args.mixed_precision, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "params": sum(p.numel() for p in policy.parameters()), "steps_timed": len(times),
        "step_time_ms_mean": 1000 * step_t, "step_time_ms_median_rank0": 1000 * statistics.median(times),
        "samples_per_s": glob / step_t, "final_loss": float(loss.detach()),
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "ddp_unused_parameters": len(unused), "fused_adamw": bool(opt.optimizer.defaults.get("fused")),
        "is_main": acc.is_main_process,
    }


def run_config(args) -> dict:
    from chunkpolicy.config import load_config
    from chunkpolicy.training.experiment import run

    out = args.run_dir or tempfile.mkdtemp(prefix="throughput_")
    big = str(10**9)
    cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps}", f"train.output_dir={out}",
                                    f"train.ckpt_every={big}", f"train.val_every={big}", "train.val_batches=1", "train.progress=false",
                                    f"train.log_every={max(1, args.steps // 5)}", *([f"train.batch_size={args.batch_size}"] if args.batch_size_given else [])])
    if args.repeat_batch:
        _repeat_first_batch()
    s = run(cfg)
    from accelerate import PartialState

    from chunkpolicy.training.plots import read_metrics

    # the whole-run rate includes start-up (loader workers, compilation, graph capture); the last log interval's does not
    train_recs = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"] if PartialState().is_main_process else []
    if args.run_dir is None:
        # the trainer always checkpoints its last step: at pi0 size that is ~50 GB (weights, AdamW moments, EMA), and
        # two runs' leftovers filled a 64 GB disk; every process removes its own temp dir once all are done
        PartialState().wait_for_everyone()
        shutil.rmtree(out, ignore_errors=True)

    return {"mode": "config", "config": args.config, "overrides": args.overrides, "repeat_batch": args.repeat_batch,
            "steps": s["steps"], "global_batch": s["global_batch"],
            "processes": s["processes"], "device": s["device"], "samples_per_s": s["samples_per_s"],
            "samples_per_s_last_interval": train_recs[-1]["samples_per_s"] if train_recs else None,
            "final_loss": s["final_train_loss"], "run_dir": args.run_dir, "is_main": PartialState().is_main_process}


def _repeat_first_batch() -> None:
    """Make the trainer train on its first batch over and over: the same run without the data path in the loop
    (loader workers, collation, pinning), to tell a data-bound trainer from a device-bound one."""
    from chunkpolicy.training.trainer import Trainer

    batches = Trainer._train_batches

    def repeated(self):
        first = next(batches(self))
        while True:
            yield first

    Trainer._train_batches = repeated


def add_synthetic_args(p: argparse.ArgumentParser, batch_default: int | None, batch_help: str) -> None:
    """The synthetic-step options this script and ``multi_gpu.py`` share (model, batch, steps, precision, device)."""
    p.add_argument("--preset", default="small")
    p.add_argument("--head", default="flow_expert")
    p.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    p.add_argument("--horizon", type=int, default=50)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--action-dim", type=int, default=14)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--cpu", action="store_true")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synthetic_args(p, None, "per process (default 32; 4 with --quick)")
    p.add_argument("--find-unused-parameters", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps: a CPU smoke test")
    p.add_argument("--config", help="measure the real trainer on this experiment config instead")
    p.add_argument("--run-dir", help="with --config: run directory (default: a temp dir)")
    p.add_argument("--repeat-batch", action="store_true",
                   help="with --config: train on the first batch over and over (the rate without the data path)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("overrides", nargs="*", help="with --config: key=value overrides")
    args = p.parse_args(argv)
    args.batch_size_given = args.batch_size is not None
    if args.quick:
        args.preset, args.horizon, args.steps, args.warmup = "tiny", 8, min(args.steps, 5), min(args.warmup, 2)
        args.batch_size = args.batch_size or 4
    args.batch_size = args.batch_size or 32
    res = run_config(args) if args.config else run_synthetic(args)
    if res.pop("is_main"):
        print(json.dumps(res, indent=2))
        print(f"\n{res['samples_per_s']:.1f} samples/s (global batch {res['global_batch']}, {res['processes']} process(es), {res['device']})")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
