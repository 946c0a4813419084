"""collate_windows: the same values as default_collate, every tensor of a batch a view of one block (one
shared-memory segment inside a DataLoader worker), clear errors for samples that do not stack."""

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from chunkpolicy.data.collate import collate_windows
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.data.windows import ChunkWindowDataset
from chunkpolicy.spaces import UnifiedSpace


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    spec = make_spec("arm", action_dim=7, state_dim=8, cameras=("top", "wrist"))
    store = make_synthetic_store(tmp_path_factory.mktemp("c") / "s.zarr", spec, n_episodes=2, episode_len=9, image_hw=(12, 10), seed=0)
    return ChunkWindowDataset(store.path, UnifiedSpace(32, "pad", embodiments=[spec]), horizon=5, n_obs_steps=2, delta_actions=True)


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        if isinstance(b[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_values_equal_default_collate_and_share_one_block(windows):
    samples = [windows[i] for i in (0, 3, 8, 17)]
    got, want = collate_windows(samples), default_collate(samples)
    _assert_same(got, want)
    assert isinstance(got["prompt"], list) and len(got["prompt"]) == 4
    tensors = [v for v in got.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 9 and len({t.untyped_storage().data_ptr() for t in tensors}) == 1


def test_worker_batches_arrive_intact(windows):
    idx = [[0, 1, 2], [5, 9, 16]]
    loader = DataLoader(windows, batch_sampler=idx, num_workers=1, collate_fn=collate_windows, multiprocessing_context="spawn")
    for ids, batch in zip(idx, loader):
        _assert_same(batch, default_collate([windows[i] for i in ids]))


def test_samples_that_do_not_stack_name_the_key(windows):
    a, b = windows[0], dict(windows[1])
    b["images"] = b["images"][:1]
    with pytest.raises(ValueError, match=r"images: sample 1 is \(1, 2, 3, 12, 10\)"):
        collate_windows([a, b])
    c = {k: v for k, v in windows[2].items() if k != "delta_mask"}
    with pytest.raises(ValueError, match="sample 1 has keys"):
        collate_windows([a, c])
    with pytest.raises(ValueError, match="empty"):
        collate_windows([])
