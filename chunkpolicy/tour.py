"""``chunkpolicy tour``: a tour of the data path, end to end on CPU in about a minute.

It builds a two-embodiment synthetic dataset as zarr episode stores, computes exact normalization stats, exports one
store to LeRobotDataset v3 and imports it back, streams a weighted cross-embodiment mixture of chunk windows, trains a
tiny flow-matching policy on the mixture for a few hundred steps, saves / reloads it, and plots a predicted action
chunk against the demonstration. Its stores (``runs/tour/*.zarr``) are what ``configs/tiny_flow.yaml`` and friends
train on. The simulated main job (collect, train, evaluate) is ``chunkpolicy quickstart``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chunkpolicy tour", description=__doc__)
    p.add_argument("--out", default="runs/tour", help="run directory (replaced if it exists)")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=300)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    from chunkpolicy.data.commands import data_info
    from chunkpolicy.data.lerobot_io import export_lerobot, import_lerobot
    from chunkpolicy.data.mixture import MixtureDataset, MixtureSampler
    from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
    from chunkpolicy.data.windows import ChunkWindowDataset
    from chunkpolicy.spaces import UnifiedSpace

    console = Console()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()

    arm = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist"), control_hz=10)
    gripper = make_spec("gripper2", action_dim=2, state_dim=3, cameras=("front",), control_hz=5)
    console.rule("[bold]1. episode stores")
    stores = [
        make_synthetic_store(out / "arm7.zarr", arm, args.episodes, [40, 60], (96, 96), seed=0),
        make_synthetic_store(out / "gripper2.zarr", gripper, args.episodes * 2, [30, 50], (64, 64), seed=1),
    ]
    console.print(data_info(stores[0].path))

    console.rule("[bold]2. LeRobotDataset v3 round trip")
    root = export_lerobot(stores[1], out / "gripper2_lerobot", progress=True)
    back = import_lerobot(root, out / "gripper2_roundtrip.zarr", progress=True)
    exact = all(
        np.array_equal(stores[1].read_episode(i)["action"], back.read_episode(i)["action"])
        and np.array_equal(stores[1].read_episode(i)["images"]["front"], back.read_episode(i)["images"]["front"])
        for i in range(back.num_episodes)
    )
    console.print(f"exported to {root} and imported back: {back.num_episodes} episodes, bit-exact = {exact}")

    console.rule("[bold]3. cross-embodiment mixture of chunk windows")
    space = UnifiedSpace(32, "pad", embodiments=[arm, gripper])
    windows = [ChunkWindowDataset(s, space, horizon=16, n_obs_steps=2, image_size=(96, 96)) for s in stores]
    mix = MixtureDataset(windows, weights=[1.0, 1.0], alpha=0.43)
    sampler = MixtureSampler(mix, num_samples=args.batches * 16, seed=0)
    loader = torch.utils.data.DataLoader(mix, batch_size=16, sampler=sampler, num_workers=2)
    counts = np.zeros(2, dtype=np.int64)
    pad_steps = 0
    t = time.perf_counter()
    for batch in tqdm(loader, desc="batches", unit="batch"):
        counts += np.bincount(batch["embodiment"].numpy(), minlength=2)
        pad_steps += int(batch["action_is_pad"].sum())
    rate = counts.sum() / (time.perf_counter() - t)

    table = Table(title="quickstart summary")
    for col in ("embodiment", "episodes", "frames", "action dims", "cameras", "p(sample)", "drawn"):
        table.add_column(col)
    for i, s in enumerate(stores):
        table.add_row(s.spec.name, str(s.num_episodes), str(s.num_frames), str(s.spec.action_dim), str(len(s.cameras)),
                      f"{mix.probs[i]:.2f}", f"{counts[i] / counts.sum():.2f}")
    console.print(table)
    console.print(f"batch: images {tuple(batch['images'].shape)}, actions {tuple(batch['actions'].shape)}; "
                  f"{pad_steps} padded action steps flagged; {rate:.0f} samples/s with 2 workers")
    console.rule("[bold]4. train a tiny flow-matching policy on the mixture")
    from chunkpolicy.models.heads.configs import FlowExpertConfig
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig

    torch.manual_seed(0)
    stats = {s.spec.name: s.stats for s in stores}
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", head=FlowExpertConfig(), horizon=16), space, stats)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    train_loader = torch.utils.data.DataLoader(
        mix, batch_size=16, sampler=MixtureSampler(mix, num_samples=args.train_steps * 16, seed=1), num_workers=2)
    losses = []
    bar = tqdm(train_loader, desc="train", unit="step")
    for batch in bar:
        loss = policy.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    policy.save_pretrained(out / "policy")
    again = ChunkPolicy.from_pretrained(out / "policy").eval()
    sample = windows[0][len(windows[0]) // 3]
    obs = torch.utils.data.default_collate([sample])
    noise = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    pred = again.predict_chunk(obs, noise=noise)[0].numpy()
    same = bool(np.array_equal(pred, policy.eval().predict_chunk(obs, noise=noise)[0].numpy()))
    demo = space.unpad(sample["actions"].numpy(), 0, "action")
    png = _plot_chunk(pred, demo, arm.action_names, out / "chunk.png")
    console.print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps; checkpoint {out / 'policy'} "
                  f"(reloaded, identical predictions: {same}); plot {png}")
    console.print(f"[green]done in {time.perf_counter() - t0:.0f}s[/green]; outputs in {out}/")
    return 0


def _plot_chunk(pred: np.ndarray, demo: np.ndarray, names: tuple[str, ...], path: Path) -> Path:
    """Predicted vs demonstrated action chunk, one panel per action dim (robot units over chunk steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = pred.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), sharex=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(demo[:, i], "k-", lw=2, label="demonstration")
        ax.plot(pred[:, i], "C1--", lw=2, label="policy")
        ax.set_title(names[i], fontsize=9)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
