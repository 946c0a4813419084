"""Chunk latency: chunkpolicy heads vs LeRobot 0.6.1 pi0, same GPU, same run, random weights.

Batch 1, H=50, 10 flow steps (10 DDIM steps for dit), bf16, 1 and 3 cameras at 224x224, 48 prompt tokens, median and
p90 over --calls calls after warm-up, CUDA-synchronized; peak GPU memory. A call is the whole user-facing call
(validation, tokens, input copies, the chunk, the output copy). chunkpolicy flow_expert runs eager, as a whole-chunk
CUDA graph over fused-projection weights, and with torch.compile inside the graph (--modes); each graphed output is
checked against eager, and graphed rows also report the graph replay alone and the host-side input preparation alone.
Real-time chunking: the guided chunk (vector-Jacobian product at each step) eager and as a CUDA graph. The tokens head
(bins, FAST) is autoregressive, so it gets 1 camera and few calls. LeRobot pi0 gets token ids directly (its
pre-processor needs a hub tokenizer). Training throughput: benchmarks/throughput.py.

    python benchmarks/latency.py --out latency.json                    # GPU, pi0-size (paligemma-3b)
    python benchmarks/latency.py --quick --device cpu --out q.json     # smoke test with the tiny preset
    python benchmarks/latency.py --flow-head '{state_token: expert, time_convention: openpi, invalid_dims: noise}'
                                     # the flow rows with an imported LeRobot pi0's head layout (pi05: add
                                     # time_conditioning: adarms, state_token: none)
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

from chunkpolicy.models.heads.configs import DiTConfig, FlowExpertConfig, HeadConfig, TokensConfig
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

H, STEPS, PROMPT_TOKENS, ACT_DIM, STATE_DIM = 50, 10, 48, 7, 8
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def spec(n_cam: int) -> EmbodimentSpec:
    return EmbodimentSpec("arm", tuple(f"j{i}" for i in range(ACT_DIM - 1)) + ("gripper",), tuple(f"j{i}" for i in range(STATE_DIM - 1)) + ("gripper",),
                          tuple(f"cam{i}" for i in range(n_cam)), 50.0, gripper_dims=("gripper",))


def make_policy(preset: str, head: HeadConfig, device: str, dtype: torch.dtype) -> ChunkPolicy:
    rng = np.random.default_rng(0)
    stats = {"arm": {"action": compute_stats(rng.normal(size=(100, ACT_DIM))), "state": compute_stats(rng.normal(size=(100, STATE_DIM)))}}
    cfg = PolicyConfig(backbone=preset, head=head, horizon=H, max_prompt_tokens=PROMPT_TOKENS)
    with torch.device(device):  # initialise directly on the GPU
        p = ChunkPolicy(cfg, UnifiedSpace(32, "pad", embodiments=[spec(3)]), stats)
    return p.to(dtype)


def observation(n_cam: int, B: int, device: str, size: int = 224) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(B, n_cam, 1, 3, size, size, generator=g).to(device),
        "image_mask": torch.ones(B, n_cam, dtype=torch.bool, device=device),
        "state": torch.cat([torch.randn(B, 1, STATE_DIM, generator=g), torch.zeros(B, 1, 32 - STATE_DIM)], -1).to(device),
        # cut to fit PROMPT_TOKENS with the character tokenizer (a longer prompt is an error, no longer truncated)
        "prompt": ["pick up the red block and put it in the bowl on the left side of the table"[: PROMPT_TOKENS - 1]] * B,
        "embodiment": torch.zeros(B, dtype=torch.long, device=device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, calls: int, warmup: int, device: str) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(float(np.median(ts)), 2), "p90_ms": round(float(np.percentile(ts, 90)), 2), "calls": calls}


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


SAVE = [lambda: None]  # main() puts the results writer here: partial results survive a timeout


def record(rows: list, row: dict) -> None:
    rows.append(row)
    print(row, flush=True)
    SAVE[0]()


def profile_table(fn, device: str, path: str, rows: int = 40) -> None:
    """GPU kernels of a few calls of ``fn`` (graph replays included), sorted by total GPU time, written to ``path``."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        sync(device)
    ka = prof.key_averages()
    Path(path).write_text(ka.table(sort_by="cuda_time_total" if device.startswith("cuda") else "cpu_time_total", row_limit=rows,
                                   max_name_column_width=90))
    print(f"profile -> {path}", flush=True)


