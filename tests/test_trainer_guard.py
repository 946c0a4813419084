"""Issue 15: the non-finite guard (skip, count, roll back, stop), the time budget, and fp32 AdamW moments by default.

Tiny stand-in models on the CPU, as tests/test_trainer.py does. The CUDA-graph variant of the guard (the captured
fused AdamW skipping through ``found_inf``) is in tests/test_graphed_step.py and needs a GPU.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from chunkpolicy.config import TrainConfig
from chunkpolicy.training.checkpoint import CheckpointManager
from chunkpolicy.training.optim import LRSchedule, build_optimizer, build_scheduler, lr_factor
from chunkpolicy.training.plots import read_metrics
from chunkpolicy.training.trainer import Trainer, TrainingDiverged


class Regressor(nn.Module):
    """compute_loss is NaN on the calls listed in ``nan_calls`` (1-based count of this model's training calls)."""

    def __init__(self, nan_calls=(), sleep: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.nan_calls, self.calls, self.sleep = set(nan_calls), 0, sleep

    def compute_loss(self, batch):
        if self.training:
            self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        noise = 0.01 * torch.randn(batch["x"].shape[0], 1, device=batch["x"].device)
        loss = ((self.lin(batch["x"].to(self.lin.weight.dtype)).float() + noise - batch["y"]) ** 2).mean()
        return {"loss": loss * float("nan") if self.training and self.calls in self.nan_calls else loss}


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
    base = dict(steps=12, batch_size=5, lr=0.3, final_lr=0.03, warmup_steps=2, log_every=1, val_every=6, val_batches=2,
                ckpt_every=4, keep_last=5, output_dir=str(out), progress=False, ema_decay=0.9, max_bad_steps=3,
                probe_nonfinite=0)  # the probe replays compute_loss, which would advance Regressor.calls
    return TrainConfig(**{**base, **kw})


def _train_recs(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def _state(ckpt):
    sd = ckpt / "training_state"
    return load_file(str(sd / "trainable.safetensors")), load_file(str(sd / "optimizer.safetensors")), \
        load_file(str(sd / "ema.safetensors"))


def test_nan_loss_at_step_k_is_skipped_and_counted(tmp_path):
    k = 5
    torch.manual_seed(0)
    summ = Trainer(Regressor(nan_calls={k}), Points(), Points(11), _tcfg(tmp_path / "a", steps=k, ckpt_every=k)).fit()
    assert summ["skipped_steps"] == 1 and summ["rollbacks"] == 0 and summ["stopped"] == "steps"
    recs = _train_recs(tmp_path / "a")
    assert recs[-1]["step"] == k and recs[-1]["loss"] is None and recs[-1]["skipped"] == 1
    assert all(math.isfinite(r["loss"]) for r in recs[:-1]) and "skipped" not in recs[0]
    # the skipped step changed nothing: weights, AdamW moments and step counts, EMA as after step k - 1
    torch.manual_seed(0)
    Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "b", steps=k, ckpt_every=k), stop_after=k - 1).fit()
    a = _state(tmp_path / f"a/checkpoints/step_{k:06d}")
    b = _state(tmp_path / f"b/checkpoints/step_{k - 1:06d}")
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    assert all(torch.isfinite(v).all() for v in a[0].values())
    assert json.loads((tmp_path / "a/summary.json").read_text())["skipped_steps"] == 1


def test_consecutive_bad_steps_roll_back_and_resume_stays_exact(tmp_path):
    # calls 7, 8, 9 are NaN: streak 3 at step 9 -> back to step 4 (the step-8 checkpoint was written inside the
    # streak), learning rate x 0.5; then the run trains on to the end
    torch.manual_seed(0)
    full = Trainer(Regressor(nan_calls={7, 8, 9}), Points(), Points(11), _tcfg(tmp_path / "a", steps=16)).fit()
    assert full["rollbacks"] == 1 and full["lr_scale"] == 0.5 and full["skipped_steps"] == 3 and full["steps"] == 16
    recs = read_metrics(tmp_path / "a/metrics.jsonl")
    rb = [r for r in recs if r["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["from_step"] == 9 and rb[0]["step"] == 4 and rb[0]["to"].endswith("step_000004")
    after = recs[recs.index(rb[0]) + 1:]
    tr = [r for r in after if r["kind"] == "train"]
    assert [r["step"] for r in tr] == list(range(5, 17)) and all(math.isfinite(r["loss"]) for r in tr)
    assert tr[0]["lr"] == pytest.approx(0.5 * 0.3 * lr_factor(4, 2, 16, 0.3, 0.03))
    final = CheckpointManager(tmp_path / "a").latest()
    w = load_file(str(final / "model.safetensors"))
    assert final.name == "step_000016" and all(torch.isfinite(v).all() for v in w.values())
    # the same run stopped after step 12 (after the rollback) and resumed: the same losses, bit for bit
    torch.manual_seed(0)
    Trainer(Regressor(nan_calls={7, 8, 9}), Points(), Points(11), _tcfg(tmp_path / "b", steps=16), stop_after=12).fit()
    torch.manual_seed(1)
    resumed = Trainer(Regressor(), Points(), Points(11), _tcfg(tmp_path / "b", steps=16), resume=True).fit()
    assert resumed["rollbacks"] == 1 and resumed["lr_scale"] == 0.5 and resumed["skipped_steps"] == 3

    def last_losses(run):
        return {r["step"]: r["loss"] for r in _train_recs(run)}

    assert last_losses(tmp_path / "b") == last_losses(tmp_path / "a")


def test_guard_gives_up_after_max_rollbacks_leaving_finite_weights(tmp_path):
    torch.manual_seed(0)
    model = Regressor(nan_calls=set(range(6, 1000)))  # diverged for good from step 6 on
    with pytest.raises(TrainingDiverged, match="max_rollbacks"):
        Trainer(model, Points(), Points(11), _tcfg(tmp_path / "a", steps=40, max_rollbacks=2)).fit()
    summ = json.loads((tmp_path / "a/summary.json").read_text())
    assert summ["stopped"] == "non_finite" and summ["rollbacks"] == 2 and summ["lr_scale"] == 0.25
    latest = CheckpointManager(tmp_path / "a").latest()
    assert latest.name == "step_000004"
    assert all(torch.isfinite(v).all() for v in load_file(str(latest / "model.safetensors")).values())


def test_max_minutes_ends_a_run_on_time_with_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    budget = 0.05  # 3 s
    t0 = time.perf_counter()
    summ = Trainer(Regressor(sleep=0.01), Points(), Points(11),
                   _tcfg(tmp_path / "a", steps=10**6, ckpt_every=10**6, val_every=10**6, log_every=50,
                         max_minutes=budget, schedule_over="time")).fit()
    wall = time.perf_counter() - t0
    assert summ["stopped"] == "max_minutes" and 0 < summ["steps"] < 10**6
    assert 3.0 <= summ["train_time_s"] < 3.0 + 1.0 and wall < 3.0 + 8.0
    latest = CheckpointManager(tmp_path / "a").latest()
    assert latest.name == f"step_{summ['steps']:06d}"
    rec = _train_recs(tmp_path / "a")[-1]
    assert rec["step"] == summ["steps"]
    assert rec["lr"] < 0.3 * 0.1 * 1.2  # the cosine over time reached (nearly) its end, well before train.steps
    assert {"first_step_s", "build_s", "shutdown_s"} <= set(summ["startup"])


def test_schedule_over_time_follows_the_clock():
    now = [0.0]
    sch = LRSchedule(2, 1000, 1.0, 0.1, over="time", budget_s=100.0, clock=lambda: now[0])
    assert sch(0) == pytest.approx(1 / 3)  # warm-up in steps
    assert sch(5) == pytest.approx(1.0)
    now[0] = 50.0
    assert sch(5) == pytest.approx(0.1 + 0.9 * 0.5)
    now[0] = 200.0
    assert sch(6) == pytest.approx(0.1)
    sch.scale = 0.5
    assert sch(6) == pytest.approx(0.05)
    opt = build_optimizer(nn.Linear(2, 2), 1.0)
    lam = build_scheduler(opt, 2, 1000, 1.0, 0.1, schedule=sch)
    json.dumps(lam.state_dict())  # the schedule (clock, scale) stays out of the scheduler's state


def test_adamw_moments_are_fp32_by_default_even_for_bf16_weights(tmp_path):
    torch.manual_seed(0)
    m = Regressor().to(torch.bfloat16)
    t = Trainer(m, Points(), None, _tcfg(tmp_path / "a", steps=2))
    t.fit()
    assert m.lin.weight.dtype == torch.float32
    states = list(t.state.optimizer.optimizer.state.values())
    assert states and all(v.dtype == torch.float32 for st in states for k, v in st.items() if k != "step")
    # the fast path is an explicit opt-in: bf16 weights, bf16 moments
    m2 = Regressor()
    t2 = Trainer(m2, Points(), None, _tcfg(tmp_path / "b", steps=2, precision="bf16"))
    t2.fit()
    assert m2.lin.weight.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for st in t2.state.optimizer.optimizer.state.values() for k, v in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def test_config_checks_of_the_new_train_options(tmp_path):
    from chunkpolicy.config import ConfigError, DatasetConfig, ExperimentConfig, validate

    cfg = ExperimentConfig()
    cfg.data.datasets = [DatasetConfig(path="x")]
    for k, v, msg in (("schedule_over", "time", "needs train.max_minutes"), ("precision", "fp16", "must be one of"),
                      ("max_minutes", 0.0, "must be > 0"), ("rollback_lr_factor", 0.0, "must be in"),
                      ("max_bad_steps", 0, "must be >= 1")):
        c = ExperimentConfig(model=cfg.model, data=cfg.data, train=TrainConfig(**{k: v}))
        with pytest.raises(ConfigError, match=f"train.{k}: .*{msg}"):
            validate(c, check_paths=False)
