"""chunkpolicy: flow-matching / diffusion action-chunking robot policies."""

__version__ = "0.1.0"
