"""Long training runs on several seeds at once, and what their numerical health looked like (issue 15).

Starts one ``train.py`` process per seed (concurrently: a small-preset step leaves most of an H200 idle), each in
``RUNS/seed{S}`` (``--resume`` when that dir already has checkpoints, so a study can be completed over several
sittings), waits, and writes one row per seed: steps reached, why the run stopped, steps skipped by the non-finite
guard, rollbacks, the non-finite probes (where a skipped step overflowed), the ranges of the gradient norm, of the
largest weight and of AdamW's second moment, the largest attention logit seen by the periodic probes, losses and
throughput. Rows go to ``RUNS/seed{S}/long_run.json`` and together to ``--out``; ``RUNS/long_runs.png`` plots loss,
gradient norm, max |weight| and max AdamW exp_avg_sq against steps per seed, skipped steps marked.

    python benchmarks/long_runs.py --config configs/mt10_small_flow.yaml --seeds 0,1,2 --runs runs/long \\
        --deadline-min 9 --out long_runs.json [key=value ...]

``--deadline-min`` kills the runs after that many minutes (they resume from their last checkpoint next time);
``--summarize-only`` writes the rows from what is on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a cut last line
            pass
    return out


def _series(recs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in recs if r.get(key) is not None and math.isfinite(r[key])]


def _range(vals: list[float]) -> dict | None:
    if not vals:
        return None
    s = sorted(vals)
    return {"first": vals[0], "last": vals[-1], "min": s[0], "max": s[-1], "p99": s[min(len(s) - 1, int(0.99 * len(s)))]}


def summarize(run: Path, seed: int, target_steps: int | None) -> dict:
    recs = _metrics(run)
    train = [r for r in recs if r["kind"] == "train"]
    summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    probes = [r for r in recs if r["kind"] == "probe"]
    nonfinite = [{k: r.get(k) for k in ("step", "reproduced", "repeats", "first_nonfinite_forward", "backward_error",
                                        "attention_logit_absmax", "losses", "report")} for r in recs if r["kind"] == "nonfinite"]
    val = [r for r in recs if r["kind"] == "val"]
    sps = sorted(r["samples_per_s"] for r in train[1:] if r.get("samples_per_s"))
    row = {
        "seed": seed, "run": str(run), "target_steps": target_steps,
        "steps": train[-1]["step"] if train else 0,
        "stopped": summ.get("stopped", "running or killed"),
        "skipped_steps": max((r.get("skipped_total", 0) for r in train), default=0),
        "skip_events": [{"step": r["step"], "skipped": r["skipped"]} for r in train if r.get("skipped")],
        "rollbacks": len([r for r in recs if r["kind"] == "rollback"]),
        "nonfinite_probes": nonfinite,
        "final_train_loss": next((r["loss"] for r in reversed(train) if r.get("loss") is not None), None),
        "final_val_loss": val[-1].get("val_loss") if val else None,
        "grad_norm": _range([v for _, v in _series(train, "grad_norm")]),
        "weight_absmax": _range([v for _, v in _series(train, "weight_absmax")]),
        "adam_v_max": _range([v for _, v in _series(train, "adam_v_max")]),
        "attention_logit_absmax_by_probe": [(r["step"], r.get("attention_logit_absmax")) for r in probes],
        "samples_per_s_median": sps[len(sps) // 2] if sps else None,
        "train_minutes": round(train[-1]["train_time_s"] / 60, 2) if train and "train_time_s" in train[-1] else None,
    }
    return row


def plot(runs: dict[int, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "train loss"), ("grad_norm", "gradient norm (pre-clip)"), ("weight_absmax", "max |weight|"),
            ("adam_v_max", "max AdamW exp_avg_sq")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.4 * len(keys)), sharex=True)
    for seed, run in runs.items():
        train = [r for r in _metrics(run) if r["kind"] == "train"]
        for ax, (k, label) in zip(axes, keys):
            xs, ys = zip(*_series(train, k)) if _series(train, k) else ((), ())
            line, = ax.plot(xs, ys, lw=0.8, label=f"seed {seed}")
            for r in train:
                if r.get("skipped"):
                    ax.axvline(r["step"], color=line.get_color(), ls=":", lw=0.8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("optimizer step (dotted: steps skipped by the non-finite guard)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", default="runs/long", help="parent dir of the seed{S} run dirs")
    p.add_argument("--out", default="long_runs.json")
    p.add_argument("--deadline-min", type=float, default=None, help="kill the runs after this many minutes")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = {s: Path(a.runs) / f"seed{s}" for s in seeds}
    from chunkpolicy.config import load_config

    target = load_config(a.config, a.overrides).train.steps
    if not a.summarize_only:
        procs = {}
        for s, run in runs.items():
            run.parent.mkdir(parents=True, exist_ok=True)
            resume = ["--resume"] if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()) else []
            cmd = [sys.executable, str(ROOT / "train.py"), "--config", a.config, f"train.seed={s}",
                   f"train.output_dir={run}", "train.progress=false", *a.overrides, *resume]
            log = open(Path(a.runs) / f"seed{s}.log", "a")
            print("$", " ".join(cmd), flush=True)
            procs[s] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while any(pr.poll() is None for pr in procs.values()):
            if a.deadline_min is not None and time.time() - t0 > 60 * a.deadline_min:
                for s, pr in procs.items():
                    if pr.poll() is None:
                        print(f"seed {s}: deadline reached, killed (resumes from its last checkpoint)", flush=True)
                        os.killpg(pr.pid, signal.SIGKILL)
                break
            time.sleep(5)
        for pr in procs.values():
            pr.wait()
    rows = []
    for s, run in runs.items():
        row = summarize(run, s, target)
        (run / "long_run.json").parent.mkdir(parents=True, exist_ok=True)
        (run / "long_run.json").write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(f"seed {s}: {row['steps']}/{target} steps ({row['stopped']}), skipped {row['skipped_steps']}, "
              f"rollbacks {row['rollbacks']}, probes {len(row['nonfinite_probes'])}, final loss {row['final_train_loss']}, "
              f"grad norm max {row['grad_norm'] and row['grad_norm']['max']}, "
              f"max|w| {row['weight_absmax'] and row['weight_absmax']['last']}, "
              f"attn logits {row['attention_logit_absmax_by_probe']}", flush=True)
    meta = {"command": " ".join(["benchmarks/long_runs.py"] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip() or "unknown"}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        plot(runs, Path(a.runs) / "long_runs.png")
    except Exception as e:  # a plot never costs the rows
        print(f"warning: no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
