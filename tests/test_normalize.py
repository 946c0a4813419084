import numpy as np
import pytest
import torch

from chunkpolicy.normalize import Normalizer, compute_stats, stats_from_json, stats_to_json
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

A = EmbodimentSpec("a", ("x", "y", "const"), ("s0", "s1"))
B = EmbodimentSpec("b", ("u",), ("s0",))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    act = np.concatenate([rng.normal(3.0, 2.0, (500, 2)), np.full((500, 1), 7.5)], axis=1)
    state = rng.uniform(-4, 9, (500, 2))
    return act, state


def test_stats_match_numpy():
    act, _ = _data()
    s = compute_stats(act)
    np.testing.assert_allclose(s["mean"], act.mean(0))
    np.testing.assert_allclose(s["std"], act.std(0))
    np.testing.assert_array_equal(s["min"], act.min(0))
    np.testing.assert_array_equal(s["max"], act.max(0))
    np.testing.assert_allclose(s["q01"], np.percentile(act, 1, axis=0))
    np.testing.assert_allclose(s["q99"], np.percentile(act, 99, axis=0))
    with pytest.raises(ValueError, match="actions: contains NaN"):
        compute_stats(np.array([[np.nan]]), field="actions")


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile"])
@pytest.mark.parametrize("layout", ["pad", "slots"])
def test_normalize_round_trip_padded_dims_zero(mode, layout):
    if layout == "slots":
        a = EmbodimentSpec("a", ("right_eef_pos_x", "right_eef_pos_y", "right_gripper"), ("base_vel_x", "base_vel_y"))
        b = EmbodimentSpec("b", ("base_vel_yaw",), ("base_vel_x",))
    else:
        a, b = A, B
    space = UnifiedSpace(32, layout, embodiments=[a, b])
    act, state = _data()
    stats = {"a": {"action": compute_stats(act), "state": compute_stats(state)}}
    stats = stats_from_json(stats_to_json(stats))  # goes through JSON like a checkpoint does
    norm = Normalizer(space, stats, {"action": mode, "state": mode})
    x = space.pad(torch.tensor(act[:8], dtype=torch.float32), "a", "action")[None].repeat(2, 1, 1)
    emb = torch.zeros(2, dtype=torch.long)
    y = norm.normalize("action", x, emb)
    valid = torch.from_numpy(space.mask("a", "action"))
    assert torch.all(y[..., ~valid] == 0)
    # the constant dim is degenerate: exactly 0 normalized, its constant back
    const = int(space.indices("a", "action")[2])
    assert torch.all(y[..., const] == 0)
    back = norm.unnormalize("action", y, emb)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    assert torch.all(back[..., ~valid] == 0)
    if mode in ("min_max",):
        full = norm.normalize("action", space.pad(torch.tensor(act, dtype=torch.float32), "a", "action")[None], emb[:1])
        assert full[..., valid].abs().max() <= 1 + 1e-6


def test_strict_errors():
    space = UnifiedSpace(32, "pad", embodiments=[A, B])
    act, state = _data()
    stats = {"a": {"action": compute_stats(act)}}
    norm = Normalizer(space, stats, {"action": "mean_std", "state": "mean_std"})
    x = torch.zeros(1, 32)
    with pytest.raises(KeyError, match="no 'state' stats for embodiment"):
        norm.normalize("state", x, torch.tensor([0]))
    with pytest.raises(KeyError, match=r"no 'action' stats for embodiment\(s\) \['b'\]"):
        norm.normalize("action", x, torch.tensor([1]))
    with pytest.raises(KeyError, match="no normalization mode for key 'images'"):
        norm.normalize("images", x, torch.tensor([0]))
    with pytest.raises(ValueError, match="expected last dim 32"):
        norm.normalize("action", torch.zeros(1, 8), torch.tensor([0]))
    bad = {"a": {"action": {k: v for k, v in compute_stats(act).items() if k != "q99"}}}
    with pytest.raises(KeyError, match="has no 'q99'"):
        Normalizer(space, bad, {"action": "quantile"})
    short = {"a": {"action": {k: v[:2] for k, v in compute_stats(act).items()}}}
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        Normalizer(space, short, {"action": "mean_std"})
    with pytest.raises(ValueError, match="mode"):
        Normalizer(space, stats, {"action": "zscore"})


def test_to_from_dict():
    space = UnifiedSpace(32, "pad", embodiments=[A])
    act, state = _data()
    norm = Normalizer(space, {"a": {"action": compute_stats(act), "state": compute_stats(state)}}, {"action": "quantile", "state": "mean_std"})
    again = Normalizer.from_dict(space, norm.to_dict())
    x = space.pad(torch.tensor(state[:4], dtype=torch.float32), "a", "state")
    assert torch.equal(again.normalize("state", x, torch.zeros(4, dtype=torch.long)), norm.normalize("state", x, torch.zeros(4, dtype=torch.long)))
