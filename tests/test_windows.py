import numpy as np
import pytest
import torch

from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.data.windows import ChunkWindowDataset, window_stats
from chunkpolicy.delta_actions import DeltaActions
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

SPEC = make_spec("arm", action_dim=4, state_dim=5, cameras=("top", "wrist"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("w") / "s.zarr", SPEC, n_episodes=3, episode_len=[7, 3, 9], image_hw=(16, 16))


def _space(layout="pad"):
    return UnifiedSpace(32, layout, embodiments=[SPEC])


def test_schema_and_edges(store):
    H, T = 5, 2
    ds = ChunkWindowDataset(store, _space(), horizon=H, n_obs_steps=T, n_cameras=3)
    assert len(ds) == 19
    x = ds[0]
    assert x["images"].shape == (3, T, 3, 16, 16) and x["images"].dtype == torch.uint8
    assert x["image_mask"].tolist() == [True, True, False] and torch.all(x["images"][2] == 0)
    assert x["state"].shape == (T, 32) and x["actions"].shape == (H, 32)
    assert x["action_mask"].sum() == 4 and x["state_mask"].sum() == 5
    assert x["prompt"] == store.episode_task(0) and int(x["embodiment"]) == 0 and float(x["control_hz"]) == 10.0
    ep0 = store.read_episode(0)
    # history clamped at the episode start: both frames are frame 0
    np.testing.assert_array_equal(x["state"][:, :5].numpy(), ep0["state"][[0, 0]])
    # padded unified dims are zero
    assert torch.all(x["actions"][:, 4:] == 0) and torch.all(x["state"][:, 5:] == 0)
    # action_is_pad exact at the end of every episode; padded steps repeat the last action
    for ep, (s, e) in enumerate([(0, 7), (7, 10), (10, 19)]):
        L = e - s
        ref = store.read_episode(ep)["action"]
        for t in range(L):
            w = ds[s + t]
            expect = [t + k >= L for k in range(H)]
            assert w["action_is_pad"].tolist() == expect, (ep, t)
            want = ref[np.minimum(t + np.arange(H), L - 1)]
            np.testing.assert_array_equal(w["actions"][:, :4].numpy(), want)
    # last frame of episode 2 has 4 padded steps; the 2-step history is [t-1, t]
    w = ds[18]
    np.testing.assert_array_equal(w["state"][:, :5].numpy(), store.read_episode(2)["state"][[7, 8]])
    img = store.read_episode(2)["images"]["wrist"][[7, 8]]
    assert torch.equal(w["images"][1], torch.from_numpy(img).permute(0, 3, 1, 2))


def test_slots_layout_masks(tmp_path):
    spec = EmbodimentSpec("slotbot", ("right_eef_pos_x", "right_eef_pos_y", "right_gripper"), ("right_eef_pos_x", "right_eef_pos_y"), ("top",), 5.0, gripper_dims=("right_gripper",))
    st = make_synthetic_store(tmp_path / "slot.zarr", spec, n_episodes=1, episode_len=4, image_hw=(8, 8))
    space = UnifiedSpace(32, "slots", embodiments=[spec])
    x = ChunkWindowDataset(st, space, horizon=2)[1]
    idx = space.indices("slotbot", "action")
    np.testing.assert_array_equal(x["actions"][:, idx].numpy(), st.read("action", 1, 3))
    assert x["action_mask"].nonzero().flatten().tolist() == sorted(idx.tolist())


def test_delta_actions_round_trip(store):
    ds = ChunkWindowDataset(store, _space(), horizon=4, delta_actions=True)
    x = ds[2]
    a_idx = np.arange(4)
    assert x["delta_mask"][:4].tolist() == [True, True, True, False]  # gripper stays absolute
    ep0 = store.read_episode(0)
    delta = x["actions"][:, :4].numpy()
    np.testing.assert_allclose(delta[:, 3], ep0["action"][2:6, 3])
    np.testing.assert_allclose(delta[:, :3], ep0["action"][2:6, :3] - ep0["state"][2, :3], rtol=1e-6)
    back = DeltaActions.for_spec(SPEC).to_absolute(delta, ep0["state"][2])
    np.testing.assert_allclose(back, ep0["action"][2:6][:, a_idx], rtol=1e-6, atol=1e-6)
    stats = window_stats(ds)
    assert stats["action"]["mean"].shape == (4,)


def test_window_stats_equal_store_stats_without_delta(store):
    ds = ChunkWindowDataset(store, _space(), horizon=4)
    ws = window_stats(ds)
    for k in ("mean", "std", "q01", "q99"):
        np.testing.assert_allclose(ws["action"][k], store.stats["action"][k])


def test_errors(store):
    with pytest.raises(KeyError, match="not registered in the unified space"):
        ChunkWindowDataset(store, UnifiedSpace(32, "pad"), horizon=4)
    with pytest.raises(KeyError, match=r"cameras \['side'\] not in the store"):
        ChunkWindowDataset(store, _space(), horizon=4, cameras=["side"])
    with pytest.raises(ValueError, match="n_cameras=1 < 2"):
        ChunkWindowDataset(store, _space(), horizon=4, n_cameras=1)


def test_resize_and_workers_match(store):
    ds = ChunkWindowDataset(store, _space(), horizon=3, n_obs_steps=2, image_size=(12, 10), episodes=[2, 0])
    assert len(ds) == 16 and ds[0]["images"].shape == (2, 2, 3, 12, 10)
    ref = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    got = list(loader)
    assert isinstance(got[0]["prompt"], list) and len(got[0]["prompt"]) == 5
    imgs = torch.cat([b["images"] for b in got])
    assert torch.equal(imgs, torch.stack([r["images"] for r in ref]))
    acts = torch.cat([b["actions"] for b in got])
    assert torch.equal(acts, torch.stack([r["actions"] for r in ref]))
