"""GPU time of the ops inside one pi0-size expert step, per variant (diagnostic for chunk-latency work).

Each variant is captured 100× in one CUDA graph and replayed, so the numbers are GPU time without launch overhead.
Shapes: batch 1, H = 50 action tokens, prefix P = 305 tokens (256 image + 48 text + 1 state), 8 query heads, 1 KV head,
head_dim 256, expert width 1024, MLP 4096, bf16.

    python benchmarks/expert_ops.py --out expert_ops.json
    python benchmarks/expert_ops.py --device cpu --quick      # smoke test (no graphs, tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def gpu_time_us(fn, device: str, reps: int = 100) -> float:
    if not device.startswith("cuda"):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="expert_ops.json")
    a = p.parse_args(argv)
    dev = a.device
    dt = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    H, P, h, d, W, M = (50, 305, 8, 256, 1024, 4096) if not a.quick else (8, 20, 2, 16, 32, 64)
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.05  # noqa: E731
    out: dict = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "shapes": dict(H=H, P=P, heads=h, head_dim=d, width=W, mlp=M), "us": {}}
    res = out["us"]
    # -- suffix attention: 50 queries over [prefix | actions] keys, key-validity mask ----------------------------------
    q, k, v = r(1, h, H, d), r(1, 1, P + H, d), r(1, 1, P + H, d)
    valid = torch.ones(1, P + H, dtype=torch.bool, device=dev)
    valid[:, 256 + 40: P - 1] = False  # padded prompt tokens
    m4 = valid[:, None, None, :]
    scale = d ** -0.5
    res["attn_sdpa_gqa_default"] = gpu_time_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m4, scale=scale, enable_gqa=True), dev)
    qf = q.reshape(1, 1, h * H, d)  # MQA: fold the query heads into rows against the single KV head
    res["attn_sdpa_folded_default"] = gpu_time_us(lambda: F.scaled_dot_product_attention(qf, k, v, attn_mask=m4, scale=scale), dev)
    if dev.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(qf, k, v, attn_mask=m4, scale=scale)
            try:
                res[f"attn_sdpa_folded_{name}"] = gpu_time_us(f, dev)
            except RuntimeError as e:
                res[f"attn_sdpa_folded_{name}"] = f"error: {str(e)[:120]}"
    bias = torch.zeros(1, 1, P + H, device=dev, dtype=dt).masked_fill(~valid[:, None, :], float("-inf"))

    def manual():
        s = torch.baddbmm(bias, qf[0], k[0].transpose(-1, -2), alpha=scale)
        return torch.bmm(torch.softmax(s.float(), -1).to(dt), v[0])

    res["attn_manual_bmm"] = gpu_time_us(manual, dev)
    try:
        cm = torch.compile(manual, dynamic=False)
        res["attn_manual_bmm_compiled"] = gpu_time_us(cm, dev)
    except Exception as e:  # noqa: BLE001
        res["attn_manual_bmm_compiled"] = f"error: {str(e)[:120]}"
    # -- prefix attention: 305 × 305 blockwise mask -------------------------------------------------------------------
    qp, kp, vp = r(1, h, P, d), r(1, 1, P, d), r(1, 1, P, d)
    mp = torch.ones(1, 1, P, P, dtype=torch.bool, device=dev).tril_(P - 2)
    res["prefix_attn_sdpa_gqa"] = gpu_time_us(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mp, scale=scale, enable_gqa=True), dev)
    # -- expert layer projections: separate vs fused -------------------------------------------------------------------
    x = r(1, H, W)
    wq, wk, wv, wo = r(h * d, W), r(d, W), r(d, W), r(W, h * d)
    wg, wu, wd = r(M, W), r(M, W), r(W, M)
    wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])
    res["proj_qkv_separate"] = gpu_time_us(lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)), dev)
    res["proj_qkv_fused"] = gpu_time_us(lambda: F.linear(x, wqkv), dev)
    res["proj_o"] = gpu_time_us(lambda: F.linear(r_o, wo), dev) if (r_o := r(1, H, h * d)) is not None else None
    res["mlp_separate"] = gpu_time_us(lambda: F.linear(F.gelu(F.linear(x, wg), approximate="tanh") * F.linear(x, wu), wd), dev)

    def mlp_fused():
        gu = F.linear(x, wgu)
        gg, uu = gu.chunk(2, -1)
        return F.linear(F.gelu(gg, approximate="tanh") * uu, wd)

    res["mlp_fused_gate_up"] = gpu_time_us(mlp_fused, dev)
    bytes_layer = sum(t.numel() for t in (wq, wk, wv, wo, wg, wu, wd)) * (2 if dt == torch.bfloat16 else 4)
    out["weight_bytes_per_expert_layer"] = bytes_layer
    for k_, v_ in res.items():
        print(f"{k_:<32} {v_ if isinstance(v_, str) else f'{v_:8.1f} us'}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
