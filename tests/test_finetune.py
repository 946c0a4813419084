"""Post-training: LoRA / head-only / frozen-vision change exactly what they should; new embodiments extend the space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chunkpolicy.config import load_config
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.spaces import UnifiedSpace
from chunkpolicy.training.experiment import embodiment_stats, prepare
from chunkpolicy.training.finetune import extend_space, merge_stats
from chunkpolicy.training.trainer import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base checkpoint trained on nothing but knowing the arm (stats from its store), and a gripper store."""
    d = tmp_path_factory.mktemp("ft")
    arm = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist"))
    grip = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",), control_hz=5.0)
    a = make_synthetic_store(d / "arm7.zarr", arm, n_episodes=2, episode_len=10, image_hw=(16, 16), seed=0)
    b = make_synthetic_store(d / "gripper2.zarr", grip, n_episodes=3, episode_len=10, image_hw=(16, 16), seed=1)
    torch.manual_seed(0)
    base = ChunkPolicy(PolicyConfig(backbone="tiny", head="flow_expert", horizon=4, max_prompt_tokens=24),
                       UnifiedSpace(32, "pad", embodiments=[arm]), {"arm7": a.stats})
    base.save_pretrained(d / "base")
    return d, str(a.path), str(b.path), {k: v.detach().clone() for k, v in base.state_dict().items()}


def _posttrain(setup, tmp_path, mode, *extra):
    d, _, grip, _ = setup
    cfg = load_config(None, [
        f"posttrain.init_from={d / 'base'}", f"posttrain.mode={mode}", f"data.datasets=[{{path: {grip}}}]",
        "data.val_fraction=0.34", "train.steps=3", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=0",
        "train.log_every=1", "train.val_every=3", "train.val_batches=1", "train.ckpt_every=3", "train.progress=false",
        f"train.output_dir={tmp_path / mode}", *extra,
    ])
    prep = prepare(cfg)
    summary = Trainer(prep.policy, prep.train_set, prep.val_set, cfg.train, export_fn=prep.export_fn).fit()
    return prep.policy, summary, prep.info


def _changed(before, after) -> set[str]:
    # the trained policy sits on the training device (CUDA where there is one); compare on the CPU
    return {k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())}


def test_lora_changes_only_adapters_and_head(setup, tmp_path):
    _, _, _, base = setup
    policy, summary, info = _posttrain(setup, tmp_path, "lora", "posttrain.lora_rank=4")
    assert info["added_embodiments"] == ["gripper2"] and info["backbone_lora_layers"] == 14  # 2 LM layers × 7
    after = {k: v.detach() for k, v in policy.state_dict().items()}
    adapters = {k for k in after if ".lora_" in k}
    plain = {k.replace(".base_layer.", "."): v for k, v in after.items() if k not in adapters}
    assert set(plain) == set(base)
    changed = _changed(base, plain)
    assert changed and all(k.startswith("head.") for k in changed)  # every base tensor outside the head: bit-identical
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)  # adapters trained
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")}
    # the checkpoint is a plain policy: LoRA merged, old embodiment keeps id 0 and its stats, the new one has id 1
    ck = ChunkPolicy.from_pretrained(summary["checkpoint"])
    assert [s.name for s in ck.space.embodiments] == ["arm7", "gripper2"]
    base_pol = ChunkPolicy.from_pretrained(setup[0] / "base")
    for key in ("action", "state"):
        for stat, v in base_pol.normalizer.stats["arm7"][key].items():
            assert np.array_equal(ck.normalizer.stats["arm7"][key][stat], v)
    sd = ck.state_dict()
    q = "backbone.model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], base[q])  # merged W + BA
    v = "backbone.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(sd[v], base[v])  # no adapters in the vision tower by default


