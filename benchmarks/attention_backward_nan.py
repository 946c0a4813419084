"""Which SDPA backend makes non-finite gradients: replay saved training batches under each backend (issue 15).

Loads a training checkpoint's raw (not EMA) weights and the batches that the trainer's non-finite probe saved
(``RUN/nonfinite/step_*_batch.pt``), then for each backend runs forward + backward (bf16 autocast, as in training)
``--draws`` times per batch with different flow noise and counts the replays whose gradients hold a NaN or inf.
Variants: each backend alone (``cudnn`` can only be forced with grouped-query attention as is; ``efficient`` and
``flash`` need the key/value heads repeated, as :func:`chunkpolicy.models.attention.attend` does in training), and
``cudnn`` with the additive mask's -inf clamped to -1e6 (does the -inf mask matter?).

    python benchmarks/attention_backward_nan.py --checkpoint runs/long/seed0/checkpoints/step_030000 \\
        --batches 'runs/long/seed*/nonfinite/*_batch.pt' --out attention_backward_nan.json

A run that skipped no step (one trained after the fix) saved no batches: ``--from-run RUN --num-batches N`` draws N
fresh training batches from that run's data instead (its config.yaml; the space and stats of its latest checkpoint).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_batches(run: Path, n: int, seed: int) -> list[dict]:
    """``n`` training batches (the run's batch size) of windows drawn uniformly from the run's training split, built
    as its trainer builds them (config.yaml; space and stats of its latest checkpoint)."""
    from chunkpolicy.config import load_config
    from chunkpolicy.data.collate import collate_windows
    from chunkpolicy.training.experiment import prepare

    cfg = load_config(run / "config.yaml")
    data = prepare(cfg, resume=True, log=lambda _msg: None)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(data.train_set), (n, cfg.train.batch_size), generator=g)
    return [collate_windows([data.train_set[int(i)] for i in row]) for row in idx]


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from chunkpolicy.models.policy import ChunkPolicy
    from chunkpolicy.training.distributed import to_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints/step_XXXXXX dir of a training run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--batches", help="glob of *_batch.pt files saved by the non-finite probe")
    src.add_argument("--from-run", help="a training run dir: draw --num-batches fresh training batches from its data "
                                        "(config.yaml, the resumed space and stats) instead")
    p.add_argument("--num-batches", type=int, default=9, help="with --from-run")
    p.add_argument("--batch-seed", type=int, default=0, help="with --from-run: which windows are drawn")
    p.add_argument("--draws", type=int, default=4, help="noise draws per batch")
    p.add_argument("--out", default="attention_backward_nan.json")
    a = p.parse_args(argv)
    policy = ChunkPolicy.from_pretrained(a.checkpoint).cuda().train()
    policy.load_state_dict(load_file(f"{a.checkpoint}/training_state/trainable.safetensors"), strict=False)
    params = [q for q in policy.parameters() if q.requires_grad]
    if a.batches:
        files = sorted(glob.glob(a.batches))
        if not files:
            raise SystemExit(f"--batches: no file matches {a.batches!r}")
        batches = [to_device(torch.load(f)[0], torch.device("cuda")) for f in files]
    else:
        files = [f"{a.from_run}: {a.num_batches} batches, seed {a.batch_seed}"]
        batches = [to_device(b, torch.device("cuda")) for b in run_batches(Path(a.from_run), a.num_batches, a.batch_seed)]
    sdpa = F.scaled_dot_product_attention

    def finite_mask(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.clamp(min=-1e6)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def repeat_kv(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    variants = [("math", SDPBackend.MATH, sdpa), ("efficient (kv repeated)", SDPBackend.EFFICIENT_ATTENTION, repeat_kv),
                ("cudnn", SDPBackend.CUDNN_ATTENTION, sdpa), ("cudnn (kv repeated)", SDPBackend.CUDNN_ATTENTION, repeat_kv),
                ("cudnn (mask -inf -> -1e6)", SDPBackend.CUDNN_ATTENTION, finite_mask)]
    rows = []
    for name, backend, fn in variants:
        F.scaled_dot_product_attention = fn
        bad = n = 0
        try:
            for batch in batches:
                for s in range(a.draws):
                    torch.manual_seed(s)
                    with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = policy.compute_loss(batch)["loss"]
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    bad += int(not all(bool(torch.isfinite(g).all()) for g in grads if g is not None))
                    n += 1
            rows.append({"variant": name, "nonfinite_replays": bad, "replays": n})
        except RuntimeError as e:
            rows.append({"variant": name, "error": str(e).splitlines()[0]})
        finally:
            F.scaled_dot_product_attention = sdpa
        print(rows[-1], flush=True)
    Path(a.out).write_text(json.dumps({"meta": {"checkpoint": a.checkpoint, "batches": files, "draws": a.draws,
                                                "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                                "date": time.strftime("%Y-%m-%d")}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
