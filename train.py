"""Train or post-train a chunkpolicy policy: ``python train.py --config configs/tiny_flow.yaml [key=value ...] [--resume]``.

Same as ``chunkpolicy train ...``; runs under ``accelerate launch`` for several GPUs. See chunkpolicy/training/cli.py.
"""

import sys

from chunkpolicy.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
