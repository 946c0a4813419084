"""Training: accelerate trainer, checkpoints, EMA, AdamW + warmup/cosine, post-training modes (see trainer.py)."""
