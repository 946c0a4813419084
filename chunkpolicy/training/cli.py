"""``chunkpolicy train`` / ``python train.py``: train or post-train a policy from a YAML experiment config.

    python train.py --config configs/tiny_flow.yaml [key=value ...] [--resume]
    accelerate launch --num_processes 2 train.py --config configs/small_flow.yaml train.batch_size=16

Overrides are dotted keys (``train.lr=1e-4``, ``data.datasets.0.path=/data/arm.zarr``,
``model.head=dit model.head.depth=2``: the head is typed by ``model.head.type``, ``model.head=NAME`` for short). Config
errors are reported before any work starts, as one line naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chunkpolicy.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"chunkpolicy train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from chunkpolicy.training.experiment import run

    try:
        run(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chunkpolicy train: error: {msg}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the non-finite guard gave up (summary.json and the last good checkpoint written)
        print(f"chunkpolicy train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
