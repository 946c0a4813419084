"""The policy side of serving: one request → a validated batch-schema observation; a group of them → one batch → replies.

:class:`PolicyService` holds the checkpoint's policy and the per-embodiment observation schemas it publishes in the
server metadata. :meth:`PolicyService.decode` checks one unpacked request (every field, shape, dtype and value; a
``ValueError`` names the first bad one) and turns it into a :class:`Request`: a batch-schema observation with B = 1
built by :func:`chunkpolicy.sim.base.obs_to_batch`, the conversion closed-loop evaluation uses, so a served chunk equals
the in-process chunk for the same observation and noise. :meth:`PolicyService.run` runs requests that can share a
forward pass (:attr:`Request.group`) as one batch through the library's one inference path (``predict_unified``, a
:class:`~chunkpolicy.runtime.graphs.CudaGraphPolicy` per batch size on a GPU, or real-time chunking guidance). The
network front end is :mod:`chunkpolicy.serving.server`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chunkpolicy.serving import protocol as P

# -- the torch side -----------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One validated request: a batch-schema observation with B = 1 (CPU tensors), its initial noise ``[1, H, D]``
    and, for real-time chunking, the previous chunk's remaining actions ``prefix [1, H', A]`` and the delay ``d``."""

    embodiment: str
    emb_id: int
    batch: dict[str, Any]
    noise: torch.Tensor
    prefix: np.ndarray | None = None
    prefix_len: int = 0
    prompt_key: str = "prompt"

    @property
    def group(self) -> tuple:
        """Requests with equal groups run as one batch."""
        n = None if self.prefix is None else self.prefix.shape[1]
        return (self.emb_id, n, self.prefix_len if n is not None else None)


def _field(m: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    for k in keys:
        if k in m:
            return k, m[k]
    return None


def _describe(v: Any) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, np.ndarray) else type(v).__name__


