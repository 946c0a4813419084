"""Profile one pi0-size chunk (eager) and list the GPU kernels that take the time (diagnostic for latency work).

    python benchmarks/profile_chunk.py [--preset paligemma-3b] [--cameras 1]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import latency as L  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="paligemma-3b")
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    policy = L.make_policy(a.preset, "flow_expert", "cuda", torch.bfloat16)
    obs = L.observation(a.cameras, 1, "cuda")
    for _ in range(3):
        policy.predict_unified(obs, num_steps=L.STEPS)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        policy.predict_unified(obs, num_steps=L.STEPS)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
