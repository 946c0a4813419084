"""Training throughput and MFU: chunkpolicy flow_expert vs LeRobot 0.6.1 pi0, same GPU, same run, random weights.

Samples/s of whole optimizer steps (host-side batch preparation, forward, backward, fused AdamW) at each --batch, one
camera at 224x224, H=50, 48 prompt tokens. LeRobot pi0 runs with its own dtype policy (bf16 LM and expert, fp32
vision) under bf16 autocast. chunkpolicy runs with bf16 weights in the --modes:

* ``eager``: ``compute_loss`` + ``backward`` + fused AdamW, as a plain training loop does;
* ``compiled``: the same with ``torch.compile``d layers (``Backbone.compile_layers`` / ``head.compile_layers``);
* ``graph``: :class:`chunkpolicy.training.graphed_step.GraphedTrainStep` (the whole step as one CUDA graph, capturable
  fused AdamW, gradient norm computed) over the compiled layers;
* ``fp32``: fp32 master weights + bf16 autocast, eager, at the first batch size (reference);
* ``graph_fp32``: the trainer's default precision (``train.precision=fp32``: fp32 weights and fp32 AdamW moments,
  bf16 autocast) in the whole-step CUDA graph over compiled layers, as ``train.compile=true train.cuda_graph=true``
  runs it.

and the same modes for the ``small`` preset (--small-preset). A batch that runs out of memory is retried with
gradient checkpointing. MFU = model FLOPs per sample (counted by FlopCounterMode on one forward + backward of ours;
LeRobot's pi0 has the same architecture and shapes) x samples/s / 989 TFLOP/s (dense bf16, H100 SXM).

    python benchmarks/throughput.py --out throughput.json                   # GPU, pi0-size (paligemma-3b)
    python benchmarks/throughput.py --quick --device cpu --out q.json       # smoke test with the tiny preset
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import latency as L  # benchmarks/latency.py: shared policy/observation builders and LeRobot pi0 set-up
from chunkpolicy.training.graphed_step import GraphedTrainStep, capturable_adamw

H, ACT_DIM = L.H, L.ACT_DIM


def train_rate(step, batch_size: int, steps: int, device: str) -> float:
    for _ in range(2):
        step()
    L.sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    L.sync(device)
    return batch_size * steps / (time.perf_counter() - t)


def train_batch(policy, B: int, device: str) -> dict:
    return dict(L.observation(1, B, device, policy.backbone.config.image_size),
                actions=policy.space.pad(torch.randn(B, H, ACT_DIM, device=device), 0, "action"),
                action_is_pad=torch.zeros(B, H, dtype=torch.bool, device=device))


def ours_step(args, preset: str, B: int, mode: str, ckpt: bool):
    """(policy, optimizer, step) for one of the --modes (see the module docstring)."""
    dev = args.device
    fp32 = mode in ("fp32", "graph_fp32")
    policy = L.make_policy(preset, "flow_expert", dev, torch.float32 if fp32 else torch.bfloat16).train()
    policy.backbone.set_gradient_checkpointing(ckpt)
    if mode in ("compiled", "graph", "graph_fp32"):
        policy.compile_layers()
    params = [p for p in policy.parameters() if p.requires_grad]
    batch = train_batch(policy, B, dev)
    if mode in ("graph", "graph_fp32"):
        opt = capturable_adamw(params, 1e-5, dev)
        graphed = GraphedTrainStep(policy, opt, batch, max_grad_norm=None, autocast=fp32)
        return policy, opt, lambda: graphed(batch)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.startswith("cuda"))
    autocast = mode == "fp32" and dev.startswith("cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = policy.compute_loss(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return policy, opt, step


def flops_per_sample(args, preset: str) -> float:
    """Model FLOPs of one training sample (forward + backward), counted on a batch of 1. FlopCounterMode's SDPA
    formula rejects grouped-query shapes, so keys/values are expanded to every head while counting (same FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    import chunkpolicy.models.attention as attention

    def sdpa(q, k, v, enable_gqa=False, **kw):
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return sdpa0(q, k, v, **kw)

    sdpa0 = attention.F.scaled_dot_product_attention
    policy = L.make_policy(preset, "flow_expert", args.device, torch.bfloat16).train()
    attention.F.scaled_dot_product_attention = sdpa  # F is torch.nn.functional: restored below
    try:
        with FlopCounterMode(display=False) as fc:
            policy.compute_loss(train_batch(policy, 1, args.device))["loss"].backward()
    finally:
        attention.F.scaled_dot_product_attention = sdpa0
    del policy
    return float(fc.get_total_flops())


def measure(args, rows, results, label: str, make, B: int, flops: float | None, peak: float | None, extra: dict,
            profile: str | None = None) -> None:
    """``make(ckpt) -> step``; retried with gradient checkpointing when the plain run is out of memory."""
    for ckpt in (False, True):
        L.reset_peak(args.device)
        step = None
        try:
            t0 = time.perf_counter()
            step = make(ckpt)
            build_s = time.perf_counter() - t0
            rate = train_rate(step, B, args.steps if B <= 8 else max(3, args.steps // 2), args.device)
            if profile:
                L.profile_table(step, args.device, profile)
            row = {"model": label, "batch": B, "samples_per_s": round(rate, 2), "gradient_checkpointing": ckpt,
                   "peak_gb": L.peak_gb(args.device), "build_s": round(build_s, 1), **extra}
            if flops and peak:
                row["mfu"] = round(flops * rate / peak, 3)
            L.record(rows, row)
            return
        except torch.OutOfMemoryError as e:
            results.setdefault("errors", []).append(f"{label} {extra} batch {B} (checkpointing {ckpt}): out of memory")
            print("OOM", label, B, ckpt, str(e)[:200], flush=True)
        except Exception as e:
            results.setdefault("errors", []).append(f"{label} {extra} batch {B}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return
        finally:
            step = None
            HOLDER.clear()
            gc.collect()


HOLDER: dict = {}  # keeps the model/optimizer of the running measurement alive, dropped before the next one


def lerobot_make(args, B: int):
    dev = args.device

    def make(ckpt):
        pol = L.lerobot_pi0(1, dev, gradient_checkpointing=ckpt).train()
        opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-5, fused=dev.startswith("cuda"))
        batch = dict(L.lerobot_batch(1, B, dev), action=torch.randn(B, H, ACT_DIM, device=dev),
                     action_is_pad=torch.zeros(B, H, dtype=torch.bool, device=dev))
        HOLDER.update(p=pol, o=opt)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
                loss, _ = pol.forward(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


def ours_make(args, preset: str, B: int, mode: str):
    def make(ckpt):
        p, o, step = ours_step(args, preset, B, mode, ckpt)
        HOLDER.update(p=p, o=o)
        return step
    return make


WEIGHTS = {"eager": "bf16", "compiled": "bf16, compiled layers", "graph": "bf16, compiled layers, whole-step CUDA graph",
           "fp32": "fp32 + bf16 autocast", "graph_fp32": "fp32 weights and moments + bf16 autocast, compiled layers, "
           "whole-step CUDA graph"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="throughput.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paligemma-3b")
    p.add_argument("--small-preset", default="small", help="second preset measured with the same modes ('' to skip)")
    p.add_argument("--batch", default="8,32", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (half for batches > 8)")
    p.add_argument("--modes", default="eager,compiled,graph,fp32")
    p.add_argument("--skip-lerobot", action="store_true")
    p.add_argument("--profile-dir", help="write the GPU kernel table of each mode's first batch here")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2, 2 steps, no LeRobot (CPU smoke test)")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.modes = args.modes.split(",")
    args.image_size = 224
    if args.quick:
        args.preset, args.small_preset, args.batch, args.steps, args.image_size = "tiny", "", [2], 2, 32
        args.skip_lerobot = True  # LeRobot's pi0 is always pi0-size: ~64 GB to train in fp32 on a CPU
    if not args.device.startswith("cuda"):
        args.modes = [m for m in args.modes if not m.startswith("graph")]  # CUDA graphs need a GPU
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"meta": {
        "command": " ".join(["benchmarks/throughput.py"] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
    }}
    rows: list = []
    results["throughput"] = rows
    save = L.SAVE[0] = lambda: Path(args.out).write_text(json.dumps(results, indent=2))  # noqa: E731
    dev = args.device
    peak = next((v for k, v in L.PEAK_FLOPS.items() if dev.startswith("cuda") and k in torch.cuda.get_device_name()), None)
    presets = [args.preset] + ([args.small_preset] if args.small_preset and args.small_preset != args.preset else [])
    results["flops_per_sample"] = {pr: flops_per_sample(args, pr) for pr in presets}
    save()
    flops = results["flops_per_sample"][args.preset]
    # LeRobot first: the comparison rows must not be the ones a time limit cuts off
    for B in ([] if args.skip_lerobot else args.batch):
        measure(args, rows, results, "lerobot pi0", lerobot_make(args, B), B, flops, peak,
                {"weights": "lerobot (bf16 LM/expert, fp32 vision) + bf16 autocast"})
    for preset in presets:
        flops = results["flops_per_sample"][preset]
        for i, B in enumerate(args.batch):
            for mode in args.modes:
                if mode == "fp32" and (i > 0 or preset != args.preset):
                    continue
                prof = f"{args.profile_dir}/profile_train_{preset}_{mode}_bs{B}.txt" if args.profile_dir and i == 0 else None
                measure(args, rows, results, f"chunkpolicy {preset} flow_expert", ours_make(args, preset, B, mode), B, flops,
                        peak, {"mode": mode, "weights": WEIGHTS[mode]}, prof)
    save()
    print("\n| model | batch | weights | ckpt | samples/s | MFU | peak GB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['weights']} | {r['gradient_checkpointing']} | {r['samples_per_s']} | "
              f"{r.get('mfu', '')} | {r['peak_gb']} |")
    for e in results.get("errors", []):
        print("ERROR", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