# -- chunkpolicy latency -------------------------------------------------------------------------------------------
def flow_latency(args, rows, results) -> None:
    from chunkpolicy.runtime.graphs import CudaGraphPolicy

    dev, dtype = args.device, args.dtype
    policy = make_policy(args.preset, FlowExpertConfig(**args.flow_head), dev, dtype).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    base = {"model": "chunkpolicy flow_expert" + (f" {args.flow_head}" if args.flow_head else ""), "params": n_params}
    for n_cam in args.cams:
        reset_peak(dev)
        obs = observation(n_cam, 1, dev, args.image_size)
        noise = torch.randn(1, H, 32, device=dev, dtype=dtype)
        with torch.no_grad():
            ref = policy.predict_unified(obs, noise=noise, num_steps=STEPS)
        if "eager" in args.modes:
            r = timeit(lambda: policy.predict_unified(obs, num_steps=STEPS), args.calls, 2, dev)
            record(rows, {**base, "cameras": n_cam, "mode": "eager", **r, "peak_gb": peak_gb(dev)})
        table = {"unfused": ("cuda_graph unfused", False, False, None), "graph": ("cuda_graph", False, True, None),
                 "compile": ("compile+cuda_graph", True, True, None),
                 "combo": ("compile(combo_kernels)+cuda_graph", True, True, {"combo_kernels": True}),
                 "autotune": ("compile(max-autotune step)+cuda_graph", "max-autotune-no-cudagraphs", True, None)}
        variants = [table[m] for m in args.modes if m in table] if dev.startswith("cuda") else []
        for mode, comp, fuse, opts in variants:
            try:
                t0 = time.perf_counter()
                graphed = CudaGraphPolicy(policy, obs, num_steps=STEPS, compile=comp, fuse=fuse, compile_options=opts)
                build_s = time.perf_counter() - t0
                diff = float((graphed(obs, noise=noise).float() - ref.float()).abs().max())
                r = timeit(lambda: graphed(obs), args.calls * 2, 5, dev)
                replay = timeit(graphed.graph.replay, args.calls * 2, 5, dev)["median_ms"]
                prep = timeit(lambda: graphed.load_inputs(obs), args.calls * 2, 5, dev)["median_ms"]
                record(rows, {**base, "cameras": n_cam, "mode": mode, **r, "peak_gb": peak_gb(dev), "max_abs_diff_vs_eager": diff,
                              "build_s": round(build_s, 1), "replay_only_ms": replay, "input_prep_ms": prep})
                if args.profile_dir and n_cam == 1 and comp:
                    name = mode.replace("+", "_").replace("(", "_").replace(")", "").replace(" ", "_")
                    profile_table(lambda: graphed(obs), dev, f"{args.profile_dir}/profile_flow_{name}.txt")
                del graphed
            except Exception as e:  # record and go on: one failure must not hide the other numbers
                results.setdefault("errors", []).append(f"flow_expert {mode} {n_cam} cams: {type(e).__name__}: {e}")
                traceback.print_exc()
        if n_cam == 1 and args.rtc:
            rtc_latency(args, policy, obs, rows, results, base)
    del policy


