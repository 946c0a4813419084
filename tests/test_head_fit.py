"""Heads that need a data fit (``caps.needs_data_fit``: the tokens head with FAST) are fitted by the experiment before
step 1 on normalized training-split chunks; resumed runs and post-training take the fitted state from a checkpoint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from chunkpolicy.config import load_config
from chunkpolicy.data.collate import collate_windows
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.data.windows import ChunkWindowDataset
from chunkpolicy.models.heads.configs import head_config
from chunkpolicy.models.heads.tokens import TokensHead
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.training.experiment import head_fit_chunks, prepare, run
from chunkpolicy.training.trainer import Trainer

FAST = head_config("tokens", {"tokenizer": "fast", "fast_vocab": 600})
HORIZON = 4


def _head_overrides(head) -> list[str]:
    """``model.head.*`` overrides spelling a typed head config (type first)."""
    d = dataclasses.asdict(head)
    return [f"model.head={d.pop('type')}"] + [f"model.head.{k}={v}" for k, v in d.items()]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    arm = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top",))
    grip = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",), control_hz=5.0)
    a = make_synthetic_store(d / "arm7.zarr", arm, n_episodes=3, episode_len=10, image_hw=(16, 16), seed=0)
    b = make_synthetic_store(d / "gripper2.zarr", grip, n_episodes=3, episode_len=8, image_hw=(16, 16), seed=1)
    return str(a.path), str(b.path)


def _cfg(stores, out, *extra, head=FAST):
    return load_config(None, [
        *_head_overrides(head), "model.backbone=tiny", f"model.horizon={HORIZON}", "model.max_prompt_tokens=24",
        f"data.datasets=[{{path: {stores[0]}}}, {{path: {stores[1]}, weight: 2.0}}]", "data.image_size=[16, 16]",
        "data.val_fraction=0.34", "train.steps=2", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=0",
        "train.log_every=1", "train.val_every=2", "train.val_batches=1", "train.ckpt_every=2", "train.progress=false",
        f"train.output_dir={out}", *extra,
    ])


@pytest.fixture(scope="module")
def fast_run(stores, tmp_path_factory):
    """A fresh tokens + FAST run through the experiment entry point (2 steps, a checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("fast") / "run"
    cfg = _cfg(stores, out)
    assert cfg.model.head == FAST
    summary = run(cfg)
    return cfg, out, summary


def _no_refit(monkeypatch):
    def refuse(self, chunks):
        raise AssertionError("fit_to_data called: the fitted state should have come from a checkpoint")

    monkeypatch.setattr(TokensHead, "fit_to_data", refuse)


def test_fast_experiment_fits_trains_and_its_checkpoint_predicts(stores, fast_run):
    cfg, out, summary = fast_run
    fit = summary["data"]["head_fit"]
    assert fit["source"] == "fitted" and fit["chunks"] == fit["windows"] == summary["data"]["train_windows"]
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    policy = ChunkPolicy.from_pretrained(summary["checkpoint"])
    assert policy.head.is_fitted()
    saved = json.loads((out / "checkpoints/step_000002/head/action_tokenizer.json").read_text())
    assert saved["name"] == "fast" and saved["bpe_json"]
    ds = ChunkWindowDataset(stores[0], policy.space, horizon=HORIZON, image_size=(16, 16))
    obs = collate_windows([ds[0], ds[5]])
    with torch.no_grad():
        chunk = policy.predict_chunk(obs)
    assert chunk.shape == (2, HORIZON, 7)  # an undecodable sequence is NaN and flagged, never made up
    assert policy.head.last_valid is not None and policy.head.last_valid.shape == (2,)


def test_fit_uses_only_the_training_split_normalized_as_training_does(stores, tmp_path, monkeypatch):
    seen: list[list[np.ndarray]] = []
    orig = TokensHead.fit_to_data

    def spy(self, chunks):
        seen.append([np.array(c) for c in chunks])
        return orig(self, chunks)

    monkeypatch.setattr(TokensHead, "fit_to_data", spy)
    prep = prepare(_cfg(stores, tmp_path / "run"))
    assert len(seen) == 1 and prep.policy.head.is_fitted()
    chunks = seen[0]
    assert len(chunks) == len(prep.train_set) and prep.val_set is not None and len(prep.val_set) > 0
    assert prep.info["head_fit"] == {"source": "fitted", "chunks": len(prep.train_set), "windows": len(prep.train_set)}
    # exactly what training hands the head: prepare_train_inputs' normalized actions, valid dims, padded steps held
    policy = prep.policy
    for i in (0, len(prep.train_set) - 1):  # the last window of the mixture ends its episode: padded steps
        item = prep.train_set[i]
        inp = policy.prepare_train_inputs(collate_windows([item]))
        a = inp["actions"][0][:, inp["action_mask"][0]].double().numpy()
        pad = item["action_is_pad"].numpy()
        real = np.flatnonzero(~pad)
        a[pad] = a[real[-1]]
        assert np.array_equal(chunks[i], a)
    assert prep.train_set[len(prep.train_set) - 1]["action_is_pad"].any()
    # no validation window contributed
    fitted = {c.tobytes() for c in chunks}
    val_chunks, _ = head_fit_chunks(policy, prep.val_set)
    assert not any(c.tobytes() in fitted for c in val_chunks)


def test_fit_sample_is_capped_and_deterministic(stores, tmp_path):
    prep = prepare(_cfg(stores, tmp_path / "run", head=head_config("tokens", {"tokenizer": "bins"})))
    assert "head_fit" not in prep.info  # bins need no fit
    a, n = head_fit_chunks(prep.policy, prep.train_set, max_windows=7, seed=3)
    b, _ = head_fit_chunks(prep.policy, prep.train_set, max_windows=7, seed=3)
    assert n == len(a) == 7 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert {c.shape[1] for c in a} <= {7, 2} and all(c.shape[0] == HORIZON for c in a)


def test_resume_reuses_the_checkpoint_bpe(stores, fast_run, tmp_path, monkeypatch):
    import shutil

    cfg, out, _ = fast_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    saved = (run_dir / "checkpoints/step_000002/head/action_tokenizer.json").read_bytes()
    _no_refit(monkeypatch)
    resumed = _cfg(stores, run_dir, "train.steps=3", "train.ckpt_every=3", "train.val_every=3")
    prep = prepare(resumed, resume=True)
    assert prep.info["head_fit"]["source"] == str(run_dir / "checkpoints/step_000002")
    saved_policy = ChunkPolicy.from_pretrained(out / "checkpoints/step_000002")
    assert prep.policy.head.state_files() == saved_policy.head.state_files()
    summary = run(resumed, resume=True)
    assert summary["steps"] == 3
    assert (run_dir / "checkpoints/step_000003/head/action_tokenizer.json").read_bytes() == saved


def test_resume_of_a_run_without_a_checkpoint_fits_fresh(stores, tmp_path):
    prep = prepare(_cfg(stores, tmp_path / "run"), resume=True)
    assert prep.info["head_fit"]["source"] == "fitted" and prep.policy.head.is_fitted()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_posttrain_takes_the_bpe_from_the_init_checkpoint(stores, fast_run, tmp_path, monkeypatch, mode):
    _, out, _ = fast_run
    base = out / "checkpoints/step_000002"
    _no_refit(monkeypatch)
    cfg = _cfg(stores, tmp_path / mode, f"posttrain.init_from={base}", f"posttrain.mode={mode}",
               "posttrain.lora_rank=2", "train.steps=1", "train.ckpt_every=1", "train.val_every=1")
    prep = prepare(cfg)
    assert prep.info["head_fit"] == {"source": str(base)}
    want = ChunkPolicy.from_pretrained(base).head.state_files()
    assert prep.policy.head.state_files() == want
    summary = Trainer(prep.policy, prep.train_set, prep.val_set, cfg.train, export_fn=prep.export_fn,
                      collate_fn=collate_windows).fit()
    assert ChunkPolicy.from_pretrained(summary["checkpoint"]).head.state_files() == want  # LoRA's export too


def test_posttrain_from_a_checkpoint_without_a_fitted_head_is_an_error(stores, fast_run, tmp_path):
    import shutil

    _, out, _ = fast_run
    base = tmp_path / "base"
    shutil.copytree(out / "checkpoints/step_000002", base, ignore=shutil.ignore_patterns("training_state"))
    shutil.rmtree(base / "head")
    cfg = _cfg(stores, tmp_path / "pt", f"posttrain.init_from={base}")
    with pytest.raises(ValueError, match="needs a data fit, but the checkpoint has no fitted state"):
        prepare(cfg)
