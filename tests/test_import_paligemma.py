"""Hub PaliGemma directories: configs as transformers 4.4x wrote them (default values left out, vocabulary 257,216)
load through transformers' own ``PaliGemmaConfig``; ``chunkpolicy model import --format paligemma`` keeps the weights
unchanged and the result post-trains (LoRA and full)."""

import json

import pytest
import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from chunkpolicy.cli import main as cli_main
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.backbone_config import BackboneConfig, backbone_config
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.models.tokenizer import build_char_tokenizer

# the shape of google/paligemma-3b-pt-224's config.json (written by transformers 4.41): image_size, head_dim,
# rope_theta, rms_norm_eps ... are left out; only the sizes are shrunk here
HUB_STYLE = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 64,
    "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 64, "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 2, "num_image_tokens": 256, "num_key_value_heads": 1, "torch_dtype": "float32",
                    "vocab_size": 257216},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "model_type": "siglip_vision_model",
                      "num_attention_heads": 4, "num_hidden_layers": 1, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 64, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
EXPECTED = BackboneConfig(image_size=224, patch_size=14, vision_width=32, vision_depth=1, vision_heads=4, vision_mlp=64,
                          width=64, depth=2, mlp=128, heads=8, kv_heads=1, head_dim=256, vocab_size=257216)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg") / "paligemma-hub"
    (d.parent / "cfg").mkdir()
    (d.parent / "cfg" / "config.json").write_text(json.dumps(HUB_STYLE))
    cfg = PaliGemmaConfig.from_pretrained(str(d.parent / "cfg"), local_files_only=True)
    torch.manual_seed(0)
    hf = PaliGemmaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(d)  # transformers' own weights layout
    (d / "config.json").write_text(json.dumps(HUB_STYLE, indent=2))  # and the hub's config.json, defaults left out
    build_char_tokenizer().save_pretrained(str(d))  # a hub snapshot carries its tokenizer
    return d, {k: v.detach().clone() for k, v in hf.model.state_dict().items()}


def test_hub_style_config_reads_with_transformers_defaults(hub_dir):
    d, _ = hub_dir
    assert "image_size" not in HUB_STYLE["vision_config"]  # the KeyError 'image_size' of the hand-written parser
    assert Backbone.config_from_pretrained(d) == EXPECTED


def test_non_paligemma_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama'"):
        Backbone.config_from_pretrained(tmp_path)
    bad = json.loads(json.dumps(HUB_STYLE))
    bad["projection_dim"] = bad["vision_config"]["projection_dim"] = 32  # PaliGemmaConfig uses the top-level one
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="projection_dim 32 != text_config.hidden_size 64"):
        Backbone.config_from_pretrained(tmp_path)


def test_vocab_mismatch_error_says_how_to_load(hub_dir):
    d, _ = hub_dir
    other = Backbone(backbone_config("paligemma-3b", **{k: getattr(EXPECTED, k) for k in (
        "vision_width", "vision_depth", "vision_heads", "vision_mlp", "width", "depth", "mlp", "head_dim")}))
    with pytest.raises(ValueError, match=r"vocab_size=257216.*--format paligemma"):
        other.load_pretrained_weights(d)


def test_import_keeps_weights_and_posttrains(hub_dir, tmp_path, capsys):
    d, ref = hub_dir
    out = tmp_path / "ck"
    assert cli_main(["model", "import", str(d), str(out), "--format", "paligemma"]) == 0
    assert "vocab_size': 257216" in capsys.readouterr().out
    policy = ChunkPolicy.from_pretrained(out)
    assert policy.config.backbone_overrides["vocab_size"] == 257216 and len(policy.space.embodiments) == 0
    own = policy.backbone.model.state_dict()
    assert set(own) == set(ref)
    assert all(torch.equal(own[k], ref[k]) for k in ref)  # bit-identical source weights
    assert cli_main(["model", "import", str(d), str(tmp_path / "x"), "--format", "paligemma", "--embodiment", "a"]) == 2

    from chunkpolicy.config import load_config
    from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
    from chunkpolicy.training.experiment import prepare
    from chunkpolicy.training.trainer import Trainer

    spec = make_spec("arm3", action_dim=3, state_dim=4, cameras=("top",))
    store = make_synthetic_store(tmp_path / "arm3.zarr", spec, n_episodes=2, episode_len=8, image_hw=(16, 16), seed=0)
    for mode in ("lora", "full"):
        cfg = load_config(None, [
            f"posttrain.init_from={out}", f"posttrain.mode={mode}", f"data.datasets=[{{path: {store.path}}}]",
            "data.image_size=[16, 16]", "data.val_fraction=0.0", "train.steps=1", "train.batch_size=2",
            "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=1", "train.progress=false",
            "model.horizon=50", f"train.output_dir={tmp_path / mode}", "posttrain.lora_rank=2",
        ])
        prep = prepare(cfg)
        summary = Trainer(prep.policy, prep.train_set, prep.val_set, cfg.train, export_fn=prep.export_fn).fit()
        ck = ChunkPolicy.from_pretrained(summary["checkpoint"])
        assert [s.name for s in ck.space.embodiments] == ["arm3"]
        emb = "backbone.model.language_model.embed_tokens.weight"
        assert torch.equal(ck.state_dict()[emb], ref["language_model.embed_tokens.weight"]) == (mode == "lora")


def test_paligemma_vision_onto_the_siglip_backbone(hub_dir):
    from chunkpolicy.models.heads.configs import DiTConfig
    from chunkpolicy.models.importers import import_checkpoint

    d, ref = hub_dir
    report, policy = import_checkpoint(d, None, "paligemma", variant="siglip", head=DiTConfig(depth=1, hidden=32),
                                       return_policy=True)
    assert policy.config.backbone == "siglip" and policy.backbone.num_layers == 0
    assert policy.backbone.model.language_model.embed_tokens.weight.shape[0] == 1280  # light text path
    own = policy.backbone.model.state_dict()
    for k, v in ref.items():
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(own[k], v), k
    assert any(k == "model.language_model.*" for k, _ in report.left_out)
