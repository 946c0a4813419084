"""``--format siglip``: a transformers SigLIP checkpoint's vision tower on the ``siglip`` backbone, whose text path is
a light embedding (not Gemma's 257,152-row table)."""

import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from chunkpolicy.cli import main as cli_main
from chunkpolicy.models.backbone_config import backbone_config
from chunkpolicy.models.heads.configs import DiTConfig
from chunkpolicy.models.importers import import_checkpoint
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.spaces import UnifiedSpace
from helpers import SPEC, toy_batch, toy_stats

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)


def test_siglip_preset_text_path_is_light():
    cfg = backbone_config("siglip")
    assert cfg.variant == "siglip" and cfg.vocab_size == 1280 and cfg.vocab_size * cfg.width < 3e6


def test_vision_model_import_keeps_weights(tmp_path, capsys):
    torch.manual_seed(0)
    src = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()  # with SigLIP's attention-pooling head
    src.save_pretrained(tmp_path / "siglip")
    assert cli_main(["model", "import", str(tmp_path / "siglip"), str(tmp_path / "ck"), "--format", "siglip"]) == 0
    text = capsys.readouterr().out
    assert "attention-pooling head" in text
    policy = ChunkPolicy.from_pretrained(tmp_path / "ck")
    assert policy.config.backbone == "siglip" and policy.config.head.type == "dit"
    assert policy.backbone.model.language_model.embed_tokens.weight.shape[0] == 1280
    ours = policy.backbone.model.vision_tower.vision_model.state_dict()
    for k, v in src.vision_model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(ours[k], v), k
    pix = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(policy.backbone.model.vision_tower(pix).last_hidden_state,
                                   src(pix).last_hidden_state, rtol=0, atol=0)


def test_full_siglip_model_and_training_step(tmp_path):
    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        vocab_size=100), vision_config=VISION)
    SiglipModel(cfg).save_pretrained(tmp_path / "siglip")
    report, policy = import_checkpoint(tmp_path / "siglip", None, "siglip", head=DiTConfig(depth=1, hidden=32), horizon=6,
                                       return_policy=True)
    assert any(k == "text_model.*" for k, _ in report.left_out)
    # post-training registers a robot, as posttrain.init_from does (extend_space + stats)
    from chunkpolicy.training.finetune import rebase
    policy = rebase(policy, UnifiedSpace(32, "pad", embodiments=[SPEC]), toy_stats()).train()
    loss = policy.compute_loss(toy_batch())["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="model_type"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text('{"model_type": "clip"}')
        import_checkpoint(tmp_path / "bad", None, "siglip")
