"""Chunk latency and training throughput: chunkpolicy heads vs LeRobot 0.6.1 pi0, same GPU, same run, random weights.

Latency: batch 1, H=50, 10 flow steps (10 DDIM steps for dit), bf16, 1 and 3 cameras at 224x224, 48 prompt tokens,
median and p90 over --calls calls after warm-up, CUDA-synchronized; peak GPU memory. chunkpolicy is measured eager and
as a whole-chunk CUDA graph (graphed output checked against eager within bf16 tolerance). The tokens head (bins,
FAST) is autoregressive, so it gets fewer calls. LeRobot pi0 gets token ids directly (its pre-processor needs a hub
tokenizer).

Throughput: training samples/s (forward + backward + fused AdamW step, bf16 autocast) at --train-batch for
chunkpolicy and LeRobot pi0, and MFU = 6·params·tokens/step-time / peak (989 TFLOP/s dense bf16 on H100).

    python benchmarks/latency.py --out latency.json              # GPU, pi0-size (paligemma-3b)
    python benchmarks/latency.py --quick --device cpu --out q.json  # smoke test with the tiny preset
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

import numpy as np
import torch

from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

H, STEPS, PROMPT_TOKENS, ACT_DIM, STATE_DIM = 50, 10, 48, 7, 8
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def spec(n_cam: int) -> EmbodimentSpec:
    return EmbodimentSpec("arm", tuple(f"j{i}" for i in range(ACT_DIM - 1)) + ("gripper",), tuple(f"j{i}" for i in range(STATE_DIM - 1)) + ("gripper",),
                          tuple(f"cam{i}" for i in range(n_cam)), 50.0, gripper_dims=("gripper",))


def make_policy(preset: str, head: str, head_options: dict, device: str, dtype: torch.dtype) -> ChunkPolicy:
    s = spec(3)
    rng = np.random.default_rng(0)
    stats = {"arm": {"action": compute_stats(rng.normal(size=(100, ACT_DIM))), "state": compute_stats(rng.normal(size=(100, STATE_DIM)))}}
    cfg = PolicyConfig(backbone=preset, head=head, head_options=head_options, horizon=H, max_prompt_tokens=PROMPT_TOKENS)
    with torch.device(device):  # initialise directly on the GPU
        p = ChunkPolicy(cfg, UnifiedSpace(32, "pad", embodiments=[s]), stats)
    return p.to(dtype).eval()


def observation(n_cam: int, B: int, device: str, size: int = 224) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(B, n_cam, 1, 3, size, size, generator=g).to(device),
        "image_mask": torch.ones(B, n_cam, dtype=torch.bool, device=device),
        "state": torch.cat([torch.randn(B, 1, STATE_DIM, generator=g), torch.zeros(B, 1, 32 - STATE_DIM)], -1).to(device),
        "prompt": ["pick up the red block and put it in the bowl on the left side of the table"] * B,
        "embodiment": torch.zeros(B, dtype=torch.long, device=device),
    }


def timeit(fn, calls: int, warmup: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(float(np.median(ts)), 2), "p90_ms": round(float(np.percentile(ts, 90)), 2), "calls": calls}


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ours_latency(args, rows, results):
    dev, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    for head, opts, label in [("flow_expert", {}, "flow_expert"), ("dit", {"objective": "diffusion", "sampler": "ddim", "num_steps": STEPS}, "dit (DDIM)"),
                              ("tokens", {"tokenizer": "bins"}, "tokens (bins)"), ("tokens", {"tokenizer": "fast"}, "tokens (FAST)")]:
        if label not in args.only and args.only != ["all"]:
            continue
        reset_peak(dev)
        try:
            policy = make_policy(args.preset, head, opts, dev, dtype)
            if head == "tokens" and opts["tokenizer"] == "fast":
                rng = np.random.default_rng(0)
                t = np.linspace(0, 1, H)[:, None]
                chunks = [np.sin(2 * np.pi * (rng.uniform(0.2, 1, (1, ACT_DIM)) * t + rng.uniform(0, 1, (1, ACT_DIM)))) for _ in range(500)]
                policy.head.fit_tokenizer(chunks)
            n_params = sum(p.numel() for p in policy.parameters())
            for n_cam in (1, 3):
                obs = observation(n_cam, 1, dev)
                calls = args.calls if head != "tokens" else max(3, args.calls // 10)
                eager = timeit(lambda: policy.predict_unified(obs, num_steps=STEPS if head != "tokens" else None), calls, 2, dev)
                row = {"model": f"chunkpolicy {label}", "cameras": n_cam, "mode": "eager", **eager, "params": n_params, "peak_gb": peak_gb(dev)}
                if head == "tokens":
                    row["tokens_generated"] = int(policy.head.generate(policy.backbone, policy._prefix(obs)[1], H * ACT_DIM + 1).shape[1])
                    row["invalid_decodes"] = policy.head.last_invalid_count
                rows.append(row)
                print(row, flush=True)
                if head == "flow_expert" and dev.startswith("cuda"):
                    from chunkpolicy.runtime.graphs import CudaGraphPolicy

                    graphed = CudaGraphPolicy(policy, obs, num_steps=STEPS)
                    noise = torch.randn(1, H, 32, device=dev, dtype=dtype)
                    ref = policy.predict_unified(obs, noise=noise, num_steps=STEPS)
                    got = graphed(obs, noise=noise)
                    diff = float((ref - got).abs().max())
                    g = timeit(lambda: graphed(obs), args.calls * 2, 5, dev)
                    row = {"model": f"chunkpolicy {label}", "cameras": n_cam, "mode": "cuda_graph", **g, "params": n_params,
                           "peak_gb": peak_gb(dev), "max_abs_diff_vs_eager": diff}
                    rows.append(row)
                    print(row, flush=True)
                    del graphed
                    if args.compile:
                        t0 = time.perf_counter()
                        graphed = CudaGraphPolicy(policy, obs, num_steps=STEPS, compile=True)
                        build_s = time.perf_counter() - t0
                        got = graphed(obs, noise=noise)
                        diff = float((ref.float() - got.float()).abs().max())
                        g = timeit(lambda: graphed(obs), args.calls * 2, 5, dev)
                        row = {"model": f"chunkpolicy {label}", "cameras": n_cam, "mode": "compile+cuda_graph", **g, "params": n_params,
                               "peak_gb": peak_gb(dev), "max_abs_diff_vs_eager": diff, "compile_s": round(build_s, 1)}
                        rows.append(row)
                        print(row, flush=True)
                        del graphed
                        policy = make_policy(args.preset, head, opts, dev, dtype)  # undo the compiled methods
            del policy
        except Exception as e:  # record and go on: one failure must not hide the other numbers
            results.setdefault("errors", []).append(f"chunkpolicy {label}: {type(e).__name__}: {e}")
            traceback.print_exc()


def lerobot_pi0(n_cam: int, device: str):
    try:  # lerobot's video utils annotate with av.option.Option at import time; load the submodule first
        import av.option  # noqa: F401
    except ImportError:
        pass
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    feats = {f"observation.images.cam{i}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)) for i in range(n_cam)}
    feats["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    cfg = PI0Config(input_features=feats, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACT_DIM,))},
                    device=device, dtype="bfloat16" if device.startswith("cuda") else "float32", chunk_size=H, n_action_steps=H,
                    num_inference_steps=STEPS)
    with torch.device(device):  # initialise on the GPU directly (minutes on the CPU for 4B parameters)
        return PI0Policy(cfg)


def lerobot_batch(n_cam: int, B: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b = {f"observation.images.cam{i}": torch.rand(B, 3, 224, 224, generator=g).to(device) for i in range(n_cam)}
    b["observation.state"] = torch.randn(B, STATE_DIM, generator=g).to(device)
    b["observation.language.tokens"] = torch.randint(0, 250000, (B, PROMPT_TOKENS), generator=g).to(device)
    b["observation.language.attention_mask"] = torch.ones(B, PROMPT_TOKENS, dtype=torch.bool, device=device)
    return b


def lerobot_latency(args, rows, results):
    for n_cam in (1, 3):
        reset_peak(args.device)
        try:
            pol = lerobot_pi0(n_cam, args.device).eval()
            batch = lerobot_batch(n_cam, 1, args.device)
            r = timeit(lambda: pol.predict_action_chunk(batch), args.calls, 2, args.device)
            row = {"model": "lerobot pi0", "cameras": n_cam, "mode": "eager", **r, "params": sum(p.numel() for p in pol.parameters()), "peak_gb": peak_gb(args.device)}
            rows.append(row)
            print(row, flush=True)
            del pol
        except Exception as e:
            results.setdefault("errors", []).append(f"lerobot pi0 latency {n_cam} cams: {type(e).__name__}: {e}")
            traceback.print_exc()


def train_rate(step, batch_size: int, steps: int, device: str) -> float:
    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t)


def throughput(args, rows, results):
    dev, B = args.device, args.train_batch
    tokens = 256 + PROMPT_TOKENS + 1 + H  # one camera
    peak = next((v for k, v in PEAK_FLOPS.items() if dev.startswith("cuda") and k in torch.cuda.get_device_name()), None)
    for preset in ([args.preset] + (["small"] if args.preset != "small" else [])):
        reset_peak(dev)
        try:
            with torch.device(dev):
                s = spec(1)
                rng = np.random.default_rng(0)
                stats = {"arm": {"action": compute_stats(rng.normal(size=(100, ACT_DIM))), "state": compute_stats(rng.normal(size=(100, STATE_DIM)))}}
                policy = ChunkPolicy(PolicyConfig(backbone=preset, horizon=H, max_prompt_tokens=PROMPT_TOKENS), UnifiedSpace(32, "pad", embodiments=[s]), stats)
            policy.train()
            opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=dev.startswith("cuda"))
            obs = observation(1, B, dev)
            sp = policy.space
            batch = dict(obs, actions=sp.pad(torch.randn(B, H, ACT_DIM, device=dev), 0, "action"), action_is_pad=torch.zeros(B, H, dtype=torch.bool, device=dev))

            def step():
                with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
                    loss = policy.compute_loss(batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rate = train_rate(step, B, args.train_steps, dev)
            n = sum(p.numel() for p in policy.parameters())
            row = {"model": f"chunkpolicy {preset} flow_expert", "batch": B, "samples_per_s": round(rate, 2), "params": n, "peak_gb": peak_gb(dev)}
            if peak:
                row["mfu"] = round(6 * n * tokens * rate / peak, 3)
            rows.append(row)
            print(row, flush=True)
            del policy, opt
        except Exception as e:
            results.setdefault("errors", []).append(f"chunkpolicy {preset} training: {type(e).__name__}: {e}")
            traceback.print_exc()
    if args.skip_lerobot:
        return
    reset_peak(dev)
    try:
        pol = lerobot_pi0(1, dev)
        pol.train()
        opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-5, fused=dev.startswith("cuda"))
        batch = lerobot_batch(1, B, dev)
        batch["action"] = torch.randn(B, H, ACT_DIM, device=dev)
        batch["action_is_pad"] = torch.zeros(B, H, dtype=torch.bool, device=dev)

        def step():
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
                loss, _ = pol.forward(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rate = train_rate(step, B, args.train_steps, dev)
        n = sum(p.numel() for p in pol.parameters())
        row = {"model": "lerobot pi0", "batch": B, "samples_per_s": round(rate, 2), "params": n, "peak_gb": peak_gb(dev)}
        if peak:
            row["mfu"] = round(6 * n * tokens * rate / peak, 3)
        rows.append(row)
        print(row, flush=True)
    except Exception as e:
        results.setdefault("errors", []).append(f"lerobot pi0 training: {type(e).__name__}: {e}")
        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="latency.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paligemma-3b")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--only", default="all", help="comma list of: flow_expert, dit (DDIM), tokens (bins), tokens (FAST)")
    p.add_argument("--skip-lerobot", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile + CUDA graph (minutes of compile)")
    p.add_argument("--quick", action="store_true", help="tiny preset, few calls (CPU smoke test)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",")]
    if args.quick:
        args.preset, args.calls, args.train_batch, args.train_steps = "tiny", 3, 2, 2
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"meta": {
        "command": " ".join(["benchmarks/latency.py"] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
    }}
    import transformers

    results["meta"]["transformers"] = transformers.__version__
    lat, thr = [], []
    results["latency"], results["throughput"] = lat, thr
    save = lambda: Path(args.out).write_text(json.dumps(results, indent=2))  # noqa: E731  (partial results survive a timeout)
    ours_latency(args, lat, results)
    save()
    if not args.skip_lerobot:
        lerobot_latency(args, lat, results)
        save()
    if not args.skip_train:
        throughput(args, thr, results)
    save()
    print("\n| model | cams | mode | median ms | p90 ms | peak GB |\n|---|---|---|---|---|---|")
    for r in lat:
        print(f"| {r['model']} | {r['cameras']} | {r['mode']} | {r['median_ms']} | {r['p90_ms']} | {r['peak_gb']} |")
    print("\n| model | batch | samples/s | MFU | peak GB |\n|---|---|---|---|---|")
    for r in thr:
        print(f"| {r['model']} | {r['batch']} | {r['samples_per_s']} | {r.get('mfu', '')} | {r['peak_gb']} |")
    for e in results.get("errors", []):
        print("ERROR", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
