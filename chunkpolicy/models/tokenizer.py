"""Prompt tokenizers: a real one from a local directory, or a character-level one built offline.

Never touches the hub: :func:`load_tokenizer` takes a local directory (``AutoTokenizer.from_pretrained(dir)``, e.g. a
PaliGemma tokenizer the user downloaded). :func:`build_char_tokenizer` makes a deterministic character tokenizer with
the ``tokenizers`` library for tests, the quickstart and small models trained from scratch; it is saved with the
checkpoint like any other tokenizer.
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
    """Tokenizer from a local directory (no network)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (tokenizers load from local directories only)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """π0-style ``prompt + "\\n"``, right-padded/truncated to ``max_length`` → ``input_ids [B, L]``, ``attention_mask [B, L]``."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt: expected a list of strings, got {type(prompts).__name__}")
    enc = tokenizer([p.strip() + "\n" for p in prompts], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].bool().to(device)
