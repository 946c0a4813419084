"""How much of each action tokenizer's vocabulary real, normalized actions reach, and its round-trip error.

Reads every action frame of an episode store, normalizes it the way the policy does (``Normalizer``, quantile mode by
default), tokenizes each frame with the bins / μ-law tokenizers (and μ-law with Gato's original ``log(1 + Mμ)``
denominator, M = 256, for comparison) and reports the share of bins hit and the mean / max round-trip error in
normalized units (values clipped to [-1, 1] first, as the tokenizers do).

    python benchmarks/tokenizer_coverage.py STORE.zarr [--norm quantile] [--out coverage.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.models.action_tokenizers import BinTokenizer, MuLawTokenizer
from chunkpolicy.normalize import Normalizer
from chunkpolicy.spaces import UnifiedSpace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--norm", default="quantile", choices=["quantile", "min_max"])
    p.add_argument("--out")
    a = p.parse_args(argv)
    store = EpisodeStore.open(a.store)
    spec = store.spec
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    norm = Normalizer(space, {spec.name: store.stats}, {"action": a.norm, "state": "mean_std"})
    raw = store.read("action", 0, store.num_frames)
    x = space.pad(torch.from_numpy(raw).float()[None], 0, "action")
    y = norm.normalize("action", x, torch.zeros(1, dtype=torch.long))[0].numpy()[:, : spec.action_dim].astype(np.float64)
    clipped = np.clip(y, -1, 1)
    rows = []
    for label, tok in (("bins (256)", BinTokenizer()), ("mu-law (1024), log(1+mu)", MuLawTokenizer()),
                       ("mu-law (1024), Gato log(1+M*mu), M=256", MuLawTokenizer(m=256.0))):
        ids = np.asarray(tok.encode(y)).reshape(y.shape)
        back, ok = tok.decode(ids.reshape(-1).tolist(), y.shape[0], y.shape[1])
        assert ok
        err = np.abs(back - clipped)
        rows.append({"tokenizer": label, "vocab": tok.vocab_size, "bins_hit": int(np.unique(ids).size),
                     "bins_hit_share": round(np.unique(ids).size / tok.vocab_size, 4),
                     "mean_abs_err": float(err.mean()), "max_abs_err": float(err.max())})
    res = {"store": a.store, "frames": int(y.shape[0]), "dims": int(y.shape[1]), "norm": a.norm,
           "outside_unit_range": float((np.abs(y) > 1).mean()), "rows": rows}
    print(f"{a.store}: {y.shape[0]} frames x {y.shape[1]} dims, {a.norm}; {res['outside_unit_range']:.2%} of values outside [-1, 1]")
    print("| tokenizer | bins hit | share | mean abs err | max abs err |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['bins_hit']} / {r['vocab']} | {r['bins_hit_share']:.1%} | {r['mean_abs_err']:.5f} | {r['max_abs_err']:.5f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
