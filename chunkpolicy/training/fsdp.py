"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: per-layer sharding, the consolidated export and
the sharded checkpoint.

Why ``fully_shard`` directly and not accelerate's FSDP plugin: accelerate (1.15) turns FSDP on only for GPU-like
distributed types, so its path cannot run in the CPU tests with gloo; calling ``fully_shard`` on the process group
that accelerate started gives one code path, tested on CPU and used on GPUs. Accelerate still launches the processes,
owns the process group, wraps the optimizer (gradient accumulation) and reduces the logged numbers.

Sharding units. The models call their transformer layers functionally (``qkv(layer, x, ...)`` /
``finish(layer, ...)`` run the layer's projections, norms and MLP as modules, never ``layer(...)``), so a hook on the
layer itself would never fire. :func:`shard_model` therefore probes one forward pass (with and without gradients)
and shards, per transformer layer (the elements of every ``nn.ModuleList`` of same-class modules: SigLIP encoder
layers, Gemma decoder layers, the head's layers), the topmost submodules that ran, as one FSDP group
(``fully_shard([modules])``: gathered before the first of them runs, resharded after the last). Parameters of a layer
that no forward reaches (e.g. the last backbone layer's MLP under ``flow_expert``) stay in the root group, with the
embeddings and the small projections. ``compute_loss`` is registered as an FSDP forward method of the root, so every
call of it (training, validation) gathers the root group.

Mixed precision: with ``train.mixed_precision=bf16`` the gathered parameters are bf16 and gradients are reduced in
fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded master weights and AdamW moments
stay fp32, and the forward still runs under accelerate's autocast as in the single-process path.

Checkpoints (inside the usual ``step_XXXXXX/``, committed by the same temp-dir rename): ``training_state/sharded/``
is a ``torch.distributed.checkpoint`` directory (every process writes its shards of the trainable parameters, the
AdamW state and the EMA shadow; process 0 writes ``.metadata``); ``state.json`` says ``extra.sharded = true``. The
policy files beside it are the consolidated model (gathered onto process 0), the same ``model.safetensors`` layout
as a single-process run, loadable by ``ChunkPolicy.from_pretrained`` and ``chunkpolicy eval``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from chunkpolicy.training.distributed import LossModule

__all__ = ["ShardInfo", "shard_model", "called_modules", "layer_units", "FSDPLossModule", "full_state_dict",
           "consolidated", "SHARDED_DIR", "save_sharded", "load_sharded", "local_norm",
           "sharded_optimizer_health", "reshard_all", "sharded_finite"]

SHARDED_DIR = "sharded"  # under training_state/


class ShardInfo(dict):
    """What :func:`shard_model` did: ``groups`` (FSDP units besides the root), ``root_params`` (parameters left in the
    root group), ``params`` (all)."""


def called_modules(model: nn.Module, run: Callable[[], Any]) -> set[nn.Module]:
    """The modules whose ``__call__`` ran during ``run()`` (global forward hooks, removed afterwards)."""
    seen: set[nn.Module] = set()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, _args: seen.add(m))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every ``nn.ModuleList`` of at least one module, all of one class and holding parameters, that is not inside a
    layer of another such list: the transformer layer stacks (an expert's or DiT's blocks, SigLIP and Gemma layers)."""
    out, inside = [], set()
    for m in model.modules():  # parents before children
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 \
                and any(True for _ in m[0].parameters()):
            out.append(m)
            inside.update(id(d) for layer in m for d in layer.modules())
    return out


def layer_units(model: nn.Module, called: set[nn.Module]) -> list[list[nn.Module]]:
    """Per transformer layer, the topmost submodules that ran (``called``) and hold parameters: one FSDP group each.
    A layer that ran as a whole is its own group; a layer that no forward reached is left out (root group)."""

    def top(m: nn.Module) -> list[nn.Module]:
        if m in called:
            return [m] if any(True for _ in m.parameters()) else []
        return [u for c in m.children() for u in top(c)]

    units = []
    for stack in _layer_lists(model):
        for layer in stack:
            mods = top(layer)
            if mods:
                units.append(mods)
    return units


def shard_model(model: nn.Module, probe: Callable[[bool], Any], *, device: torch.device, mixed_precision: str,
                reshard_after_forward: bool = True) -> ShardInfo:
    """Shard ``model`` in place over all processes (a 1-D mesh on ``device.type``); ``probe(grad)`` runs one
    ``compute_loss`` with gradients on or off (its results and gradients are discarded; the RNG is forked by the
    caller). Returns a :class:`ShardInfo`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    with torch.no_grad():
        ran_eval = called_modules(model, lambda: probe(False))
    ran_train = called_modules(model, lambda: probe(True))
    for p in model.parameters():
        p.grad = None
    # a module in a group must run in every forward, or the group is never resharded: take what both passes ran
    units = layer_units(model, ran_train & ran_eval)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy(cast_forward_inputs=False)
    kw = dict(mesh=mesh, mp_policy=mp)
    for mods in units:
        fully_shard(mods if len(mods) > 1 else mods[0], reshard_after_forward=reshard_after_forward, **kw)
        if len(mods) > 1:
            _gather_before_any_backward(mods)
    in_groups = {id(p) for mods in units for m in mods for p in m.parameters()}
    root = [n for n, p in model.named_parameters() if id(p) not in in_groups]
    fully_shard(model, **kw)  # the root: reshard_after_forward=None, kept gathered from forward to backward
    register_fsdp_forward_method(model, "compute_loss")
    return ShardInfo(groups=len(units), root_params=root, params=sum(1 for _ in model.parameters()))


def _gather_before_any_backward(mods: list[nn.Module]) -> None:
    """FSDP gathers a group for backward when the gradient reaches the output of the group's *last* module. Our layers
    also hand out intermediate outputs: the prefix keys/values that later layers or a second pass over the same
    layers read (the tokens head runs the backbone layers over the prefix, then over the action tokens). Their
    gradient can arrive after the group has been resharded, or never through the last output (the prefix pass's
    last MLP output is not used by the loss): backward would then read a freed parameter. So every module's output
    triggers the group's pre-backward (gather; a no-op while gathered); a group gathered again after its
    post-backward is reduced and resharded by FSDP's end-of-backward callback, its gradients added to the shards.
    Uses FSDP2's ``_pre_backward`` (private; torch 2.11)."""
    from torch.distributed.fsdp import fully_shard
    from torch.utils._pytree import tree_flatten

    state = fully_shard.state(mods[0])

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(state._pre_backward)

    for m in mods:
        m.register_forward_hook(hook)


class FSDPLossModule(LossModule):
    """:class:`LossModule` under ``autocast`` (what accelerate's model wrapper adds in the DDP path); ``no_sync()``
    keeps gradients unreduced (accelerate calls it for the micro-batches of an accumulation window before the last)."""

    def __init__(self, model: nn.Module, autocast: Callable[[], Any]) -> None:
        super().__init__(model)
        self._autocast = autocast

    def forward(self, batch: Mapping[str, Any], host_ids: Any = None) -> dict[str, torch.Tensor]:
        with self._autocast():
            return super().forward(batch, host_ids)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP unit of ``model`` back into its sharded state. A forward without backward (validation) leaves
    the root unit (and, without ``reshard_after_forward``, every unit) gathered: the module then holds plain tensors
    where code that reads ``named_parameters()`` (EMA, checkpoints) expects the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_norm(t: torch.Tensor) -> torch.Tensor:
    """A (replicated) DTensor result as a plain tensor; plain tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def sharded_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of the sharded ``params`` is finite on every process (a DTensor reduction answers for the
    local shard only); collective, one host sync."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in params]
    if local:
        ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float()
    else:  # no shard here: vote "finite", on the device the backend reduces on (NCCL: the current GPU)
        ok = torch.ones((), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


@torch.no_grad()
def sharded_optimizer_health(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """:func:`~chunkpolicy.training.diagnostics.optimizer_health` over sharded parameters: ``[3]`` (max |weight|, max
    |exp_avg|, max exp_avg_sq) of this process's shards, max-reduced over the processes; collective."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    inner = getattr(optimizer, "optimizer", optimizer)

    def local(ts: list) -> list[torch.Tensor]:
        out = [t.to_local() if isinstance(t, DTensor) else t for t in ts if isinstance(t, torch.Tensor)]
        return [t for t in out if t.numel() > 0]  # a small parameter may have no elements on this process

    def absmax(ts: list[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), device=device)
        return torch.stack([n.float() for n in torch._foreach_norm(ts, float("inf"))]).max()

    params = [p.detach() for g in inner.param_groups for p in g["params"]]
    state = [inner.state.get(p, {}) for p in params]
    out = torch.stack([absmax(local(params)), absmax(local([s.get("exp_avg") for s in state])),
                       absmax(local([s.get("exp_avg_sq") for s in state]))]).to(device)
    nan = torch.isnan(out).float()  # a max reduction may drop NaN: carried separately
    both = torch.cat([torch.nan_to_num(out, nan=0.0), nan])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return torch.where(both[3:] > 0, float("nan"), both[:3])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``model.state_dict()`` gathered onto process 0 as CPU tensors (empty on the others); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def consolidated(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` whose ``state_dict()`` returns ``state`` (the gathered weights) while the block runs, so an export
    function that writes ``model.state_dict()`` (``save_pretrained``) writes the consolidated model."""
    own = model.state_dict()
    if set(own) != set(state):
        raise RuntimeError(f"consolidated state dict does not match the model: {sorted(set(own) ^ set(state))[:5]}")
    model.state_dict = lambda *a, **k: dict(state)  # type: ignore[method-assign]  # instance attribute over the method
    try:
        yield model
    finally:
        del model.state_dict


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: list[str],
            ema: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """The sharded state of a run: trainable parameters (by name), the optimizer state (keyed by parameter name), the
    EMA shadow; every tensor a DTensor shard of this process."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model)
    out: dict[str, Any] = {"model": {n: msd[n] for n in trainable}, "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        out["ema"] = dict(ema)
    return out


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: list[str],
                 ema: Mapping[str, torch.Tensor] | None) -> None:
    """Write this process's shards into ``path`` (a DCP directory, created); collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer, trainable, ema), checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: list[str],
                 ema: Mapping[str, torch.Tensor] | None, what: str = "") -> None:
    """Read ``path`` (written by :func:`save_sharded`) into the model's trainable parameters, the optimizer and the
    EMA shadow (in place); collective. ``what``: names the checkpoint in errors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: no sharded training state (.metadata missing)")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    has_ema = any(k.startswith("ema.") for k in saved)
    if (ema is not None) != has_ema:
        raise ValueError(f"{what or path}: the checkpoint {'has' if has_ema else 'has no'} EMA state, this run "
                         f"{'has' if ema is not None else 'has no'} EMA")
    missing = [n for n in trainable if f"model.{n}" not in saved]
    if missing:
        raise ValueError(f"{what or path}: trainable parameters missing from the checkpoint: {missing[:5]} "
                         "(was posttrain.mode changed?)")
    states = _states(model, optimizer, trainable, ema)
    dcp.load(states, checkpoint_id=str(path))
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, states["optim"])