def resize_frames(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``[T, h, w, 3]`` → uint8 ``[T, H, W, 3]`` exactly as training resizes stored frames
    (:class:`chunkpolicy.data.windows.ChunkWindowDataset`: bilinear, antialiased, rounded)."""
    if frames.shape[1:3] == tuple(hw):
        return frames
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float()  # a copy: wire arrays are read-only
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class PolicyService:
    """A loaded policy with its observation schemas: validates requests and runs batches of them.

    ``key_map``: ``{camera | "state" | "prompt": wire key}`` for the default embodiment (see
    :meth:`ObservationSchema.with_keys`). ``cuda_graph``: replay chunks from CUDA graphs (one per embodiment, batch
    size and kind, captured on first use; a CUDA device only); ``compile``: ``torch.compile`` the graphs' functions.
    """

    def __init__(self, policy: Any, *, embodiment: str | None = None, key_map: Mapping[str, str] | None = None,
                 default_prompt: str | None = None, num_steps: int | None = None, rtc_beta: float = 5.0,
                 cuda_graph: bool = False, compile: bool = False, seed: int = 0) -> None:
        from chunkpolicy.models.tokenizer import check_prompts

        self.policy = policy.eval()
        self.space = policy.space
        self._check_prompts = check_prompts
        self._prompts_ok: dict[str, None] = {}  # prompts that fit: a control loop repeats one, tokenizing it each time costs
        names = [e.name for e in self.space.embodiments]
        if embodiment is not None and embodiment not in names:
            raise ValueError(f"embodiment: {embodiment!r} is not one of the checkpoint's embodiments {names}")
        self.default_embodiment = embodiment or (names[0] if len(names) == 1 else None)
        if key_map and self.default_embodiment is None:
            raise ValueError(f"key map: the checkpoint has several embodiments {names}; choose one with --embodiment")
        if default_prompt is not None:
            check_prompts(policy.tokenizer, [default_prompt], policy.config.max_prompt_tokens)
        hw = policy.trained_image_size
        self.schemas: dict[str, P.ObservationSchema] = {}
        for spec in self.space.embodiments:
            s = P.ObservationSchema.default(spec.name, list(spec.cameras), spec.state_names, spec.action_names, hw,
                                            policy.config.n_obs_steps, spec.control_hz, default_prompt)
            if key_map and spec.name == self.default_embodiment:
                s = s.with_keys(key_map)
            self.schemas[spec.name] = s
        self.H, self.D = int(policy.config.horizon), int(self.space.dim)
        self.num_steps = num_steps  # None: the head's own default, as in process
        self.rtc = bool(policy.head.caps.velocity)
        self.may_fail = bool(policy.head.caps.may_fail)
        self.rtc_beta = float(rtc_beta)
        dev = policy.device
        if cuda_graph and dev.type != "cuda":
            raise ValueError(f"cuda_graph: CUDA graphs need the policy on a CUDA device, it is on {dev}")
        if cuda_graph and not policy.head.caps.sync_free_sample:
            raise ValueError(f"cuda_graph: the {type(policy.head).__name__} head cannot be captured (sampling has host syncs)")
        if compile and not cuda_graph:
            raise ValueError("compile: compiles the functions a CUDA graph captures; it needs cuda_graph=True")
        self.cuda_graph, self.compile = bool(cuda_graph), bool(compile)
        self._graphs: dict[tuple, Any] = {}
        self._gen = torch.Generator().manual_seed(int(seed))  # noise for requests that bring neither noise nor seed

    # -- metadata -------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What a client needs to build requests and run chunks (msgpack-able; sent on connect)."""
        from chunkpolicy import __version__

        embs = {}
        for spec in self.space.embodiments:
            embs[spec.name] = {"schema": self.schemas[spec.name].to_dict(), "action_dim": spec.action_dim,
                               "action_names": list(spec.action_names), "state_dim": spec.state_dim,
                               "cameras": list(spec.cameras), "control_hz": float(spec.control_hz)}
        default = self.default_embodiment
        meta: dict[str, Any] = {
            "server": "chunkpolicy", "version": __version__, "protocol": P.PROTOCOL, "protocol_version": P.PROTOCOL_VERSION,
            "embodiment": default, "embodiments": embs, "schema": embs[default]["schema"] if default else None,
            "action_horizon": self.H, "unified_dim": self.D, "n_obs_steps": int(self.policy.config.n_obs_steps),
            "head": self.policy.config.head.type, "num_steps": self.num_steps, "rtc": self.rtc, "may_fail": self.may_fail,
            "device": str(self.policy.device), "cuda_graph": self.cuda_graph,
        }
        if default:
            meta["action_dim"] = embs[default]["action_dim"]
            meta["action_names"] = embs[default]["action_names"]
        return meta

    # -- requests -------------------------------------------------------------------------------------------------
    def decode(self, msg: Any) -> Request:
        """Validate one unpacked request; raises ``ValueError`` naming the first bad field."""
        if not isinstance(msg, Mapping):
            raise ValueError(f"request: expected a map of observation fields, got {type(msg).__name__}")
        m = P.flatten(msg)
        emb = m.get(P.EMBODIMENT, self.default_embodiment)
        if emb is None:
            raise ValueError(f"{P.EMBODIMENT}: missing; this server serves several embodiments {list(self.schemas)}")
        if not isinstance(emb, str) or emb not in self.schemas:
            raise ValueError(f"{P.EMBODIMENT}: expected one of {list(self.schemas)}, got {emb!r}")
        schema, e = self.schemas[emb], self.space.id_of(emb)
        spec = self.space.spec(e)
        T = schema.n_obs_steps

        frames: dict[str, np.ndarray] = {}
        for cam, keys in schema.cameras.items():
            hit = _field(m, keys)
            if hit is None:
                raise ValueError(f"{keys[0]}: missing (camera {cam!r} of {emb!r}; accepted keys {keys})")
            k, v = hit
            want = "uint8 [h, w, 3] (HWC)" if T == 1 else f"uint8 [{T}, h, w, 3] (T_obs frames, oldest first, HWC)"
            if not isinstance(v, np.ndarray) or v.dtype != np.uint8:
                raise ValueError(f"{k}: expected a numpy {want}, got {_describe(v)}")
            f = v[None] if v.ndim == 3 and T == 1 else v
            if f.ndim != 4 or f.shape[0] != T or f.shape[3] != 3 or min(f.shape[1:3]) < 1:
                raise ValueError(f"{k}: expected {want}, got {_describe(v)}")
            frames[cam] = resize_frames(f, schema.image_size)

        hit = _field(m, schema.state)
        if hit is None:
            raise ValueError(f"{schema.state[0]}: missing (state {schema.state_names} of {emb!r}; accepted keys {schema.state})")
        k, st = hit
        S = spec.state_dim
        want = f"[{S}]" if T == 1 else f"[{T}, {S}] (T_obs states, oldest first)"
        if not isinstance(st, np.ndarray) or st.dtype.kind not in "fiu":
            raise ValueError(f"{k}: expected a numeric numpy array {want}, got {_describe(st)}")
        if (st.shape != (T, S)) and not (T == 1 and st.shape == (S,)):
            raise ValueError(f"{k}: expected {want} ({', '.join(spec.state_names)}), got {_describe(st)}")
        st = st.astype(np.float32).reshape(T, S)
        if not np.isfinite(st).all():
            raise ValueError(f"{k}: contains NaN or inf")

        hit = _field(m, schema.prompt)
        if hit is None:
            if schema.default_prompt is None:
                raise ValueError(f"{schema.prompt[0]}: missing (a task instruction string; the server has no default prompt)")
            k, prompt = schema.prompt[0], schema.default_prompt
        else:
            k, prompt = hit
        if not isinstance(prompt, str):
            raise ValueError(f"{k}: expected a string, got {type(prompt).__name__}")
        # its length is checked by check_prompt, on the inference thread (a fast tokenizer must not run on two threads)

        noise = self._noise(m)
        prefix, d = self._rtc_fields(m, spec)

        # the conversion closed-loop evaluation uses (uint8 frames, as in training), one call per observation frame
        from chunkpolicy.sim.base import obs_to_batch

        parts = [obs_to_batch([{"images": {c: f[t] for c, f in frames.items()}, "state": st[t]}], self.space, spec, [prompt])
                 for t in range(T)]
        batch = dict(parts[-1])
        if T > 1:
            batch["images"] = torch.cat([p["images"] for p in parts], dim=2)  # [1, N, T, 3, h, w]
            batch["state"] = torch.cat([p["state"] for p in parts], dim=1)  # [1, T, D]
        return Request(emb, e, batch, noise, prefix, d, k)

    def check_prompt(self, req: Request) -> None:
        """Raise ``ValueError`` naming the prompt field if the request's prompt does not fit the policy's tokens."""
        prompts = [p for p in req.batch["prompt"] if p not in self._prompts_ok]
        if not prompts:
            return
        try:
            self._check_prompts(self.policy.tokenizer, prompts, self.policy.config.max_prompt_tokens)
        except ValueError as err:
            raise ValueError(f"{req.prompt_key}: {err}") from None
        if len(self._prompts_ok) >= 1024:  # bounded: many distinct prompts only cost the check again
            self._prompts_ok.pop(next(iter(self._prompts_ok)))
        self._prompts_ok.update(dict.fromkeys(prompts))

    def _noise(self, m: Mapping[str, Any]) -> torch.Tensor:
        if P.NOISE in m and P.SEED in m:
            raise ValueError(f"{P.NOISE}: give noise or seed, not both")
        if P.NOISE in m:
            v = m[P.NOISE]
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.shape != (self.H, self.D):
                raise ValueError(f"{P.NOISE}: expected a float numpy array [{self.H}, {self.D}] (H, unified dim), got {_describe(v)}")
            if not np.isfinite(v).all():
                raise ValueError(f"{P.NOISE}: contains NaN or inf")
            return torch.from_numpy(v.astype(np.float32))[None]
        if P.SEED in m:
            s = m[P.SEED]
            if isinstance(s, np.integer):
                s = int(s)
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
                raise ValueError(f"{P.SEED}: expected a non-negative int, got {s!r}")
            return seeded_noise(s, self.H, self.D)
        return torch.randn(1, self.H, self.D, generator=self._gen)

    def _rtc_fields(self, m: Mapping[str, Any], spec: Any) -> tuple[np.ndarray | None, int]:
        has_p, has_d = P.RTC_PREFIX in m, P.RTC_PREFIX_LEN in m
        if not has_p and not has_d:
            return None, 0
        if not has_p:
            raise ValueError(f"{P.RTC_PREFIX}: missing ({P.RTC_PREFIX_LEN} was given)")
        if not self.rtc:
            raise ValueError(f"{P.RTC_PREFIX}: real-time chunking needs a head with a flow velocity; this server's "
                             f"{self.policy.config.head.type} head has none (metadata 'rtc' is false)")
        v = m[P.RTC_PREFIX]
        A = spec.action_dim
        # n = H - s for an executor running s >= 1 actions per chunk
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu" or v.ndim != 2 or v.shape[1] != A \
                or not 1 <= v.shape[0] < self.H:
            raise ValueError(f"{P.RTC_PREFIX}: expected a numeric numpy array [n, {A}] with 1 <= n < H = {self.H} "
                             f"(the previous chunk's actions still to run), got {_describe(v)}")
        if not np.isfinite(v).all():
            raise ValueError(f"{P.RTC_PREFIX}: contains NaN or inf")
        d = m.get(P.RTC_PREFIX_LEN, 0)
        if isinstance(d, np.integer):
            d = int(d)
        n = v.shape[0]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= n:
            raise ValueError(f"{P.RTC_PREFIX_LEN}: expected an int in [0, {n}] (the prefix has {n} steps), got {d!r}")
        return v.astype(np.float32)[None], d

    # -- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, reqs: Sequence[Request]) -> list[dict[str, Any]]:
        """Replies for requests of one :attr:`Request.group`, computed as one batch: ``{"actions": float32 [H, A],
        "policy_timing": {"infer_ms"}}`` (+ ``"valid"`` when the head may fail)."""
        if len({r.group for r in reqs}) != 1:
            raise ValueError("run: requests of different groups cannot share a batch")
        t0 = time.perf_counter()
        pol, e, B = self.policy, reqs[0].emb_id, len(reqs)
        if self.cuda_graph:  # a graph per batch size: pad to a power of two so few are captured
            reqs = list(reqs) + [reqs[0]] * ((1 << (B - 1).bit_length()) - B)
        batch = {k: torch.cat([r.batch[k] for r in reqs]) if isinstance(reqs[0].batch[k], torch.Tensor)
                 else [p for r in reqs for p in r.batch[k]] for k in reqs[0].batch}
        noise = torch.cat([r.noise for r in reqs]).to(pol.device, torch.float32)
        if reqs[0].prefix is None:
            out = self._graph(("plain", e, len(reqs)), batch)(batch, noise=noise) if self.cuda_graph else \
                pol.predict_unified(batch, num_steps=self.num_steps, noise=noise)
        else:
            from chunkpolicy.runtime.rtc import RTCGuidance, rtc_target

            inp = pol.prepare_inputs(batch, pol.validate(batch, training=False))  # checked on the host, then copied
            prefix = np.concatenate([r.prefix for r in reqs])
            target, w = rtc_target(pol, prefix, inp, None, reqs[0].prefix_len)
            if self.cuda_graph:
                g = self._graph(("rtc", e, len(reqs)), batch, RTCGuidance(torch.zeros_like(target), torch.zeros_like(w), self.rtc_beta))
                g.guidance.set(target, w)
                out = g(batch, noise=noise)
            else:
                out = pol.infer(inp, noise, self.num_steps, guidance=RTCGuidance(target, w, self.rtc_beta))
        actions = self.space.unpad(out, e, "action").float()
        valid = torch.isfinite(actions).flatten(1).all(1)
        if self.may_fail and pol.head.last_valid is not None:
            valid &= torch.as_tensor(pol.head.last_valid).reshape(-1).to(valid.device).bool()
        actions, valid = actions.cpu().numpy(), valid.cpu().numpy()
        ms = 1000 * (time.perf_counter() - t0)
        replies = []
        for b in range(B):  # padding rows (CUDA graphs) are dropped here
            r: dict[str, Any] = {"actions": np.ascontiguousarray(actions[b], dtype=np.float32),
                                 "policy_timing": {"infer_ms": ms, "batch_size": B}}
            if self.may_fail:
                r["valid"] = bool(valid[b])
            elif not valid[b]:  # a head that cannot fail returned NaN: a bug, never passed on as actions
                raise RuntimeError("inference: the policy returned NaN or inf actions")
            replies.append(r)
        return replies

    def warmup(self) -> None:
        """Capture the batch-1 graphs (plain and, for flow heads, guided) before the first client arrives: a capture
        (and compilation) takes seconds, which a robot's first request should not wait for."""
        e = self.default_embodiment or self.space.embodiments[0].name
        sch, spec = self.schemas[e], self.space.spec(self.space.id_of(e))
        T, (h, w) = sch.n_obs_steps, sch.image_size
        req = {sch.cameras[c][0]: np.zeros((T, h, w, 3), np.uint8) for c in spec.cameras}
        req.update({sch.state[0]: np.zeros((T, spec.state_dim), np.float32), sch.prompt[0]: "warm up", P.EMBODIMENT: e})
        self.run([self.decode(req)])
        if self.rtc and self.H > 1:
            req.update({P.RTC_PREFIX: np.zeros((self.H - 1, spec.action_dim), np.float32), P.RTC_PREFIX_LEN: 1})
            self.run([self.decode(req)])

    def _graph(self, key: tuple, example: Mapping[str, Any], guidance: Any = None) -> Any:
        if key not in self._graphs:
            from chunkpolicy.runtime.graphs import CudaGraphPolicy

            ex = {k: v.to(self.policy.device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
            self._graphs[key] = CudaGraphPolicy(self.policy, ex, num_steps=self.num_steps, compile=self.compile,
                                                guidance=guidance)
        return self._graphs[key]


def seeded_noise(seed: int, horizon: int, dim: int) -> torch.Tensor:
    """The initial noise ``[1, H, D]`` a request with ``seed`` gets: ``torch.randn`` from a CPU generator seeded
    with it (so a test or a second process can reproduce a served chunk in process)."""
    return torch.randn(1, horizon, dim, generator=torch.Generator().manual_seed(int(seed)))
