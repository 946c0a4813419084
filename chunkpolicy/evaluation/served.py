"""Closed-loop evaluation through a policy server: ``chunkpolicy eval --server ws://HOST:PORT ...``.

:func:`inspect_server` checks, before any rollout, that the server's policy fits the env (embodiment, names, cameras,
image size, executor); :func:`served_predict_fn` is :func:`chunkpolicy.evaluation.rollout.policy_predict_fn` with the
policy behind the server. Each chunk's initial noise is drawn here exactly as the in-process policy draws it
(``torch.randn(B, H, D)`` from a CPU generator seeded with the batch's first episode seed) and sent with the request,
so a served rollout reproduces the in-process one on the same seeds. (This module imports torch: it is the evaluation
side; a robot needs only :mod:`chunkpolicy.serving.client`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from chunkpolicy.serving.client import PolicyClient


@dataclass(frozen=True)
class ServerInfo:
    uri: str
    embodiment: str
    horizon: int
    image_size: tuple[int, int]
    cameras: tuple[str, ...]
    rtc: bool
    may_fail: bool


def _api_key() -> str | None:
    return os.environ.get("CHUNKPOLICY_API_KEY") or None


def inspect_server(uri: str, env: str, env_kwargs: dict[str, Any]) -> ServerInfo:
    """What the server serves for ``env``'s embodiment; a ``ValueError`` naming what does not fit."""
    from chunkpolicy.sim.base import env_spec

    probe = env_spec(env, **{k: v for k, v in env_kwargs.items() if k == "cameras"})
    try:
        client = PolicyClient(uri, _api_key(), connect_timeout=10.0, embodiment=None)
    except ConnectionError as e:
        raise ValueError(f"server: {e}") from None
    try:
        embs = client.metadata["embodiments"]
        if probe.name not in embs:
            raise ValueError(f"embodiment: env {env!r} is embodiment {probe.name!r}, but the server at {uri} serves "
                             f"{list(embs)}")
        e = embs[probe.name]
        schema = e["schema"]
        for field, have in (("action_names", e["action_names"]), ("state_names", schema["state_names"])):
            if list(have) != list(getattr(probe, field)):
                raise ValueError(f"embodiment {probe.name!r}: {field} differ between the server {list(have)} and env "
                                 f"{env!r} {list(getattr(probe, field))}")
        cams = tuple(schema["cameras"])
        if "cameras" in env_kwargs and tuple(env_kwargs["cameras"]) != cams:
            raise ValueError(f"cameras: the server's policy takes {list(cams)}, asked for {list(env_kwargs['cameras'])}")
        hw = tuple(int(x) for x in schema["image_size"])
        if env_kwargs.get("image_size") is not None and tuple(env_kwargs["image_size"]) != hw:
            h, w = env_kwargs["image_size"]
            raise ValueError(f"image_size: env {env!r} would render {h}x{w} frames, but the served policy was trained on "
                             f"{hw[0]}x{hw[1]} images; leave --image-size out to use the server's")
        return ServerInfo(client.uri, probe.name, int(client.metadata["action_horizon"]), hw, cams,
                          bool(client.metadata["rtc"]), bool(client.metadata.get("may_fail")))
    finally:
        client.close()


def served_predict_fn(uri: str, spec: Any, prompts: Sequence[str], *, seed: int = 0, rtc: bool = False,
                      on_chunk: Callable[[np.ndarray], None] | None = None,
                      ) -> tuple[Callable[..., np.ndarray], Callable[[int, list], None], PolicyClient]:
    """``(predict_fn, on_step, client)``: like :func:`~chunkpolicy.evaluation.rollout.policy_predict_fn` (the same
    observation history, invalid-chunk handling and noise stream), one request per env; close ``client`` after."""
    import torch

    from chunkpolicy.evaluation.predictors import observation_history, replace_invalid

    client = PolicyClient(uri, _api_key(), embodiment=spec.name)
    if list(client.schema.cameras) != list(spec.cameras):
        client.close()
        raise ValueError(f"cameras: the server's {spec.name!r} takes cameras {list(client.schema.cameras)}, the env "
                         f"renders {list(spec.cameras)}")
    T, H, D = int(client.metadata["n_obs_steps"]), client.horizon, client.unified_dim
    history, on_step = observation_history(T)
    gen = torch.Generator().manual_seed(int(seed))
    may_fail = bool(client.metadata.get("may_fail"))

    def predict(obs: list, prefix: Any = None, prefix_len: int = 0) -> np.ndarray:
        if not history:  # called without on_step: single-frame history
            on_step(0, obs)
        if prefix is not None and not rtc:
            raise ValueError("rtc: the executor sent a prefix but this run is not real-time chunking")
        noise = torch.randn(len(obs), H, D, generator=gen).numpy()  # as ChunkPolicy.predict_unified draws it
        chunks, valid = [], []
        for b in range(len(obs)):
            frames = [h[b] for h in history]
            images = {c: np.stack([f["images"][c] for f in frames]) if T > 1 else frames[-1]["images"][c]
                      for c in spec.cameras}
            state = np.stack([f["state"] for f in frames]) if T > 1 else frames[-1]["state"]
            r = client.request({"images": images, "state": state}, prompts[b], noise=noise[b],
                               prefix=None if prefix is None else np.asarray(prefix)[b], prefix_len=prefix_len)
            chunks.append(r.actions)
            valid.append(r.valid)
        chunk = np.stack(chunks)
        if not may_fail:
            return chunk
        return replace_invalid(torch.from_numpy(chunk), torch.tensor(valid), obs, spec, on_chunk).numpy()

    return predict, on_step, client
