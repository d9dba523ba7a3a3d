"""Distributed helpers, kept out of the model: process-group setup, rank-0 printing, FSDP2 wrapping, reductions.

Launch with `torchrun --nproc_per_node N train.py ...` (multi-node: torchrun's c10d rendezvous; nothing here reads
more than torchrun's env vars, LOCAL_RANK picks the GPU). A plain `python train.py` is world size 1 and touches no
process group: every helper below is then the identity (or the plain single-process operation).

FSDP2 (`fully_shard`) is applied from outside the model, torchtitan-style: each decoder block is its own unit (its
parameters are all-gathered just before it runs and freed after), then the root takes what is left (embeddings,
final norm, lm_head). Mixed precision: the policy is loaded in fp32 and its shards are the fp32 MASTER weights
(AdamW and its moments are fp32: a 1e-6-lr update is not rounded away as it would be in bf16); FSDP all-gathers a
compute copy in model.dtype (bf16) and reduce-scatters the gradients in fp32. A bf16 run on ONE process takes the
same path over a single-rank process group (init_distributed(single_rank_group=True)). A plain fp32 run on one
process (the CPU default) has no process group and no FSDP at all.

Invariants:
- Everything that enters a token-mean (the global response-token count) is summed over ranks with `all_reduce_sum`,
  so the loss of N ranks x their slices equals the loss of one rank over the whole batch.
- FSDP forward/backward passes are collectives: every rank must run the same number of them (train.py pads with
  zero-weight dummy micro-batches). Generation is NOT a collective: it runs on `rollout_view`, a hook-free copy of
  the module tree with its own persistent compute-dtype weights (refreshed from the masters before each rollout,
  at fixed addresses so the generator's CUDA graphs stay valid), so ranks may generate different amounts.
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


def init_distributed(device: str = "auto", single_rank_group: bool = False) -> DistInfo:
    """Read torchrun's environment; start NCCL (GPU) or gloo (CPU) when the world has more than one process.

    single_rank_group: on ONE process, start a process group of one rank anyway (an in-memory HashStore, no
    rendezvous), so that the model can be FSDP2-wrapped for its mixed precision (fp32 masters, bf16 compute):
    one process and N processes then run the same code path. world_size() is 1 either way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if use_cuda else None)
    elif world == 1 and single_rank_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def set_cpu_threads(requested: int = 0) -> int:
    """torch's intra-op threads for a CPU run: `requested` (train.cpu_threads), else $OMP_NUM_THREADS when the user
    set it, else 1. Why not torch's default (one per core): this project's CPU work is small matrices (the default
    run's policy has 0.6M parameters), where a second thread buys little on an idle machine, and on a shared one
    every extra thread waits for a core another process holds: under load a default-run step took 5 to 10 times as
    long with two threads as with one (README, "CPU threads"). Returns the number set."""
    n = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    torch.set_num_threads(n)
    return n


def shutdown() -> None:
    """Destroy the process group, if any (end of training)."""
    if dist.is_initialized():
        dist.destroy_process_group()


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

    param_dtype: the compute dtype of the all-gathered copy (bf16 over fp32 masters); None: compute in the weights'
    own dtype (fp32 on CPU; the frozen bf16 reference, which has no optimizer and needs no master). The root keeps its parameters gathered from
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
    """The module the generator runs: the model itself when unsharded; for an FSDP model, a plain (hook-free) copy
    of its module tree that owns PERSISTENT full-size parameter buffers in the compute dtype, which
    `gathered_for_rollout` refreshes from the sharded masters before each rollout.

    Why a hook-free copy: the FSDP module's forward hooks make stream waits and collectives, which must not run
    inside a CUDA-graph capture, and would make generation a collective (ranks generate different amounts).
    Why persistent buffers: FSDP2's unshard() allocates the gathered parameters anew each time, and the generator
    keys its CUDA graphs (and torch.compile's guards) on the weights' addresses (memrl/model_runner.py
    `use_layout`: `p.data_ptr() for p in model.parameters()`), so generating on freshly gathered tensors would
    recapture every graph every step. The view's parameter tensors are allocated once (on the first refresh, like the gathered
    ones) and only ever written in place: same objects, same data_ptr, new values.
    Cost: one full copy of the model in the compute dtype per rank, for the whole run (2 bytes/param in bf16:
    3.1 GB for 1.5B params, 8 GB for 4B), i.e. what FSDP would hold gathered during the rollout anyway, but also
    held through the update. Buffers (RoPE inv_freq) are shared with the model, not copied."""
    if not is_sharded(model):
        return model
    with torch.device("meta"):
        view = _plain_class(model)(model.config)
    for name, buf in model.named_buffers():  # whole on every rank: FSDP shards parameters only
        mod, _, leaf = name.rpartition(".")
        view.get_submodule(mod)._buffers[leaf] = buf
    view.eval().requires_grad_(False)
    # which FSDP unit owns each parameter (the deepest unit whose prefix it has): refreshed one unit at a time
    prefixes = {id(m): n for n, m in model.named_modules()}
    units = sorted(_units(model), key=lambda u: -len(prefixes[id(u)]))
    owned: dict[int, list[str]] = {id(u): [] for u in units}
    for name, _ in model.named_parameters():
        unit = next(u for u in units if prefixes[id(u)] == "" or name.startswith(prefixes[id(u)] + "."))
        owned[id(unit)].append(name)
    view._memrl_units = [(u, owned[id(u)]) for u in units if owned[id(u)]]
    return view


def _plain_class(model: torch.nn.Module) -> type:
    """The model's own class under FSDP2's dynamic subclass (FSDPTransformer -> Transformer)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule))


@torch.no_grad()
def refresh_rollout_view(model: torch.nn.Module, view: torch.nn.Module) -> None:
    """Copy the current weights into `view`'s persistent buffers, one FSDP unit at a time: unshard (all-gather, in
    the compute dtype), copy_, reshard at once. Peak extra memory: one unit's gathered parameters (the largest is
    the root: embeddings + lm_head), not the whole gathered model. Collective: call on every rank."""
    for unit, names in view._memrl_units:
        unit.unshard()
        for name in names:
            mod, _, leaf = name.rpartition(".")
            gathered = model.get_submodule(mod)._parameters[leaf]  # the unsharded tensor now, not the DTensor shard
            slot = view.get_submodule(mod)._parameters
            if slot[leaf] is None or slot[leaf].is_meta:  # first refresh: allocate, once and for all
                slot[leaf] = torch.nn.Parameter(torch.empty_like(gathered), requires_grad=False)
            slot[leaf].copy_(gathered)
        unit.reshard()


@contextmanager
def gathered_for_rollout(model: torch.nn.Module, view: torch.nn.Module | None = None):
    """The model to generate with, holding the current weights: the model itself when unsharded; for an FSDP model
    `view` (rollout_view(model), required) after refresh_rollout_view. Nothing stays gathered inside the block (the
    view owns its memory), so there is nothing to release on exit. Collective on entry: call on every rank."""
    if not is_sharded(model):
        yield model
        return
    if view is None:
        raise ValueError("gathered_for_rollout: an FSDP model needs its rollout_view(model)")
    refresh_rollout_view(model, view)
    yield view


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
