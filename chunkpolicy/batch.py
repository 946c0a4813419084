"""Batch schema key names shared by data, models, runtime and sim adapters (see CONTRIBUTING.md for shapes)."""

from __future__ import annotations

IMAGES = "images"  # uint8 [B, N, T_obs, 3, h, w] (or float32 in [0, 1])
IMAGE_MASK = "image_mask"  # bool [B, N]
STATE = "state"  # float32 [B, T_obs, D]
STATE_MASK = "state_mask"  # bool [B, D]
ACTIONS = "actions"  # float32 [B, H, D]
ACTION_MASK = "action_mask"  # bool [B, D]
ACTION_IS_PAD = "action_is_pad"  # bool [B, H]
PROMPT = "prompt"  # list[str]
EMBODIMENT = "embodiment"  # int64 [B]
CONTROL_HZ = "control_hz"  # float32 [B]

OBSERVATION_KEYS = (IMAGES, IMAGE_MASK, STATE, STATE_MASK, PROMPT, EMBODIMENT, CONTROL_HZ)
TRAINING_KEYS = OBSERVATION_KEYS + (ACTIONS, ACTION_MASK, ACTION_IS_PAD)
