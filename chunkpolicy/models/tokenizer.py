"""Prompt tokenizers: a real one from a local directory, or a character-level one built offline.

Never touches the hub: :func:`load_tokenizer` takes a local directory (``AutoTokenizer.from_pretrained(dir)``, e.g. a
PaliGemma tokenizer the user downloaded) and never runs custom code shipped with a tokenizer (refused, no prompt).
:func:`build_char_tokenizer` makes a deterministic character tokenizer with the ``tokenizers`` library for tests, the
quickstart and small models trained from scratch; it is saved with the checkpoint like any other tokenizer.

Special tokens follow the tokenizer's own convention (its post-processor / ``add_bos_token``): a Gemma / PaliGemma
tokenizer puts ``<bos>`` first, as π0 does; the character tokenizer adds nothing. A prompt longer than
``max_prompt_tokens`` (special tokens included) is an error, never cut: truncation made different tasks identical
(``stick-push`` / ``stick-pull`` at 32 tokens). :func:`check_prompts` runs the same check up front.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII (+ 4 specials): ~104 ids, identical on every machine."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def load_tokenizer(path: str | os.PathLike):
    """Tokenizer from a local directory (no network), never running code shipped with it.

    A tokenizer that needs custom code (an ``auto_map`` in its ``tokenizer_config.json`` or ``config.json``) is
    refused with a ``ValueError`` naming the directory: loading it would execute Python from the checkpoint (and
    ``transformers`` would ask an interactive y/N question). ``trust_remote_code=False`` is passed explicitly."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (tokenizers load from local directories only)")
    for name in ("tokenizer_config.json", "config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text())
        except (ValueError, OSError) as e:
            raise ValueError(f"{f}: unreadable JSON ({e})") from None
        amap = doc.get("auto_map") if isinstance(doc, dict) else None
        if amap:
            raise ValueError(f"tokenizer directory {path}: {name} has an auto_map {amap!r}, i.e. the tokenizer needs custom "
                             "code shipped with it; chunkpolicy never runs such code (no trust_remote_code). Save a "
                             "standard transformers tokenizer (e.g. PreTrainedTokenizerFast) into that directory instead")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ValueError(f"tokenizer directory {path}: needs custom code, which chunkpolicy never runs ({e})") from None
        raise


def _encode(tokenizer, prompts, max_length: int, raw: bool = False) -> dict[str, list[list[int]]]:
    """π0-style ``prompt + "\\n"`` (``raw``: the prompt as given, e.g. π0.5's ``"Task: ..., State: ...;\\nAction: "``)
    with the tokenizer's own special tokens, right-padded to ``max_length`` (lists); a prompt longer than
    ``max_length`` tokens raises, naming it."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt: expected a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    enc = tokenizer([p if raw else p.strip() + "\n" for p in prompts], padding="max_length", padding_side="right",
                    truncation=False, max_length=max_length, add_special_tokens=True)
    long = [(len(x), p) for x, p in zip(enc["input_ids"], prompts) if len(x) > max_length]
    if long:
        n, p = max(long)
        raise ValueError(f"prompt {p!r} is {n} tokens (special tokens included), over the limit of {max_length} "
                         f"({len(long)} of {len(prompts)} prompts too long): raise model.max_prompt_tokens to {n}")
    return enc


def check_prompts(tokenizer, prompts, max_length: int) -> int:
    """Raise (naming the prompt, its token count and the limit) if any prompt would not fit in ``max_length`` tokens,
    as :func:`tokenize_prompts` would; return the longest prompt's token count (special tokens included). Call it
    before training or evaluation so a run fails before its first step."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got one str")
    prompts = list(dict.fromkeys(prompts))  # unique, order kept
    if not prompts:
        return 0
    return max(sum(m) for m in _encode(tokenizer, prompts, max_length)["attention_mask"])


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, device=None,
                     raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """π0-style ``prompt + "\\n"`` with the tokenizer's special tokens (BOS first for Gemma), right-padded to
    ``max_length`` → ``input_ids [B, L]``, ``attention_mask [B, L]``. A prompt longer than ``max_length`` raises.
    ``raw``: prompts are tokenized as given (no strip, no newline)."""
    enc = _encode(tokenizer, prompts, max_length, raw)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return ids.to(device), torch.tensor(enc["attention_mask"], dtype=torch.bool).to(device)
