"""Prompt tokenization: never truncated, the tokenizer's own special tokens (BOS for Gemma), every MT50 prompt fits."""

from pathlib import Path

import pytest
import torch
import yaml

from chunkpolicy.config import load_config
from chunkpolicy.models.policy import PolicyConfig
from chunkpolicy.models.tokenizer import build_char_tokenizer, check_prompts, tokenize_prompts
from chunkpolicy.sim.metaworld_env import PROMPTS

REPO = Path(__file__).resolve().parents[1]
MT50 = list(PROMPTS.values())


def test_long_prompt_is_an_error_not_truncated():
    tok = build_char_tokenizer()
    a, b = PROMPTS["stick-push-v3"], PROMPTS["stick-pull-v3"]  # identical in their first 32 characters
    assert a[:32] == b[:32] and a != b
    n = len(a) + 1  # characters + "\n"
    for fn in (tokenize_prompts, check_prompts):
        with pytest.raises(ValueError, match=rf"{a!r} is {n} tokens.*limit of 32.*raise model.max_prompt_tokens to {n}"):
            fn(tok, [a, "push"], 32)
    assert check_prompts(tok, [a, b, "push"], n) == n
    ids, am = tokenize_prompts(tok, [a, b], n)
    assert ids.shape == (2, n) and am.all() and not torch.equal(ids[0], ids[1])


def test_char_tokenizer_ids_unchanged():
    """The character tokenizer adds no special tokens: the same ids as before (old checkpoints behave the same)."""
    tok = build_char_tokenizer()
    ids, am = tokenize_prompts(tok, ["push", " pick it "], 8)
    char = lambda c: tok.convert_tokens_to_ids(c)  # noqa: E731
    pad = tok.pad_token_id
    assert ids[0].tolist() == [char(c) for c in "push\n"] + [pad] * 3
    assert ids[1].tolist() == [char(c) for c in "pick it\n"]
    assert am.sum(1).tolist() == [5, 8] and am.dtype == torch.bool
    ref = tok(["push\n", "pick it\n"], padding="max_length", truncation=True, max_length=8, return_tensors="pt",
              add_special_tokens=False)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(am, ref["attention_mask"].bool())


def _gemma_tokenizer(tmp_path):
    """A Gemma tokenizer (BPE, byte fallback, ``add_bos_token`` as in PaliGemma's tokenizer_config.json) over a tiny
    vocabulary, built offline, saved and loaded back the way a user's local tokenizer directory is."""
    from transformers import GemmaTokenizerFast

    from chunkpolicy.models.tokenizer import load_tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = sorted(set("".join(MT50).replace(" ", "▁")) | {"▁", "\n"})
    vocab = {t: i for i, t in enumerate(specials + chars)}
    GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(tmp_path / "gemma_tok")
    return load_tokenizer(tmp_path / "gemma_tok")


def test_gemma_tokenizer_gets_bos_and_the_length_check_counts_it(tmp_path):
    tok = _gemma_tokenizer(tmp_path)
    assert tok.bos_token_id == 2
    prompt = "push the puck"
    ids, am = tokenize_prompts(tok, [prompt, "reach"], 20)
    assert ids[:, 0].tolist() == [tok.bos_token_id] * 2  # BOS first, as π0 tokenizes for PaliGemma
    n = int(am[0].sum())
    assert n == len(prompt) + 2  # BOS + one id per character + "\n"
    assert ids[0, 1:n].tolist() == tok.convert_tokens_to_ids(list(prompt.replace(" ", "▁")) + ["\n"])
    assert not am[0, n:].any() and (ids[0, n:] == tok.pad_token_id).all()  # right-padded
    assert check_prompts(tok, [prompt], n) == n
    with pytest.raises(ValueError, match=rf"is {n} tokens.*raise model.max_prompt_tokens to {n}"):
        check_prompts(tok, [prompt], n - 1)  # fits without the BOS, not with it


def _shipped_max_prompt_tokens():
    out = {"PolicyConfig default": PolicyConfig().max_prompt_tokens}
    for p in sorted((REPO / "configs").glob("*.yaml")):
        out[p.name] = load_config(p, check_paths=False).model.max_prompt_tokens
    for p in sorted((REPO / "configs" / "model").glob("*.yaml")):  # model section files
        out[f"model/{p.name}"] = yaml.safe_load(p.read_text()).get("max_prompt_tokens", PolicyConfig().max_prompt_tokens)
    return out


def test_every_mt50_prompt_fits_every_shipped_config():
    tok = build_char_tokenizer()
    assert len(MT50) == 50
    longest = check_prompts(tok, MT50, 10_000)
    assert longest == max(len(p) for p in MT50) + 1 == 62  # "bin-picking-v3" + "\n"
    shipped = _shipped_max_prompt_tokens()
    assert len(shipped) >= 6
    for name, n in shipped.items():
        assert n >= longest, f"{name}: max_prompt_tokens {n} < longest MT50 prompt ({longest} tokens)"
        check_prompts(tok, MT50, n)
    # at the limit every MT50 prompt is distinct (truncation used to merge stick-push/stick-pull, pick-place/-wall)
    ids, _ = tokenize_prompts(tok, MT50, min(shipped.values()))
    assert len({tuple(r.tolist()) for r in ids}) == 50


def test_training_fails_before_step_1_on_a_too_long_task_prompt(tmp_path):
    from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
    from chunkpolicy.training.experiment import prepare

    long = PROMPTS["pick-place-wall-v3"]  # identical to pick-place-v3's prompt in its first 24 characters
    store = make_synthetic_store(tmp_path / "s.zarr", make_spec("arm", action_dim=2, state_dim=2, cameras=("top",)),
                                 n_episodes=2, episode_len=6, image_hw=(16, 16), tasks=("push", long))
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({"model": {"backbone": "tiny", "horizon": 2, "max_prompt_tokens": 24},
                                 "data": {"datasets": [{"path": str(store.path)}], "val_fraction": 0.0},
                                 "train": {"output_dir": str(tmp_path / "run"), "progress": False}}))
    n = len(long) + 1
    with pytest.raises(ValueError, match=rf"{long!r} is {n} tokens.*raise model.max_prompt_tokens to {n}"):
        prepare(load_config(p), log=lambda *_: None)
    prepare(load_config(p, [f"model.max_prompt_tokens={n}"]), log=lambda *_: None)  # fits: builds
