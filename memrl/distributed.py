"""Distributed helpers, kept out of the model: process-group setup, rank-0 printing, FSDP2 wrapping, reductions.

Launch with `torchrun --nproc_per_node N train.py ...` (multi-node: torchrun's c10d rendezvous; nothing here reads
more than torchrun's env vars, LOCAL_RANK picks the GPU). A plain `python train.py` is world size 1 and touches no
process group: every helper below is then the identity (or the plain single-process operation).

FSDP2 (`fully_shard`) is applied from outside the model, torchtitan-style: each decoder block is its own unit (its
parameters are all-gathered just before it runs and freed after), then the root takes what is left (embeddings,
final norm, lm_head). With bf16 weights the parameters compute in bf16 and gradients are reduce-scattered in fp32;
with fp32 weights (CPU/gloo tests) everything stays fp32.

Invariants:
- Everything that enters a token-mean (the global response-token count) is summed over ranks with `all_reduce_sum`,
  so the loss of N ranks x their slices equals the loss of one rank over the whole batch.
- FSDP forward/backward passes are collectives: every rank must run the same number of them (train.py pads with
  zero-weight dummy micro-batches). Generation is NOT a collective: it runs on `rollout_view`, a hook-free copy of
  the module tree whose parameters are the gathered tensors, so ranks may generate different amounts.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start NCCL (GPU) or gloo (CPU) when the world has more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only: every other rank would print the same line."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity on one process); returns t."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max over ranks in place (identity on one process); returns t."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """{name: sum over ranks} in one all-reduce of a float64 vector (identity on one process: a Python float
    round-trips float64 exactly). Every rank must pass the same names in the same order."""
    return _reduce_dict(values, device, dist.ReduceOp.SUM)


def max_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """{name: max over ranks}: wall-clock times (the slowest rank sets the pace) and peak memory."""
    return _reduce_dict(values, device, dist.ReduceOp.MAX)


def _reduce_dict(values: dict[str, float], device, op) -> dict[str, float]:
    if world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(values, t.tolist()))


def broadcast_object(obj=None):
    """Rank 0's picklable `obj` on every rank (identity on one process). Small things only: paths, step counters."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- FSDP2

def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = torch.bfloat16) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root. fp32 gradient reduction keeps small updates exact.

    param_dtype None: compute in the weights' own dtype (fp32 on CPU). The root keeps its parameters gathered from
    forward to backward (reshard_after_forward=False): the loss calls `model.output_weight()` (lm_head) outside the
    forward, which must see the gathered tensor, and the backward needs those parameters again right away.
    Gradients are summed over ranks, not averaged (see the divide factor below).
    Ends with one 1-token no-grad forward: it runs FSDP's lazy initialisation (root state, communication streams),
    so that `gathered_for_rollout` may unshard before the first training step. Collective: call on every rank.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    for unit in _units(model):  # SUM the ranks' gradients: the loss already divides by the GLOBAL token count,
        unit.set_gradient_divide_factor(1.0)  # FSDP's default (the mean over ranks) would divide a second time
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # as a plain SUM collective: gloo has no PREMUL_SUM
            unit.set_force_sum_reduction_for_comms(True)
    device = model.inv_freq.device
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    model.reshard()
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def rollout_view(model: torch.nn.Module) -> torch.nn.Module:
    """The module the generator runs: the model itself when unsharded; for an FSDP model, a plain copy of its module
    tree (built on the meta device, no memory) whose parameters `gathered_for_rollout` points at the gathered
    tensors. Why not generate with the FSDP module itself: its forward hooks make stream waits and collectives,
    which must not run inside a CUDA-graph capture, and would make generation a collective (ranks generate
    different amounts). Valid only inside `gathered_for_rollout`; outside it the parameters are freed storage."""
    if not is_sharded(model):
        return model
    with torch.device("meta"):
        view = _plain_class(model)(model.config)
    view.inv_freq = model.inv_freq  # a buffer: FSDP leaves it whole on every rank
    view.eval().requires_grad_(False)
    return view


def _plain_class(model: torch.nn.Module) -> type:
    """The model's own class under FSDP2's dynamic subclass (FSDPTransformer -> Transformer)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule))


@contextmanager
def gathered_for_rollout(model: torch.nn.Module, view: torch.nn.Module | None = None):
    """Unshard every FSDP unit once (one all-gather per unit) and keep it gathered for the whole rollout (hundreds
    of forwards), instead of an all-gather per block per decode step; point `view` (rollout_view(model)) at the
    gathered tensors; reshard afterwards to give the memory back. Collective on entry: call on every rank."""
    if not is_sharded(model):
        yield model
        return
    units = _units(model)
    for m in units:
        m.unshard()
    if view is not None:
        for name, p in model.named_parameters():  # the gathered (unsharded) parameters now, not DTensors
            mod, _, leaf = name.rpartition(".")
            view.get_submodule(mod)._parameters[leaf] = p
    try:
        yield view if view is not None else model
    finally:
        for m in units:
            m.reshard()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global grad-norm clipping; returns the norm before clipping, identical on every rank. Under FSDP2 the grads
    are DTensor shards and clip_grad_norm_ returns the global norm as a DTensor: .full_tensor() materialises it."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


# ----------------------------------------------------------------------------- full state dicts (checkpoints)

def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (on rank 0; other ranks get an empty dict), for a single HF checkpoint.
    Collective under FSDP."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of full_state_dict: each rank keeps its shard of the full tensors (rank 0's `state` is broadcast;
    the others may pass {})."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of the whole model, keyed by parameter name, on CPU on rank 0 (others: {}).
    Collective under FSDP. Unsharded: optimizer.state_dict() as is."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state_dict (rank 0's `state` is broadcast and each rank keeps its shard)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True,
                                                                              broadcast_from_rank0=True))
