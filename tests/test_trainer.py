"""Trainer: exact resume after SIGKILL, cross-embodiment mixture training, checkpoint manager, EMA, schedule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from chunkpolicy.config import load_config
from chunkpolicy.training.checkpoint import CheckpointManager, capture_rng, restore_rng
from chunkpolicy.training.distributed import ShardedBatchSampler
from chunkpolicy.training.ema import EMA
from chunkpolicy.training.optim import (
    build_optimizer, build_scheduler, lr_factor, optimizer_state_from_tensors, optimizer_state_to_tensors, plain_numbers,
    set_lr, tensor_lrs,
)
from chunkpolicy.training.plots import read_metrics
from chunkpolicy.training.trainer import KILL_ENV, POISON_ENV, Trainer
from helpers import two_embodiment_stores

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two tiny stores with different embodiments: 7-D arm with 2 cameras, 2-D gripper with 1 camera."""
    return two_embodiment_stores(tmp_path_factory.mktemp("stores"))


def _write_cfg(path: Path, stores, **train) -> Path:
    cfg = {
        "model": {"backbone": "tiny", "head": "flow_expert", "horizon": 4, "max_prompt_tokens": 24},
        "data": {"datasets": [{"path": stores[0]}, {"path": stores[1], "weight": 2.0}], "alpha": 0.5,
                 "image_size": [16, 16], "val_fraction": 0.34},
        "train": {"steps": 8, "batch_size": 4, "lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 2, "log_every": 1,
                  "val_every": 4, "val_batches": 1, "ckpt_every": 3, "keep_last": 5, "progress": False, **train},
    }
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, out: Path, *extra: str, kill_at: int | None = None, workers: int = 0,
           poison_at: int | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    env.pop(POISON_ENV, None)
    if poison_at is not None:
        env[POISON_ENV] = str(poison_at)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(cfg), f"train.output_dir={out}",
           f"data.num_workers={workers}", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference_run(stores, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    cfg = _write_cfg(d / "cfg.yaml", stores, grad_accum=2)
    r = _train(cfg, d / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, d / "run"


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_after_checkpoint_then_resume_is_exact(reference_run, tmp_path, workers):
    cfg, ref = reference_run
    k = 3
    killed = _train(cfg, tmp_path / "run", kill_at=k, workers=workers)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    mgr = CheckpointManager(tmp_path / "run")
    assert [s for s, _ in mgr.checkpoints()] == [k]
    assert max(_losses(tmp_path / "run")) == k  # nothing ran past the checkpoint
    if workers == 0:  # a fresh start into a run dir with checkpoints is refused before any work
        again = _train(cfg, tmp_path / "run", workers=workers)
        assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _train(cfg, tmp_path / "run", "--resume", workers=workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {mgr.dir / 'step_000003'}" in resumed.stdout
    want, got = _losses(ref), _losses(tmp_path / "run")
    nxt = list(range(k + 1, k + 6))
    print(f"workers={workers} reference {[want[s] for s in nxt]} resumed {[got[s] for s in nxt]}")
    assert [got[s] for s in nxt] == [want[s] for s in nxt]  # exact, bit for bit
    # the whole state at the end is identical too: weights, EMA, optimizer moments
    for name in ("training_state/trainable.safetensors", "training_state/ema.safetensors",
                 "training_state/optimizer.safetensors", "model.safetensors"):
        a = load_file(str(ref / "checkpoints/step_000008" / name))
        b = load_file(str(tmp_path / "run/checkpoints/step_000008" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a), name
    st = json.loads((tmp_path / "run/checkpoints/step_000008/training_state/state.json").read_text())
    assert st["epoch"] >= 1  # the resumed part crossed an epoch boundary of the sampler


def test_mixture_of_two_embodiments_learns(stores, tmp_path):
    from chunkpolicy.models.policy import ChunkPolicy
    from chunkpolicy.training.experiment import run

    cfg = load_config(_write_cfg(tmp_path / "cfg.yaml", stores), [
        f"train.output_dir={tmp_path / 'run'}", "train.steps=60", "train.lr=1e-2", "train.final_lr=1e-3",
        "train.warmup_steps=5", "train.val_every=60", "train.val_batches=2", "train.ckpt_every=60", "train.batch_size=8",
        "train.ema_decay=0.9",
    ])
    summary = run(cfg)
    losses = _losses(tmp_path / "run")
    first, last = float(np.mean([losses[s] for s in range(1, 11)])), float(np.mean([losses[s] for s in range(51, 61)]))
    print(f"mixture: train loss steps 1-10 {first:.4f} -> steps 51-60 {last:.4f}; val {summary['final_val_loss']:.4f}")
    assert last < 0.85 * first  # measured 1.6 -> ~1.2 (flow-matching loss has a large irreducible part)
    assert summary["data"]["embodiments"] == ["arm7", "gripper2"]
    assert summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"])
    assert (tmp_path / "run/loss.png").stat().st_size > 1000 and (tmp_path / "run/summary.json").exists()
    # the checkpoint is a plain policy for both embodiments, with stats from the training split
    policy = ChunkPolicy.from_pretrained(summary["checkpoint"])
    assert [s.name for s in policy.space.embodiments] == ["arm7", "gripper2"]
    assert set(policy.normalizer.stats) == {"arm7", "gripper2"}


# -- stand-in model: fast checks of the loop's mechanics ---------------------------------------------------------
class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def compute_loss(self, batch):
        # the global RNG (of the batch's device), as the flow heads use it
        noise = 0.01 * torch.randn(batch["x"].shape[0], 1, device=batch["x"].device)
        return {"loss": ((self.lin(batch["x"]) + noise - batch["y"]) ** 2).mean()}


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 37) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _tcfg(out, **kw):
    from chunkpolicy.config import TrainConfig

    base = dict(steps=12, batch_size=5, lr=0.3, final_lr=0.03, warmup_steps=2, log_every=1, val_every=6, val_batches=2,
                ckpt_every=4, keep_last=2, output_dir=str(out), progress=False, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def test_standin_loop_checkpoints_and_resume(tmp_path):
    torch.manual_seed(0)
    full = Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "a")).fit()
    mgr = CheckpointManager(tmp_path / "a", keep_last=2)
    assert [s for s, _ in mgr.checkpoints()] == [8, 12]  # keep-last-2
    assert mgr.latest().name == "step_000012" and full["steps"] == 12
    recs = read_metrics(tmp_path / "a/metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "val"] == [6, 12]
    lrs = [r["lr"] for r in recs if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(0.3 / 3) and lrs[-1] == pytest.approx(0.3 * lr_factor(11, 2, 12, 0.3, 0.03))
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert losses[-1] < 0.2 * losses[0]
    # stopped after step 5 (in process this time; a checkpoint is written there), then resumed: identical losses afterwards
    torch.manual_seed(0)
    Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "b"), stop_after=5).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "b"))
    (tmp_path / "b/checkpoints/.step_000008.tmp").mkdir()  # debris of a save killed halfway
    torch.manual_seed(123)  # a different init: the checkpoint must override it
    Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "b"), resume=True).fit()
    assert not (tmp_path / "b/checkpoints/.step_000008.tmp").exists()
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b/metrics.jsonl") if r["kind"] == "train"]
    assert resumed == losses


