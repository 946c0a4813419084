"""CPU training steps/s alone and with a second busy process, under OpenMP wait settings (spin vs sleep).

A small MLP training step (forward + backward + AdamW, batch 64, width 512) runs for --seconds in 1 or 2 concurrent
processes, each with torch's default intra-op threads (= cores). The OpenMP settings are read when torch is imported,
so each measurement is a fresh subprocess.

    python benchmarks/cpu_contention.py --out cpu_contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

STEP = r"""
import time, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
opt = torch.optim.AdamW(m.parameters())
x = torch.randn(64, 256)
for _ in range(5):
    m(x).pow(2).mean().backward()
t, n = time.perf_counter(), 0
while time.perf_counter() - t < {seconds}:
    loss = m(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step(); n += 1
print(n / (time.perf_counter() - t))
"""


SETTINGS = {  # name -> environment; libgomp (PyTorch's OpenMP on Linux) spins 300k iterations by default
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
}


def run(setting: str, procs: int, seconds: float) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    ps = [subprocess.Popen([sys.executable, "-c", STEP.format(seconds=seconds)], env=env, stdout=subprocess.PIPE, text=True)
          for _ in range(procs)]
    return [round(float(p.communicate()[0].strip()), 1) for p in ps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default="cpu_contention.json")
    a = p.parse_args(argv)
    rows = []
    for procs in (1, 2):
        for setting in SETTINGS:
            rates = run(setting, procs, a.seconds)
            rows.append({"processes": procs, "setting": setting, "steps_per_s": rates})
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "benchmarks/cpu_contention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
            "date": time.strftime("%Y-%m-%d"), "commit": commit}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
