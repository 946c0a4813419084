"""``tokens``: the discrete autoregressive baseline on the same backbone.

An action chunk's valid dims are tokenized (:mod:`chunkpolicy.models.action_tokenizers`: bins, μ-law or FAST) and
mapped onto a reserved block of the backbone vocabulary, ``[action ids | <act> | <end>]``: by default its **last** ids
(``reserved="tail"``, for tokenizers that do not reach them), or on a real PaliGemma vocabulary the least-used ids, its
``<loc>`` tokens, which are overwritten as RT-2 / OpenVLA overwrite theirs (``reserved="paligemma"``, see
:class:`~chunkpolicy.models.heads.configs.TokensConfig`). The prompt keeps the tokenizer's own BOS convention. The backbone's own Gemma LM continues the cached prefix
with ``<act> t_1 … t_n <end>`` (causal among action tokens, full view of the prefix) and the tied LM head predicts the
next token; cross-entropy covers action tokens (and ``<end>``) only. Decoding is greedy and KV-cached, restricted to the
reserved ids. A sequence that cannot be decoded (wrong length, ids outside the tokenizer, ``<act>`` inside the chunk)
yields a chunk of NaN on its valid dims — never a made-up action — and is flagged per sample in ``last_valid``
(``last_invalid_count`` counts them); evaluation replaces such a chunk by the robot's do-nothing chunk and reports the
rate (:mod:`chunkpolicy.evaluation.rollout`).

Padded steps (``action_is_pad``): before tokenizing, they are overwritten with the last real action (a "hold"
continuation), so whatever values sit there change nothing; for bins/μ-law their tokens are also left out of the loss.
FAST mixes steps in the DCT, so it keeps the hold continuation's tokens in the loss.
"""

from __future__ import annotations

from typing import Any


import numpy as np
import torch
import torch.nn.functional as F

from chunkpolicy.models.action_tokenizers import FASTTokenizer, make_action_tokenizer, tokenizer_from_dict
from chunkpolicy.models.attention import attend, finish, qkv
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.prefix import PrefixOutput
from chunkpolicy.models.heads.base import ActionHead, HeadCapabilities, register_head
from chunkpolicy.models.heads.configs import TokensConfig

PALIGEMMA_LOC_END = 257024  # one past <loc1023>: PaliGemma's ids are Gemma's 256,000, 1,024 <loc>, 128 <seg>
PALIGEMMA_LOCS = 1024


