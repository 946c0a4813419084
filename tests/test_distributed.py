"""Several processes on CPU (gloo over loopback): DDP and FSDP against single-process training, and the sharded
checkpoint's kill-and-resume.

Processes are forked from the test process (imports already paid: a fresh interpreter costs ~20 s on 2 cores) and
run the real command line (:func:`chunkpolicy.training.cli.main`, what ``train.py`` calls) with the environment
``torchrun`` / ``accelerate launch`` give (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free port): the
one-host stand-in for a multi-node launch. Every launch has a deadline; stuck processes are killed and the test
fails.

Why two heads: the flow heads draw their noise per process (``set_seed(device_specific=True)``), so 2 × B/2
processes never see the noise one process with B draws; their losses are compared DDP against FSDP (same noise).
The ``tokens`` head has a deterministic loss: on one embodiment with horizon 1 (the same number of tokens per sample,
so the mean of the two processes' means is the global mean) single-process, DDP and FSDP agree up to float rounding.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chunkpolicy.training.plots import read_metrics
from chunkpolicy.training.trainer import KILL_ENV, POISON_ENV
from helpers import two_embodiment_stores

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="forked gloo processes (Linux)")

LAUNCH_TIMEOUT_S = 120.0
# measured (tokens head, 4 steps, fp32): relative loss difference <= 8.6e-8, DDP and FSDP vs one process
TOKENS_RTOL = 1e-5
# measured (flow_expert, 6 steps, fp32): FSDP vs DDP relative loss difference <= 1.3e-7; exported weights after 6
# steps at lr 1e-3 within 2e-5 (max abs; bound 1e-4)
FSDP_VS_DDP_RTOL = 1e-5
# measured (flow_expert, 3 steps): FSDP with mixed_precision=bf16 vs fp32, loss within ~2 %
BF16_RTOL = 5e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, argv: list[str], env: dict[str, str], entry=None) -> None:
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the forked copy of the test process's state
    from chunkpolicy.training.cli import main

    code = 1
    try:
        code = (entry or main)(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not pytest's exit handlers (inherited by the fork)


def launch(argv: list[str], world: int = 2, env: dict[str, str] | None = None,
           timeout: float = LAUNCH_TIMEOUT_S, entry=None) -> list[int]:
    """``train.py ARGV`` (or ``entry(ARGV)``) in ``world`` forked processes with a loopback rendezvous; their exit
    codes (-9: SIGKILL). Processes still running at the deadline are killed and the test fails."""
    ctx = mp.get_context("fork")
    port = _free_port()
    env = {k: v for k, v in (env or {}).items()}
    for k in (KILL_ENV, POISON_ENV):
        os.environ.pop(k, None)
    procs = [ctx.Process(target=_child, args=(r, world, port, argv, env, entry), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    if stuck:
        pytest.fail(f"{len(stuck)} of {world} processes still running after {timeout:.0f} s: {argv}")
    return [p.exitcode for p in procs]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in a)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return two_embodiment_stores(tmp_path_factory.mktemp("stores"))


def _cfg(path: Path, datasets: list[dict], head: str = "flow_expert", horizon: int = 4, **train) -> Path:
    cfg = {
        "model": {"backbone": "tiny", "head": head, "horizon": horizon, "max_prompt_tokens": 24},
        # the tiny backbone's image size: no resize in the model (CPU has no bf16 antialiased resize)
        "data": {"datasets": datasets, "alpha": 0.5, "image_size": [32, 32], "val_fraction": 0.34, "num_workers": 0},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 2, "log_every": 1,
                  "val_every": 3, "val_batches": 1, "ckpt_every": 3, "keep_last": 5, "progress": False, "cpu": True,
                  **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tokens_head_ddp_and_fsdp_match_one_process(stores, tmp_path):
    """Global batch 4: one process × 4, DDP 2 × 2, FSDP 2 × 2 (tokens head: a loss without noise)."""
    from chunkpolicy.training.cli import main

    # horizon 1: no padded steps, so every sample has the same number of tokens
    cfg = _cfg(tmp_path / "cfg.yaml", [{"path": stores[0]}], head="tokens", horizon=1, steps=4, ckpt_every=4,
               val_every=4)
    assert main(["--config", str(cfg), f"train.output_dir={tmp_path / 'one'}"]) == 0
    for mode in ("ddp", "fsdp"):
        codes = launch(["--config", str(cfg), f"train.output_dir={tmp_path / mode}", "train.batch_size=2",
                        f"train.distributed={mode}"])
        assert codes == [0, 0], (mode, codes)
    one, ddp, fsdp = (_losses(tmp_path / m) for m in ("one", "ddp", "fsdp"))
    print(f"tokens: one {list(one.values())}\n  ddp {list(ddp.values())}\n  fsdp {list(fsdp.values())}\n"
          f"  max rel diff ddp {_max_rel(one, ddp):.2e} fsdp {_max_rel(one, fsdp):.2e}")
    assert len(one) == 4 and len(set(one.values())) > 1  # the weights moved
    assert _max_rel(one, ddp) < TOKENS_RTOL
    assert _max_rel(one, fsdp) < TOKENS_RTOL


@pytest.fixture(scope="module")
def flow_runs(stores, tmp_path_factory):
    """flow_expert on the two-embodiment mixture, 6 steps, 2 processes × 2: DDP (with its knobs away from the
    defaults: they change the reduction schedule, not the gradients) and FSDP (uninterrupted)."""
    d = tmp_path_factory.mktemp("flow")
    cfg = _cfg(d / "cfg.yaml", [{"path": stores[0]}, {"path": stores[1], "weight": 2.0}], batch_size=2)
    knobs = ["train.ddp_bucket_cap_mb=0.25", "train.ddp_static_graph=true", "train.ddp_gradient_as_bucket_view=true"]
    for mode, extra in (("ddp", knobs), ("fsdp", [])):
        codes = launch(["--config", str(cfg), f"train.output_dir={d / mode}", f"train.distributed={mode}", *extra])
        assert codes == [0, 0], (mode, codes)
    return cfg, d


def test_fsdp_matches_ddp_and_exports_a_plain_checkpoint(flow_runs):
    from chunkpolicy.models.policy import ChunkPolicy

    _, d = flow_runs
    ddp, fsdp = _losses(d / "ddp"), _losses(d / "fsdp")
    rel = _max_rel(ddp, fsdp)
    print(f"flow_expert: ddp {list(ddp.values())}\n  fsdp {list(fsdp.values())}\n  max rel diff {rel:.2e}")
    assert len(ddp) == 6 and rel < FSDP_VS_DDP_RTOL
    # the FSDP checkpoint's policy is the consolidated model (EMA weights), the layout a single process writes
    a = load_file(str(d / "ddp/checkpoints/step_000006/model.safetensors"))
    b = load_file(str(d / "fsdp/checkpoints/step_000006/model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"exported weights: max |ddp - fsdp| {worst:.2e}")
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a) and worst < 1e-4
    sd = d / "fsdp/checkpoints/step_000006/training_state"
    assert (sd / "sharded/.metadata").is_file() and not (sd / "trainable.safetensors").exists()
    assert json.loads((sd / "state.json").read_text())["extra"]["sharded"] is True
    policy = ChunkPolicy.from_pretrained(d / "fsdp/checkpoints/step_000006")
    assert [s.name for s in policy.space.embodiments] == ["arm7", "gripper2"]


def test_fsdp_bf16_mixed_precision_runs_close_to_fp32(flow_runs, tmp_path):
    """mixed_precision=bf16: bf16 gathered weights, fp32 gradient reduction, fp32 shards and export."""
    cfg, d = flow_runs
    run = tmp_path / "bf16"
    assert launch(["--config", str(cfg), f"train.output_dir={run}", "train.distributed=fsdp",
                   "train.mixed_precision=bf16", "train.steps=3", "train.val_every=3"]) == [0, 0]
    fp32, bf16 = _losses(d / "fsdp"), _losses(run)
    rel = max(abs(bf16[s] - fp32[s]) / fp32[s] for s in (1, 2, 3))
    print(f"fsdp bf16 {list(bf16.values())} vs fp32 {[fp32[s] for s in (1, 2, 3)]}: max rel diff {rel:.2e}")
    assert rel < BF16_RTOL
    w = load_file(str(run / "checkpoints/step_000003/model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())


def test_fsdp_sigkill_after_checkpoint_then_resume_is_exact(flow_runs, tmp_path):
    from chunkpolicy.training.checkpoint import CheckpointManager

    cfg, d = flow_runs
    run = tmp_path / "run"
    argv = ["--config", str(cfg), f"train.output_dir={run}", "train.distributed=fsdp"]
    killed = launch(argv, env={KILL_ENV: "3"})
    assert killed == [-9, -9], killed
    mgr = CheckpointManager(run)
    assert [s for s, _ in mgr.checkpoints()] == [3] and max(_losses(run)) == 3
    assert launch([*argv, "--resume"]) == [0, 0]
    want, got = _losses(d / "fsdp"), _losses(run)
    print(f"fsdp reference {[want[s] for s in (4, 5, 6)]} resumed {[got[s] for s in (4, 5, 6)]}")
    assert got == want  # exact, bit for bit
    a = load_file(str(d / "fsdp/checkpoints/step_000006/model.safetensors"))
    b = load_file(str(run / "checkpoints/step_000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bench_child(argv: list[str]) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_gpu", REPO / "benchmarks/multi_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_multi_gpu_benchmark_smoke(tmp_path):
    """benchmarks/multi_gpu.py --smoke: DDP and FSDP rows from two gloo processes, and its summary."""
    out = tmp_path / "rows.jsonl"
    assert launch(["--smoke", "--mode", "ddp", "fsdp", "--out", str(out)], entry=_bench_child) == [0, 0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["ddp", "fsdp"]
    for r in rows:
        assert r["processes"] == 2 and r["global_batch"] == 4 and r["samples_per_s"] > 0
        assert r["command"].startswith("WORLD_SIZE=2 benchmarks/multi_gpu.py --smoke") and r["date"] and "machine" in r
        assert "commit" in r
    assert _bench_child(["--summarize", str(out)]) == 0


@pytest.mark.parametrize("override, key", [
    ("train.distributed=zero3", "train.distributed"),
    ("train.distributed=fsdp train.cuda_graph=true", "train.cuda_graph"),
    ("train.distributed=fsdp train.compile=true", "train.compile"),
    ("train.distributed=fsdp train.precision=bf16", "train.precision"),
    ("train.distributed=fsdp train.ddp_static_graph=true", "train.ddp_static_graph"),
    ("train.ddp_bucket_cap_mb=0", "train.ddp_bucket_cap_mb"),
])
def test_distributed_config_errors_name_the_field(stores, tmp_path, override, key):
    from chunkpolicy.config import ConfigError, load_config

    cfg = _cfg(tmp_path / "cfg.yaml", [{"path": stores[0]}])
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(cfg, override.split())


def test_ddp_knobs_reach_accelerate():
    from chunkpolicy.config import TrainConfig
    from chunkpolicy.training.distributed import make_accelerator

    acc = make_accelerator(TrainConfig(cpu=True))
    assert acc.ddp_handler is None or acc.ddp_handler.to_kwargs() == {}  # defaults unchanged
    acc = make_accelerator(TrainConfig(cpu=True, ddp_bucket_cap_mb=100, ddp_static_graph=True,
                                       ddp_gradient_as_bucket_view=True))
    assert acc.ddp_handler.to_kwargs() == {"bucket_cap_mb": 100, "static_graph": True, "gradient_as_bucket_view": True}
