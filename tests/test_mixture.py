import numpy as np
import pytest
import torch

from chunkpolicy.data.mixture import MixtureDataset, MixtureSampler
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.data.windows import ChunkWindowDataset
from chunkpolicy.spaces import UnifiedSpace

A = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist", "side"))
B = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return (
        make_synthetic_store(d / "a.zarr", A, n_episodes=2, episode_len=10, image_hw=(16, 16)),
        make_synthetic_store(d / "b.zarr", B, n_episodes=3, episode_len=[20, 10], image_hw=(24, 20), seed=1),
    )


def _mix(stores, weights=None, alpha=None):
    space = UnifiedSpace(32, "pad", embodiments=[A, B])
    ds = [ChunkWindowDataset(s, space, horizon=4, image_size=(16, 16)) for s in stores]
    return MixtureDataset(ds, weights=weights, alpha=alpha)


def test_mixture_collates_different_embodiments(stores):
    mix = _mix(stores)
    assert len(mix) == 20 + 50
    batch = torch.utils.data.default_collate([mix[0], mix[25], mix[69]])
    assert batch["images"].shape == (3, 3, 1, 3, 16, 16)
    assert batch["image_mask"].tolist() == [[True] * 3, [True, False, False], [True, False, False]]
    assert batch["embodiment"].tolist() == [0, 1, 1]
    assert batch["action_mask"].sum(1).tolist() == [7, 2, 2]
    assert torch.all(batch["actions"][1:, :, 2:] == 0)


@pytest.mark.parametrize("weights, alpha", [(None, None), ([3.0, 1.0], 0.0), ([1.0, 1.0], 0.43)])
def test_sampling_frequencies_match_weights(stores, weights, alpha):
    mix = _mix(stores, weights, alpha)
    sizes = np.array([20, 50], dtype=float)
    w = np.ones(2) if weights is None else np.array(weights)
    a = 1.0 if alpha is None else alpha
    expect = w * sizes**a / (w * sizes**a).sum()
    np.testing.assert_allclose(mix.probs, expect)
    n = 20000
    idx = np.fromiter(iter(MixtureSampler(mix, num_samples=n, seed=3)), dtype=np.int64)
    frac_b = np.mean(idx >= 20)
    # binomial standard error at n=20000 is < 0.0036; allow 4 sigma
    assert abs(frac_b - expect[1]) < 0.015, (frac_b, expect)
    # uniform within a dataset: every window of the small dataset is drawn
    assert set(idx[idx < 20].tolist()) == set(range(20))


def test_sampler_is_deterministic_and_resumable(stores):
    mix = _mix(stores)
    s1 = MixtureSampler(mix, num_samples=50, seed=7)
    e0, e1 = list(s1), list(s1)
    assert e0 != e1  # epochs differ
    s2 = MixtureSampler(mix, num_samples=50, seed=7)
    assert list(s2) == e0
    # resume 13 samples into epoch 1
    s3 = MixtureSampler(mix, num_samples=50, seed=7)
    s3.load_state_dict({"seed": 7, "epoch": 1, "position": 13, "num_samples": 50})
    assert len(s3) == 37 and list(s3) == e1[13:]
    with pytest.raises(KeyError, match="position"):
        s3.load_state_dict({"seed": 1, "epoch": 0})


def test_mixture_errors(stores):
    space = UnifiedSpace(32, "pad", embodiments=[A, B])
    a = ChunkWindowDataset(stores[0], space, horizon=4)
    b = ChunkWindowDataset(stores[1], space, horizon=4)
    with pytest.raises(ValueError, match="image_size"):
        MixtureDataset([a, b])
    with pytest.raises(ValueError, match="horizon"):
        MixtureDataset([a, ChunkWindowDataset(stores[0], space, horizon=5)])
    with pytest.raises(ValueError, match="weights"):
        MixtureDataset([a], weights=[-1.0])
