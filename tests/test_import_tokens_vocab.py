"""The tokens head on a real PaliGemma vocabulary (257,152 ids: Gemma's 256,000, 1,024 <loc>, 128 <seg>) with a
tokenizer built offline with that size and special-token layout: action ids overwrite the top of the <loc> range,
prompts keep Gemma's <bos>, chunks round-trip, and the policy trains and decodes at tiny widths."""

import pytest
import torch

from chunkpolicy.models.heads.configs import TokensConfig
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.models.tokenizer import build_char_tokenizer
from helpers import toy_batch, toy_space, toy_stats

VOCAB, LOC0, SEG0 = 257152, 256000, 257024


@pytest.fixture(scope="module")
def paligemma_layout_tokenizer():
    """PaliGemma's id layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, text pieces (here single characters, then filler
    pieces) up to 255,999, <loc0000..1023> at 256,000, <seg000..127> at 257,024; <bos> prepended like Gemma's."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + chars
    pieces += [f"<unused{i}>" for i in range(LOC0 - len(pieces))]
    pieces += [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    assert len(pieces) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab={p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _policy(prompt_tokenizer, reserved="paligemma", **head):
    torch.manual_seed(0)
    cfg = PolicyConfig(backbone="tiny", backbone_overrides={"vocab_size": VOCAB}, horizon=4, action_norm="quantile",
                       head=TokensConfig(reserved=reserved, **head), max_prompt_tokens=32)
    return ChunkPolicy(cfg, toy_space(), toy_stats(), tokenizer=prompt_tokenizer)


def test_action_ids_overwrite_the_top_loc_ids_and_round_trip(paligemma_layout_tokenizer):
    tok = paligemma_layout_tokenizer
    policy = _policy(tok)
    head = policy.head
    assert (head.base, head.reserved_token_end) == (SEG0 - 258, SEG0)  # 256 bins + <act> + <end>, below <seg000>
    assert tok.convert_ids_to_tokens([head.base, head.act_id, head.end_id]) == ["<loc0766>", "<loc1022>", "<loc1023>"]
    batch = toy_batch(B=2, horizon=4)
    inp = policy.prepare_train_inputs(batch)
    assert (inp["input_ids"][:, 0] == 2).all()  # Gemma's <bos> first, from the tokenizer's own convention
    ids, _ = head._targets(inp)
    assert ((ids >= head.base) & (ids < SEG0)).all() and (ids[:, 0] == head.act_id).all()
    # decode(encode(x)) within half a bin
    for i in range(2):
        seq = [t - head.base for t in ids[i, 1:].tolist()]
        seq = seq[: seq.index(head.end_id - head.base)]
        dims = inp["action_mask"][i]
        chunk, ok = head.tokenizer.decode(seq, 4, int(dims.sum()))
        assert ok
        want = inp["actions"][i][:, dims].clamp(-1, 1).double()
        assert (torch.as_tensor(chunk) - want).abs().max() <= 1 / 256 + 1e-9


def test_reserved_layouts_are_checked_against_the_tokenizer(paligemma_layout_tokenizer):
    with pytest.raises(ValueError, match="overlap"):  # the tail of a full PaliGemma vocabulary is <seg> tokens
        _policy(paligemma_layout_tokenizer, reserved="tail")
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids"):  # not a PaliGemma tokenizer
        _policy(build_char_tokenizer())
    with pytest.raises(ValueError, match="<loc> ids"):
        _policy(paligemma_layout_tokenizer, tokenizer="mulaw")


def test_trains_and_decodes_on_the_real_vocabulary(paligemma_layout_tokenizer):
    policy = _policy(paligemma_layout_tokenizer)
    batch = toy_batch(B=2, horizon=4)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2, fused=True)
    losses = []
    for _ in range(18):
        out = policy.compute_loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.2 * losses[0]
    policy.eval()
    chunk = policy.predict_unified({k: batch[k] for k in ("images", "image_mask", "state", "prompt", "embodiment")})
    assert policy.head.last_valid.all()  # well-formed sequences of <loc> ids, decoded into chunks
    inp = policy.prepare_train_inputs(batch)
    got = policy.normalizer.normalize("action", chunk, inp["embodiment"])
    m = inp["action_mask"][:, None].expand_as(got)
    assert (got - inp["actions"].clamp(-1, 1))[m].abs().max() < 0.1
