"""Numerical-health diagnostics (issue 15): the non-finite probe names where a step overflowed, leaves training
untouched, and train records carry the weight / AdamW-moment ranges."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from chunkpolicy.config import TrainConfig
from chunkpolicy.training.diagnostics import optimizer_health, probe_step
from chunkpolicy.training.plots import read_metrics
from chunkpolicy.training.trainer import Trainer
from helpers import toy_batch, toy_policy


@pytest.mark.parametrize("head", ["flow_expert", "dit", "tokens"])
def test_probe_of_a_finite_step_reports_logits_and_gradients_and_changes_nothing(head):
    policy = toy_policy(head)
    batch = toy_batch()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rng = torch.get_rng_state()
    rep = probe_step(policy, batch, seeds=[1, 2])
    assert rep["reproduced"] == 0 and len(rep["repeats"]) == 2
    r = rep["repeats"][0]
    assert math.isfinite(r["loss"]) and r["first_nonfinite_forward"] is None and "backward_error" not in r
    assert r["attention_logit_absmax"] is not None and 0 < r["attention_logit_absmax"] < 1e4
    assert all(s.startswith("models/") for s in r["attention_logit_by_site"])
    assert r["grad_norm"] > 0 and r["grad_norm_top"][0]["norm"] > 0 and r["activation_absmax_top"]
    assert rep["repeats"][0]["loss"] != rep["repeats"][1]["loss"] or head == "tokens"  # different noise per seed
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in policy.named_parameters())


def test_probe_names_the_first_call_that_overflowed():
    policy = toy_policy("flow_expert")
    with torch.no_grad():  # one runaway weight in the first backbone layer's MLP (the last one's output is unused)
        w = next(p for n, p in policy.named_parameters() if "language_model.layers.0.mlp.gate" in n)
        w[0, 0] = float("inf")
    rep = probe_step(policy, toy_batch(), seeds=[0, 1])
    assert rep["reproduced"] == 2
    first = rep["repeats"][0]["first_nonfinite_forward"]
    assert first["site"].startswith("models/") and all(first["inputs_finite"][:1])


class SqrtOfNegative(nn.Module):
    """Finite forward, NaN gradient: the unselected branch of a where() is sqrt of a negative number."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -1.0]))

    def compute_loss(self, batch):
        x = self.w * batch["x"]
        return {"loss": torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x)).sum()}


def test_probe_names_the_backward_function_that_made_a_nan():
    rep = probe_step(SqrtOfNegative(), {"x": torch.ones(2)}, seeds=[0])
    r = rep["repeats"][0]
    assert rep["reproduced"] == 1 and math.isfinite(r["loss"]) and r["first_nonfinite_forward"] is not None
    assert "SqrtBackward" in r["backward_error"]


class Poisoned(torch.utils.data.Dataset):
    """Points on a plane; every sixth sample has an infinite input, so a batch holding one has a non-finite loss."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
        self.x[3::6, 1] = float("inf")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def compute_loss(self, batch):
        noise = 0.01 * torch.randn(batch["x"].shape[0], 1, device=batch["x"].device)
        return {"loss": ((self.lin(batch["x"]) + noise - batch["y"]) ** 2).mean()}


def _cfg(out, **kw):
    base = dict(steps=10, batch_size=4, lr=0.1, final_lr=0.01, warmup_steps=2, log_every=5, val_every=100,
                ckpt_every=10, output_dir=str(out), progress=False, ema_decay=0.9, max_bad_steps=5, probe_repeats=2)
    return TrainConfig(**{**base, **kw})


def test_trainer_probes_skipped_steps_and_training_is_unchanged(tmp_path):
    torch.manual_seed(0)
    Trainer(Regressor(), Poisoned(), None, _cfg(tmp_path / "a", probe_every=4)).fit()
    torch.manual_seed(0)
    Trainer(Regressor(), Poisoned(), None, _cfg(tmp_path / "b", probe_nonfinite=0, log_health=False)).fit()
    recs = read_metrics(tmp_path / "a/metrics.jsonl")
    skipped = sum(r.get("skipped", 0) for r in recs if r["kind"] == "train")
    probes = [r for r in recs if r["kind"] == "nonfinite"]
    assert skipped >= 2 and len(probes) == min(skipped, 3)
    for p in probes:
        rep = json.loads((tmp_path / f"a/nonfinite/step_{p['step']:06d}.json").read_text())
        assert rep["reproduced"] == 2 and rep["batch_inputs"]["x"]["finite"] is False
        assert rep["repeats"][0]["first_nonfinite_forward"]["call"] == "linear"
        assert p["first_nonfinite_forward"].startswith("linear at ")
        batch = torch.load(tmp_path / f"a/nonfinite/step_{p['step']:06d}_batch.pt")
        assert not torch.isfinite(batch[0]["x"]).all()
    assert [r["step"] for r in recs if r["kind"] == "probe"] == [4, 8]
    assert (tmp_path / "a/probes/step_000004.json").exists()
    # probes and health reads leave training bit-identical
    a = load_file(str(tmp_path / "a/checkpoints/step_000010/training_state/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step_000010/training_state/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [r for r in recs if r["kind"] == "train"][-1]
    assert last["weight_absmax"] == pytest.approx(max(float(v.abs().max()) for v in a.values()))
    assert last["adam_v_max"] > 0 and last["adam_m_absmax"] > 0
    assert all("weight_absmax" not in r for r in read_metrics(tmp_path / "b/metrics.jsonl") if r["kind"] == "train")


def test_optimizer_health_sees_a_nan_moment():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert optimizer_health(opt, torch.device("cpu")).tolist() == [1.0, 0.0, 0.0]
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["exp_avg_sq"][1] = float("nan")
    assert math.isnan(optimizer_health(opt, torch.device("cpu"))[2])