def test_checkpoint_manager_atomic_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for step in (5, 10, 15):
        tmp = mgr.temp_dir(step)
        (tmp / "training_state").mkdir(parents=True)
        (tmp / "training_state/state.json").write_text("{}")
        mgr.commit(step, tmp)
    assert [s for s, _ in mgr.checkpoints()] == [10, 15] and mgr.latest().name == "step_000015"
    (mgr.dir / "step_000020").mkdir()  # incomplete (no state): ignored
    assert mgr.latest().name == "step_000015"


def test_optimizer_state_round_trip_without_pickle():
    torch.manual_seed(0)
    m = Regressor()
    opt = build_optimizer(m, 0.1)
    m.compute_loss(Points()[0:4])["loss"].backward()
    opt.step()
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    json.loads(meta)
    opt2 = build_optimizer(m, 0.1)
    opt2.load_state_dict(optimizer_state_from_tensors(tensors, meta))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_cuda_graph_option_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="train.cuda_graph: needs a CUDA device"):
        Trainer(Regressor(), Points(), None, _tcfg(tmp_path / "a", cuda_graph=True, cpu=True)).fit()
    # on a GPU host accelerate cannot make a CPU Accelerator once a CUDA one exists in the process: use the default
    with pytest.raises(ValueError, match="train.compile: Regressor has no compile_layers"):
        Trainer(Regressor(), Points(), None, _tcfg(tmp_path / "b", compile=True, cpu=not torch.cuda.is_available())).fit()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_tensor_learning_rates_follow_the_schedule_in_place_and_serialize():
    """A CUDA-graphed step reads lr from a tensor: the scheduler must fill that same tensor, and checkpoints must
    still be JSON (lr and initial_lr stored as numbers)."""
    m = Regressor()
    opt = build_optimizer(m, 0.1)
    sch = build_scheduler(opt, 2, 10, 0.1, 0.01)
    tensor_lrs(opt, "cpu")
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(0.1 / 3)
    for s in range(1, 6):
        sch.step()
        assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1 * lr_factor(s, 2, 10, 0.1, 0.01))
    set_lr(opt.param_groups[0], 0.05)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)
    _, meta = optimizer_state_to_tensors(opt.state_dict())
    assert json.loads(meta)["param_groups"][0]["lr"] == pytest.approx(0.05)
    json.dumps(plain_numbers(sch.state_dict()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the benchmark machine)")
def test_cuda_graph_training_matches_eager_and_resumes_exactly(stores, tmp_path):
    cfg = _write_cfg(tmp_path / "cfg.yaml", stores)
    runs = {}
    for name, extra in (("eager", ()), ("graph", ("train.cuda_graph=true",))):
        r = _train(cfg, tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = _losses(tmp_path / name)
    e, g = runs["eager"], runs["graph"]
    print("eager", e, "\ngraph", g)
    assert e.keys() == g.keys() and all(g[s] == pytest.approx(e[s], rel=1e-3) for s in e)  # same data, noise and math
    killed = _train(cfg, tmp_path / "res", "train.cuda_graph=true", kill_at=3)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _train(cfg, tmp_path / "res", "train.cuda_graph=true", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "res") == g  # a new graph is captured on resume: same losses, bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the benchmark machine)")
def test_graphed_training_steps_never_wait_for_the_gpu(stores, tmp_path):
    """After the capture, a graph-mode training step (host checks of the batch, copies, replay, EMA, counters) makes
    no call that waits for the GPU: the host prepares step n+1 while the GPU runs step n."""
    from chunkpolicy.training.experiment import prepare

    cfg = load_config(_write_cfg(tmp_path / "cfg.yaml", stores, steps=20), [
        "train.cuda_graph=true", f"train.output_dir={tmp_path / 'run'}", "data.num_workers=1"])
    prep = prepare(cfg)
    tr = Trainer(prep.policy, prep.train_set, prep.val_set, cfg.train, run_dir=tmp_path / "run")
    tr.state = tr.build_state()
    batches = tr._train_batches()
    for _ in range(3):  # capture and the loader's start
        tr.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            tr.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tr.state.step == 7 and torch.isfinite(tr.state.skip_count).all()


@pytest.mark.parametrize("mode", ["eager", pytest.param("graph", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the benchmark machine)"))])
def test_runaway_weight_is_skipped_probed_and_rolled_back_through_train_py(stores, tmp_path, mode):
    """A weight turned inf before step 5 (eager, or CUDA graph on a GPU): every step is non-finite from then on, the
    guard skips them, the probe names the call that overflowed, the run rolls back to its step-3 checkpoint (finite
    weights) and finishes with finite weights on disk."""
    cfg = _write_cfg(tmp_path / "cfg.yaml", stores, steps=9, max_bad_steps=2, probe_repeats=1)
    extra = ("train.cuda_graph=true",) if mode == "graph" else ("train.cpu=true",)
    r = _train(cfg, tmp_path / "run", *extra, poison_at=5)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(tmp_path / "run/metrics.jsonl")
    summ = json.loads((tmp_path / "run/summary.json").read_text())
    assert summ["skipped_steps"] >= 2 and summ["rollbacks"] == 1 and summ["stopped"] == "steps"
    assert [r["step"] for r in recs if r["kind"] == "rollback"] and max(_losses(tmp_path / "run")) == 9
    probe = next(r for r in recs if r["kind"] == "nonfinite")
    assert probe["step"] == 5 and probe["reproduced"] == 1 and " at models/" in probe["first_nonfinite_forward"]
    w = load_file(str(tmp_path / "run/checkpoints/step_000009/training_state/trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_lr_schedule_warmup_then_cosine_to_final():
    f = [lr_factor(s, 10, 110, 1e-3, 1e-4) for s in range(120)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx((1e-4 + 0.9e-3 * 0.5) / 1e-3) and f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sch = build_scheduler(opt, 10, 110, 1e-3, 1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 11)


def test_ema_tracks_and_swaps_back_exactly():
    m = nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # first update: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], 0.1 * before + 0.9 * (before + 1))
    trained = m.weight.detach().clone()
    with ema.apply_to(m):
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, trained)


def test_sharded_batches_partition_the_global_batch():
    idx = list(range(23))
    parts = [list(ShardedBatchSampler(idx, 3, 2, r)) for r in range(2)]
    assert parts[0] == [[0, 1, 2], [6, 7, 8], [12, 13, 14]] and parts[1] == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]


def test_rng_capture_restore():
    import random

    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(*state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == a