def rtc_latency(args, policy, obs, rows, results, base) -> None:
    """Guided (RTC) chunk: s = 25 executed steps, d = 5 frozen, against the previous chunk's remaining 25 actions."""
    from chunkpolicy.runtime.graphs import CudaGraphPolicy
    from chunkpolicy.runtime.rtc import RTCGuidance, rtc_target

    dev = args.device
    try:
        reset_peak(dev)
        inp = policy.prepare_inputs(obs)
        with torch.no_grad():
            prev = policy.predict_chunk(obs, num_steps=STEPS).float()[:, 25:]
        target, w = rtc_target(policy, prev.cpu().numpy(), inp, 25, 5)

        def frozen_error(chunk):  # mean |chunk - previous chunk| over the 5 frozen steps, normalized units, valid dims
            return round(float((policy.preprocess_actions(chunk.float(), inp) - target)[:, :5, :ACT_DIM].abs().mean()), 4)

        noise = torch.randn(target.shape, device=dev, dtype=args.dtype)
        with torch.no_grad():
            r = timeit(lambda: policy.infer(inp, noise, STEPS, guidance=RTCGuidance(target, w)), max(3, args.calls // 2), 2, dev)
        record(rows, {**base, "cameras": 1, "mode": "rtc eager", **r, "peak_gb": peak_gb(dev)})
        if dev.startswith("cuda"):
            with torch.no_grad():
                ref = policy.infer(inp, noise, STEPS, guidance=RTCGuidance(target, w))
            with torch.no_grad():
                free = policy.predict_unified(obs, noise=noise, num_steps=STEPS)
            for mode, comp in [("rtc cuda_graph", False)] + ([("rtc compile+cuda_graph", True)] if "compile" in args.modes else []):
                t0 = time.perf_counter()
                hook = RTCGuidance(target.clone(), w.clone())
                graphed = CudaGraphPolicy(policy, obs, num_steps=STEPS, compile=comp, guidance=hook)
                build_s = time.perf_counter() - t0
                out = graphed(obs, noise=noise)
                diff = float((out.float() - ref.float()).abs().max())
                r = timeit(lambda: (hook.set(target, w), graphed(obs, noise=noise)), args.calls * 2, 5, dev)
                record(rows, {**base, "cameras": 1, "mode": mode, **r, "peak_gb": peak_gb(dev), "max_abs_diff_vs_eager": diff,
                              "build_s": round(build_s, 1), "frozen_steps_error_guided": frozen_error(out),
                              "frozen_steps_error_unguided": frozen_error(free)})
                del graphed
    except Exception as e:
        results.setdefault("errors", []).append(f"rtc: {type(e).__name__}: {e}")
        traceback.print_exc()


def other_heads_latency(args, rows, results) -> None:
    dev, dtype = args.device, args.dtype
    heads = [(DiTConfig(objective="diffusion", sampler="ddim", num_steps=STEPS), "dit (DDIM)", (1, 3), args.calls),
             (TokensConfig(tokenizer="bins"), "tokens (bins)", (1,), args.token_calls),
             (TokensConfig(tokenizer="fast"), "tokens (FAST)", (1,), args.token_calls)]
    for head_cfg, label, cams, calls in heads:
        head = head_cfg.type
        if args.only != ["all"] and label not in args.only:
            continue
        reset_peak(dev)
        try:
            policy = make_policy(args.preset, head_cfg, dev, dtype).eval()
            if policy.head.caps.needs_data_fit:
                rng = np.random.default_rng(0)
                t = np.linspace(0, 1, H)[:, None]
                policy.head.fit_to_data([np.sin(2 * np.pi * (rng.uniform(0.2, 1, (1, ACT_DIM)) * t + rng.uniform(0, 1, (1, ACT_DIM))))
                                           for _ in range(500)])
            for n_cam in cams:
                obs = observation(n_cam, 1, dev, args.image_size)
                r = timeit(lambda: policy.predict_unified(obs, num_steps=STEPS if head != "tokens" else None), calls, 1, dev)
                row = {"model": f"chunkpolicy {label}", "cameras": n_cam, "mode": "eager", **r,
                       "params": sum(p.numel() for p in policy.parameters()), "peak_gb": peak_gb(dev)}
                if head == "tokens":
                    with torch.no_grad():
                        row["tokens_generated"] = int(policy.head.generate(policy.backbone, policy._prefix(obs)[1], H * ACT_DIM + 1).shape[1])
                    row["invalid_decodes"] = policy.head.last_invalid_count
                record(rows, row)
            del policy
        except Exception as e:
            results.setdefault("errors", []).append(f"chunkpolicy {label}: {type(e).__name__}: {e}")
            traceback.print_exc()


# -- LeRobot pi0 ---------------------------------------------------------------------------------------------------
def lerobot_pi0(n_cam: int, device: str, gradient_checkpointing: bool = False):
    import av.option  # noqa: F401  (lerobot's video utils annotate with av.option.Option at import time)
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    feats = {f"observation.images.cam{i}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)) for i in range(n_cam)}
    feats["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    cfg = PI0Config(input_features=feats, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACT_DIM,))},
                    device=device, dtype="bfloat16" if device.startswith("cuda") else "float32", chunk_size=H, n_action_steps=H,
                    num_inference_steps=STEPS, gradient_checkpointing=gradient_checkpointing)
    with torch.device(device):  # initialise on the GPU directly (minutes on the CPU for 4B parameters)
        return PI0Policy(cfg)


def lerobot_batch(n_cam: int, B: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b = {f"observation.images.cam{i}": torch.rand(B, 3, 224, 224, generator=g).to(device) for i in range(n_cam)}
    b["observation.state"] = torch.randn(B, STATE_DIM, generator=g).to(device)
    b["observation.language.tokens"] = torch.randint(0, 250000, (B, PROMPT_TOKENS), generator=g).to(device)
    b["observation.language.attention_mask"] = torch.ones(B, PROMPT_TOKENS, dtype=torch.bool, device=device)
    return b


def lerobot_latency(args, rows, results) -> None:
    for n_cam in args.cams:
        reset_peak(args.device)
        try:
            pol = lerobot_pi0(n_cam, args.device).eval()
            batch = lerobot_batch(n_cam, 1, args.device)
            with torch.no_grad():
                r = timeit(lambda: pol.predict_action_chunk(batch), args.calls, 2, args.device)
            record(rows, {"model": "lerobot pi0", "cameras": n_cam, "mode": "eager", **r, "params": sum(p.numel() for p in pol.parameters()),
                          "peak_gb": peak_gb(args.device)})
            del pol
        except Exception as e:
            results.setdefault("errors", []).append(f"lerobot pi0 latency {n_cam} cams: {type(e).__name__}: {e}")
            traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="latency.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paligemma-3b")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--token-calls", type=int, default=3)
    p.add_argument("--only", default="all", help="comma list of other heads: dit (DDIM), tokens (bins), tokens (FAST), none")
    p.add_argument("--skip-lerobot", action="store_true")
    p.add_argument("--modes", default="eager,graph,compile",
                   help="flow_expert modes: eager, unfused (CUDA graph over unfused layers), graph, compile (torch.compile + "
                        "graph, a minute of compile per shape), combo (compile with Inductor combo kernels), autotune "
                        "(max-autotune for the step, minutes)")
    p.add_argument("--cams", default="1,3")
    p.add_argument("--no-rtc", dest="rtc", action="store_false")
    p.add_argument("--no-flow", dest="flow", action="store_false", help="skip the flow_expert latency rows")
    p.add_argument("--profile-dir", help="write GPU kernel tables of the graphed flow chunk here")
    p.add_argument("--quick", action="store_true", help="tiny preset, few calls (CPU smoke test)")
    p.add_argument("--flow-head", default="{}", help="flow_expert options (YAML mapping), e.g. the layout of an imported "
                   "LeRobot pi0: '{state_token: expert, time_convention: openpi, invalid_dims: noise}'")
    args = p.parse_args(argv)
    import yaml

    args.flow_head = yaml.safe_load(args.flow_head) or {}
    args.only = [s.strip() for s in args.only.split(",")]
    args.modes, args.cams = args.modes.split(","), [int(c) for c in args.cams.split(",")]
    args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    args.image_size = 224
    if args.quick:
        args.preset, args.calls, args.token_calls, args.image_size = "tiny", 3, 1, 32
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"meta": {
        "command": " ".join(["benchmarks/latency.py"] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
    }}
    import transformers

    results["meta"]["transformers"] = transformers.__version__
    lat: list = []
    results["latency"] = lat
    save = SAVE[0] = lambda: Path(args.out).write_text(json.dumps(results, indent=2))  # noqa: E731
    if not args.skip_lerobot:  # first: the comparison must not be what a time limit cuts off
        lerobot_latency(args, lat, results)
        save()
    if args.flow:
        flow_latency(args, lat, results)
        save()
    other_heads_latency(args, lat, results)
    save()
    print("\n| model | cams | mode | median ms | p90 ms | peak GB |\n|---|---|---|---|---|---|")
    for r in lat:
        print(f"| {r['model']} | {r['cameras']} | {r['mode']} | {r['median_ms']} | {r['p90_ms']} | {r['peak_gb']} |")
    for e in results.get("errors", []):
        print("ERROR", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
