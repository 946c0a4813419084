"""Evaluate a chunkpolicy checkpoint in simulation: ``python eval.py --checkpoint DIR --env metaworld --tasks push-v3``.

Same as ``chunkpolicy eval ...``; see chunkpolicy/evaluation/cli.py for the options and what it writes.
"""

import sys

from chunkpolicy.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