@register_head("tokens")
class TokensHead(ActionHead):
    @classmethod
    def capabilities(cls, cfg: TokensConfig) -> HeadCapabilities:
        # tokenizers quantize [-1, 1]: only bounded normalizations map the data there
        return HeadCapabilities(needs_data_fit=cfg.tokenizer == "fast", may_fail=True, action_norms=("quantile", "min_max"))
    def __init__(self, cfg: TokensConfig, backbone: Backbone, horizon: int, action_dim: int) -> None:
        super().__init__(cfg, backbone, horizon, action_dim)
        if backbone.num_layers == 0:
            raise ValueError("the tokens head decodes with the backbone's Gemma LM; the 'siglip' variant has none")
        kw = {"vocab_size": cfg.fast_vocab, "scale": cfg.fast_scale} if cfg.tokenizer == "fast" else {}
        self.tokenizer = make_action_tokenizer(cfg.tokenizer, **kw)
        n = self.tokenizer.vocab_size + 2
        if cfg.reserved == "paligemma":
            if backbone.vocab_size < PALIGEMMA_LOC_END:
                raise ValueError(f"tokens reserved='paligemma' needs a PaliGemma vocabulary (>= {PALIGEMMA_LOC_END} ids), "
                                 f"the backbone has {backbone.vocab_size}")
            if n > PALIGEMMA_LOCS:
                raise ValueError(f"{cfg.tokenizer}: {n} reserved ids do not fit PaliGemma's {PALIGEMMA_LOCS} <loc> ids "
                                 "(reserved='paligemma'; use bins, or fast with fast_vocab <= 1022)")
            end = PALIGEMMA_LOC_END
            self.reserved_token_pattern = r"<loc\d{4}>"  # the policy checks its tokenizer has these tokens there
        else:
            if n >= backbone.vocab_size:
                raise ValueError(f"{cfg.tokenizer}: {n} reserved ids do not fit the backbone vocabulary of {backbone.vocab_size}")
            end = backbone.vocab_size
        self.base = self.reserved_token_base = end - n  # first reserved id; the block is [base, end)
        self.reserved_token_end = end
        self.act_id, self.end_id = self.base + self.tokenizer.vocab_size, self.base + self.tokenizer.vocab_size + 1
        self.last_invalid_count, self.last_valid = 0, None

    # -- checkpoint extras (the fitted FAST BPE is not a tensor) --------------------------------------------------
    def state_files(self) -> dict[str, str]:
        import json

        return {"action_tokenizer.json": json.dumps(self.tokenizer.to_dict())}

    def load_state_files(self, files: dict[str, str]) -> None:
        import json

        if "action_tokenizer.json" in files:
            self.tokenizer = tokenizer_from_dict(json.loads(files["action_tokenizer.json"]))

    def fit_to_data(self, chunks: list[np.ndarray]) -> None:
        """FAST only: train the BPE on normalized training chunks (each ``[H, d]`` of one sample's valid dims)."""
        if not isinstance(self.tokenizer, FASTTokenizer):
            raise NotImplementedError(f"the {self.cfg.tokenizer!r} tokenizer needs no fitting")
        self.tokenizer.fit(chunks)

    def is_fitted(self) -> bool:
        return not isinstance(self.tokenizer, FASTTokenizer) or self.tokenizer.fitted

    # -- sequences ------------------------------------------------------------------------------------------------
    def _targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences ``[B, 1 + n_max + 1]`` (``<act> … <end>`` then padding) and their loss mask."""
        a, amask, pad = batch["actions"], batch["action_mask"].bool(), batch["action_is_pad"].bool()
        seqs, weights = [], []
        per_step = not isinstance(self.tokenizer, FASTTokenizer)
        for i in range(a.shape[0]):
            dims = amask[i].nonzero().flatten()
            chunk = a[i][:, dims].detach().double().cpu().numpy()
            real = (~pad[i]).cpu().numpy()
            last = int(np.flatnonzero(real)[-1]) if real.any() else 0
            chunk[~real] = chunk[last]  # hold the last real action
            toks = [self.base + t for t in self.tokenizer.encode(chunk)]
            w = [1.0] * len(toks)
            if per_step:  # one token per (step, dim), time-major: drop padded steps from the loss
                w = np.repeat(real.astype(np.float64), len(dims)).tolist()
            seqs.append([self.act_id] + toks + [self.end_id])
            weights.append([0.0] + w + [1.0])  # weight of predicting token j (from position j-1)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.end_id, dtype=torch.long)
        wts = torch.zeros(len(seqs), L)
        for i, (s, w) in enumerate(zip(seqs, weights)):
            ids[i, : len(s)], wts[i, : len(w)] = torch.tensor(s), torch.tensor(w)
        return ids.to(a.device), wts.to(a.device)

    def _run(self, backbone: Backbone, prefix_out: PrefixOutput, ids: torch.Tensor, cache: list | None = None,
             start: int = 0) -> tuple[torch.Tensor, list]:
        """Gemma LM over action tokens ``ids [B, L]`` at sequence offset ``start``, attending to the prefix KV and
        causally to earlier action tokens (``cache``: their per-layer keys/values). Returns restricted logits
        ``[B, L, n_reserved]`` and the updated cache."""
        x = backbone.embed_tokens(ids).to(prefix_out.hidden.dtype)
        B, L = ids.shape
        pos = prefix_out.next_position[:, None] + start + torch.arange(L, device=ids.device)[None]
        cos, sin = backbone.rope(x, pos)
        S = start + L
        causal = torch.ones(L, S, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        mask = torch.cat([prefix_out.valid[:, None, :].expand(B, L, -1), causal[None].expand(B, L, S)], -1)[:, None]
        new_cache = []
        for li, layer in enumerate(backbone.layers):
            q, k, v = qkv(layer, x, cos, sin)
            if cache:
                k, v = torch.cat([cache[li][0], k], 2), torch.cat([cache[li][1], v], 2)
            new_cache.append((k, v))
            pk, pv = prefix_out.kv[li]
            x = finish(layer, x, attend(layer, q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), mask))
        # tied LM head restricted to the reserved rows: on a 257k vocabulary the full logits would be ~1000x the work
        rows = backbone.model.language_model.embed_tokens.weight[self.base : self.reserved_token_end]
        return backbone.model.language_model.norm(x) @ rows.T, new_cache

    # -- interface ------------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ids, w = self._targets(batch)
        logits, _ = self._run(backbone, prefix_out, ids[:, :-1])
        target = ids[:, 1:] - self.base
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
        w = w[:, 1:].reshape(-1)
        loss = (ce * w).sum() / w.sum().clamp_min(1.0)
        acc = ((logits.argmax(-1).reshape(-1) == target.reshape(-1)).float() * w).sum() / w.sum().clamp_min(1.0)
        return {"loss": loss, "token_accuracy": acc.detach()}

    @torch.no_grad()
    def generate(self, backbone: Backbone, prefix_out: PrefixOutput, max_new: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding after ``<act>`` until every sequence emitted ``<end>`` or ``max_new`` tokens:
        ``[B, ≤ max_new]`` reserved-relative ids."""
        B = prefix_out.hidden.shape[0]
        seq = torch.full((B, 1), self.act_id, dtype=torch.long, device=prefix_out.hidden.device)
        cache, out = None, []
        ended = torch.zeros(B, dtype=torch.bool, device=seq.device)
        for step in range(max_new):
            if step and bool(ended.all()):  # one host sync per token: autoregressive decoding needs it anyway
                break
            if use_cache:
                logits, cache = self._run(backbone, prefix_out, seq[:, -1:], cache, start=step)
            else:
                logits, _ = self._run(backbone, prefix_out, seq)
            nxt = logits[:, -1].argmax(-1)
            ended |= nxt == self.end_id - self.base
            out.append(nxt)
            seq = torch.cat([seq, (nxt + self.base)[:, None]], 1)
        return torch.stack(out, 1)

    def sample(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None, layers: Any = None,
               guidance: Any = None) -> torch.Tensor:
        if guidance is not None:
            raise ValueError("guidance needs a flow velocity; the tokens head decodes discrete tokens")
        amask = batch["action_mask"].bool()
        B, D = amask.shape
        dims = amask.sum(1)
        max_new = self.tokenizer.max_tokens(self.horizon, int(dims.max())) + 1  # + <end>
        toks = self.generate(backbone, prefix_out, max_new).cpu().numpy()
        V = self.tokenizer.vocab_size
        end = self.end_id - self.base  # <end> as a reserved-relative id (V + 1; V is <act>)
        # invalid samples stay NaN on their valid dims (invalid unified dims are 0 for every head)
        out = torch.where(amask[:, None, :], float("nan"), 0.0).to(prefix_out.hidden.dtype).expand(B, self.horizon, D).clone()
        valid = torch.zeros(B, dtype=torch.bool)
        for i in range(B):
            seq = toks[i].tolist()
            seq = seq[: seq.index(end)] if end in seq else seq  # no <end>: the length check decides
            if any(t >= V for t in seq):  # <act> generated inside the chunk
                continue
            chunk, ok = self.tokenizer.decode(seq, self.horizon, int(dims[i]))
            if ok:
                out[i][:, amask[i]] = torch.as_tensor(chunk, dtype=out.dtype, device=out.device)
                valid[i] = True
        self.last_valid, self.last_invalid_count = valid, int((~valid).sum())
        return out
