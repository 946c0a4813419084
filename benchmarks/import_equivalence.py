"""Imported LeRobot π0 / π0.5 vs LeRobot itself at full size (GPU): same observation, same initial noise.

Builds a full-size LeRobot 0.6.1 ``PI0Policy`` / ``PI05Policy`` with random weights (its own code, its real sizes,
``tests/import_fixtures.py`` with ``reduced=False``), saves it with LeRobot's ``save_pretrained``, imports it with
``chunkpolicy.models.importers``, and reports max |diff| of the action chunks (robot units, after both sides'
normalization): in fp32, and with ``--dtype bfloat16`` also both sides in bf16 (LeRobot with its own mixed-precision
rules), each bf16 chunk against the fp32 reference: two bf16 implementations can only agree about as well as each
agrees with fp32. LeRobot's bf16 policy is its fp32 one converted in place by LeRobot's own
``to_bfloat16_for_selected_params`` (what its constructor does for ``dtype="bfloat16"``), then given the fp32 weights
again (rounded where LeRobot keeps bf16, exact where it keeps fp32): the same policy as a bf16 build from the same
seed, without a second 4 B-parameter build and save. Each phase's time is printed as it ends and kept in
the JSON (``phases_s``). The prompt tokenizer is the offline character tokenizer (PaliGemma's is a hub
download); its ids are valid PaliGemma ids, so the numbers test the same network. The CPU tests do the same at a
reduced size in fp32 (``tests/test_import_lerobot.py``, tolerance 1e-4).

    python benchmarks/import_equivalence.py --kind pi0 --device cuda --dtype bfloat16 --out import_pi0.json
    python benchmarks/import_equivalence.py --kind pi05 --device cuda --dtype bfloat16 --out import_pi05.json
    python benchmarks/import_equivalence.py --kind pi0 --device cuda --dtype float32 --out import_pi0_fp32.json

Latency of the imported layout (weights' values do not change it): ``benchmarks/latency.py --flow-head
'{state_token: expert, time_convention: openpi, invalid_dims: noise}' --modes eager,graph,compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("pi0", "pi05"), default="pi0")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--reduced", action="store_true", help="the tests' reduced-size config (a CPU smoke test of this script)")
    p.add_argument("--latency", action="store_true",
                   help="also time the imported policy's chunk (bf16, batch 1, compile + CUDA graph) next to a policy of "
                        "the library's default flow_expert layout with the same backbone, embodiment and prompt budget")
    args = p.parse_args(argv)

    import import_fixtures as fx

    from chunkpolicy.models.importers import import_checkpoint
    from chunkpolicy.models.tokenizer import build_char_tokenizer

    # a timeout's SIGTERM unwinds like an exception, so the temporary directory (~30 GB at full size) is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.time() - t_start - sum(phases.values()), 1)
        print(f"[{time.time() - t_start:7.1f} s] {name}: {phases[name]} s", flush=True)

    tok = build_char_tokenizer()
    H, B = 50, args.batch
    res: dict = {"kind": args.kind, "device": args.device, "dtype": args.dtype, "batch": B, "horizon": H,
                 "size": "reduced" if args.reduced else "full"}
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(B, 2, 3, 224, 224, generator=g)
    state = torch.randn(B, 8, generator=g) * 2
    noise = torch.randn(B, H, 32, generator=g)
    tasks = ["pick up the red cube", "open the drawer"][:B] + ["push"] * max(0, B - 2)
    batch = {"observation.images.top": imgs[:, 0], "observation.images.wrist": imgs[:, 1], "observation.state": state,
             "task": tasks}

    def lerobot_chunk(policy, pre, post) -> torch.Tensor:
        with torch.no_grad():
            return post(policy.predict_action_chunk(pre(batch), noise=noise.to(args.device))).float().cpu()

    def our_chunk(ours, dt: torch.dtype) -> torch.Tensor:
        ours = ours.to(args.device, dt).eval()
        obs = {"images": imgs[:, :, None].to(args.device), "image_mask": torch.ones(B, 2, dtype=torch.bool),
               "state": ours.space.pad(state, 0, "state")[:, None].to(args.device), "prompt": tasks,
               "embodiment": torch.zeros(B, dtype=torch.long)}
        with torch.no_grad():
            # the same fp32 noise as LeRobot gets (the sampling state is fp32 in a bf16 policy too)
            return ours.predict_chunk(obs, noise=noise.to(args.device)).float().cpu()

    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        # fp32 first: LeRobot's chunk, then the import of the checkpoint it saved
        lr, pre, post = fx.build_lerobot_policy(args.kind, Path(d) / "src", reduced=args.reduced, image=224, horizon=H,
                                                tokenizer=tok, prompt_len=48 if args.kind == "pi0" else 200,
                                                dtype="float32", device=args.device)
        phase("lerobot_build_and_save")
        want32 = lerobot_chunk(lr, pre, post)
        phase("lerobot_chunk_fp32")
        report, ours = import_checkpoint(Path(d) / "src", Path(d) / "ours", f"lerobot-{args.kind}", tokenizer=tok,
                                         return_policy=True)
        phase("import")
        print(report.summary())
        got32 = our_chunk(ours, torch.float32)
        phase("ours_chunk_fp32")
        res["max_abs_action"] = want32.abs().max().item()
        res["fp32"] = {"ours_vs_lerobot": diff(got32, want32)}
        if args.dtype == "bfloat16":
            # both sides in bf16 (the same random weights, rounded), each against the fp32 reference: two bf16
            # implementations can only be asked to agree about as well as each agrees with fp32
            fx.lerobot_to_bf16(lr)
            want16 = lerobot_chunk(lr, pre, post)
            phase("lerobot_chunk_bf16")
            got16 = our_chunk(ours, torch.bfloat16)
            phase("ours_chunk_bf16")
            res["bf16"] = {"ours_vs_lerobot": diff(got16, want16), "ours_vs_fp32": diff(got16, want32),
                           "lerobot_vs_fp32": diff(want16, want32)}
        del lr
        if args.latency:
            res["latency"] = chunk_latency(ours, {k: v[:1] if isinstance(v, torch.Tensor) else v[:1] for k, v in
                                                  {"images": imgs[:, :, None], "state": state, "prompt": tasks}.items()},
                                           args.device)
            phase("latency")
    res["phases_s"] = phases
    res["max_abs_diff"] = res["bf16" if args.dtype == "bfloat16" else "fp32"]["ours_vs_lerobot"]
    res["rel_diff"] = res["max_abs_diff"] / max(res["max_abs_action"], 1e-12)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def build_on(device: str):
    """Build modules directly on ``device`` (on a CUDA device the random init of ~3 B parameters takes seconds, on the
    host's CPU minutes)."""
    return torch.device(device) if str(device).startswith("cuda") else contextlib.nullcontext()


def chunk_latency(imported, obs: dict, device: str, calls: int = 100) -> dict:
    """Median / p90 ms of a whole chunk call (compile + CUDA graph, bf16, batch 1) for ``imported`` and for a
    random-weight policy of the library's default flow_expert layout with the same backbone, space and prompt budget."""
    import dataclasses

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import timeit

    from chunkpolicy.models.heads.configs import FlowExpertConfig
    from chunkpolicy.models.policy import ChunkPolicy
    from chunkpolicy.runtime.graphs import CudaGraphPolicy

    if not device.startswith("cuda"):
        return {"skipped": "CUDA graphs need a GPU"}
    with build_on(device):
        own = ChunkPolicy(dataclasses.replace(imported.config, head=FlowExpertConfig()), imported.space,
                          imported.normalizer.stats, tokenizer=imported.tokenizer)
    n_cam = obs["images"].shape[1]
    batch = {"images": obs["images"].to(device), "image_mask": torch.ones(1, n_cam, dtype=torch.bool, device=device),
             "state": imported.space.pad(obs["state"], 0, "state")[:, None].to(device), "prompt": list(obs["prompt"]),
             "embodiment": torch.zeros(1, dtype=torch.long, device=device)}
    out = {}
    for name, policy in (("imported", imported), ("default_layout", own)):
        policy = policy.to(device, torch.bfloat16).eval()
        t = time.time()
        graphed = CudaGraphPolicy(policy, batch, compile=True)
        out[name] = {**timeit(lambda: graphed(batch), calls, 5, device), "build_s": round(time.time() - t, 1),
                     "head": dataclasses.asdict(policy.config.head)}
        graphed = None  # frees the graph before the next one is captured
        policy.cpu()
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main())
