"""Small builders shared by model tests (not a test module)."""

from __future__ import annotations

import numpy as np
import torch

from chunkpolicy.models.heads.configs import HeadConfig
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

SPEC = EmbodimentSpec("toy", ("x", "y", "gripper"), ("x", "y"), ("top", "wrist"), 10.0, gripper_dims=("gripper",))


def toy_space() -> UnifiedSpace:
    return UnifiedSpace(32, "pad", embodiments=[SPEC])


def toy_stats(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"toy": {"action": compute_stats(rng.normal(size=(200, 3))), "state": compute_stats(rng.normal(size=(200, 2)))}}


def toy_policy(head: str | HeadConfig = "flow_expert", horizon: int = 6, seed: int = 0, **cfg) -> ChunkPolicy:
    """A tiny policy over :func:`toy_space`; ``head``: a head name (its defaults) or a typed config (``DiTConfig(depth=1)``)."""
    torch.manual_seed(seed)
    return ChunkPolicy(PolicyConfig(backbone="tiny", head=head, horizon=horizon, **cfg), toy_space(), toy_stats())


def toy_batch(B: int = 3, horizon: int = 6, seed: int = 0, n_cam: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    space = toy_space()
    return {
        "images": torch.rand(B, n_cam, 1, 3, 40, 32, generator=g),
        "image_mask": torch.ones(B, n_cam, dtype=torch.bool),
        "state": space.pad(torch.randn(B, 1, 2, generator=g), "toy", "state"),
        "prompt": ["pick up the red cube", "push", "open the drawer slowly"][:B] + ["x"] * max(0, B - 3),
        "embodiment": torch.zeros(B, dtype=torch.long),
        "actions": space.pad(torch.randn(B, horizon, 3, generator=g), "toy", "action"),
        "action_mask": torch.from_numpy(space.mask("toy", "action"))[None].repeat(B, 1),
        "action_is_pad": torch.zeros(B, horizon, dtype=torch.bool),
    }


def two_embodiment_stores(d) -> tuple[str, str]:
    """Two tiny stores in ``d`` with different embodiments: 7-D arm with 2 cameras, 2-D gripper with 1 camera."""
    from chunkpolicy.data.synthetic import make_spec, make_synthetic_store

    arm = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist"))
    grip = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",), control_hz=5.0)
    a = make_synthetic_store(d / "arm7.zarr", arm, n_episodes=3, episode_len=12, image_hw=(24, 24), seed=0)
    b = make_synthetic_store(d / "gripper2.zarr", grip, n_episodes=3, episode_len=10, image_hw=(16, 20), seed=1)
    return str(a.path), str(b.path)
