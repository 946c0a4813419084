"""chunkpolicy: flow-matching / diffusion action-chunking robot policies."""

import os as _os

# Before torch is first imported (its OpenMP runtime reads this once): waiting threads sleep instead of spinning. With
# more busy threads than cores — DataLoader / simulator workers, or two jobs on one machine — spinning made CPU training
# steps up to ~60x slower on a 2-core machine. An explicit OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