def test_head_only_leaves_backbone_bit_identical(setup, tmp_path):
    _, _, _, base = setup
    policy, summary, _ = _posttrain(setup, tmp_path, "head_only")
    changed = _changed(base, policy.state_dict())
    assert changed and all(k.startswith("head.") for k in changed)
    ck = ChunkPolicy.from_pretrained(summary["checkpoint"]).state_dict()
    assert all(torch.equal(ck[k], base[k]) for k in base if k.startswith("backbone."))


def test_freeze_vision_leaves_vision_tower_bit_identical(setup, tmp_path):
    _, _, _, base = setup
    policy, _, _ = _posttrain(setup, tmp_path, "freeze_vision")
    changed = _changed(base, policy.state_dict())
    vt = "backbone.model.vision_tower."
    assert not any(k.startswith(vt) for k in changed)
    assert any(k.startswith("backbone.model.language_model.") for k in changed) and any(k.startswith("head.") for k in changed)


def test_extend_space_keeps_ids_and_merge_stats(setup):
    d, arm_path, grip_path, _ = setup
    base = ChunkPolicy.from_pretrained(d / "base")
    grip = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",), control_hz=5.0)
    space, added = extend_space(base.space, [grip, base.space.spec("arm7")])
    assert added == ["gripper2"] and space.id_of("arm7") == 0 and space.id_of("gripper2") == 1
    assert [s.name for s in base.space.embodiments] == ["arm7"]  # the checkpoint's space is not mutated
    other = make_spec("arm7", action_dim=6, state_dim=8)
    with pytest.raises(ValueError, match="already registered with a different spec"):
        extend_space(base.space, [other])
    old = {"arm7": {"action": {"mean": np.zeros(7)}}}
    new = {"arm7": {"action": {"mean": np.ones(7)}}, "gripper2": {"action": {"mean": np.ones(2)}}}
    assert merge_stats(old, new)["arm7"] is old["arm7"] and "gripper2" in merge_stats(old, new)
    assert merge_stats(old, new, recompute=True)["arm7"] is new["arm7"]


def test_stats_pool_datasets_of_one_embodiment(setup):
    from chunkpolicy.data.windows import ChunkWindowDataset

    _, arm_path, _, _ = setup
    space = UnifiedSpace(32, "pad", embodiments=[make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist"))])
    halves = [ChunkWindowDataset(arm_path, space, 4, episodes=[0]), ChunkWindowDataset(arm_path, space, 4, episodes=[1])]
    whole = ChunkWindowDataset(arm_path, space, 4)
    a, b = embodiment_stats(halves)["arm7"], embodiment_stats([whole])["arm7"]
    for key in ("action", "state"):
        for stat in a[key]:
            assert np.allclose(a[key][stat], b[key][stat])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the benchmark machine)")
@pytest.mark.parametrize("mode", ["full", "lora", "head_only"])
def test_graphed_posttraining_matches_eager_and_keeps_frozen_weights(setup, tmp_path, mode):
    """The study's post-train rows (4c) run with train.cuda_graph: a captured step over a partly frozen model (LoRA
    adapters, head only) must train the same parameters with the same losses as the eager step."""
    from chunkpolicy.training.plots import read_metrics

    _, _, _, base = setup
    extra = ("posttrain.lora_rank=4",) if mode == "lora" else ()
    runs = {}
    for name, graph in (("eager", ()), ("graph", ("train.cuda_graph=true",))):
        policy, _, _ = _posttrain(setup, tmp_path / name, mode, *extra, *graph)
        losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / mode / "metrics.jsonl")
                  if r["kind"] == "train"}
        after = {k.replace(".base_layer.", "."): v.detach().cpu() for k, v in policy.state_dict().items()
                 if ".lora_" not in k}
        runs[name] = (losses, _changed(base, after))
    (le, ce), (lg, cg) = runs["eager"], runs["graph"]
    assert le.keys() == lg.keys() and all(lg[s] == pytest.approx(le[s], rel=1e-3) for s in le)
    assert ce == cg  # the same base tensors changed (none outside the head for lora / head_only)
    if mode != "full":
        assert cg and all(k.startswith("head.") for k in cg)
