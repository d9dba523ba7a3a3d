"""Atomic checkpoints and exact resume (DESIGN.md §8).

A checkpoint is one directory `<run_dir>/checkpoints/step_00000120/` holding
    config.json + model.safetensors   the policy, as a Hugging Face checkpoint (memrl.hf_io.save_model), so that
                                      evaluate.py and transformers load the directory itself
    trainer_state.pt                  optimizer, scheduler, RNG states (torch CPU/CUDA, python, numpy), data order,
                                      step; tensors and plain containers only, read with torch.load(weights_only=True)
    run_config.json                   the resolved memrl config of the run
Atomicity: everything is written into a temp folder `checkpoints/.step_XXXXXXXX.tmp-<pid>-<random>/`, fsynced, then
renamed with os.replace (atomic within a filesystem; memrl/atomic.py). Only directories named `step_<digits>` that
hold trainer_state.pt are ever listed, so a crash at any point leaves either the previous checkpoints or the new
complete one, never half of one; stale temp directories are removed by the next save.

One writer per run directory (rank 0): a save removes any temp directory it finds under checkpoints/.

Weights and dtypes. The trained weights are the fp32 masters (memrl/distributed.py: with model.dtype=bfloat16 the
policy is FSDP2-wrapped, its shards fp32, the compute copy bf16). Two consumers, two needs:
- the HF export (config.json + model.safetensors) is what users, evaluate.py and transformers load: it holds the
  masters cast to the compute dtype (`export_dtype`, model.dtype: bf16 for the paper presets; half the bytes of
  fp32, and the dtype the model is run in anyway);
- exact resume needs the fp32 masters bit for bit (the optimizer state alone cannot restore them from a bf16
  export). So when the export dtype differs from the masters' dtype, trainer_state.pt also stores the full fp32
  masters (`master_weights`, keyed by the Hugging Face names of the export: memrl.hf_io.to_hf_state_dict splits the
  fused q/k/v and gate/up), and a resume loads them instead of the export.
  Cost: 4 more bytes per parameter on disk (export 2 + masters 4 + Adam moments 8). Chosen over exporting fp32
  because the directory users load stays the model's own dtype and size.
When the weights train in the dtype they are exported in (fp32 on CPU), there is no `master_weights`: the
safetensors round trip is bitwise. Either way every other piece of state here round-trips exactly.
FSDP (torchrun, world size > 1): call save_checkpoint / load_checkpoint on EVERY rank; they are collectives.
- Weights: gathered into one full state dict on rank 0 (memrl.distributed.full_state_dict), written as ONE HF
  checkpoint, so evaluate.py and transformers read it whatever the world size it was trained at.
- Optimizer: the full state dict keyed by parameter name (torch.distributed.checkpoint.state_dict, full_state_dict +
  cpu_offload), gathered on rank 0 and stored in trainer_state.pt like the single-process one. Chosen over per-rank
  shard files because the checkpoint stays one self-contained directory written by one process (one temp dir, one
  rename: atomic), and resume needs the files on rank 0 only (broadcast_from_rank0): other nodes need no shared
  filesystem. The cost, a full fp32 copy of the Adam moments in rank 0's CPU memory while saving, is fine up to a
  few billion parameters.
- RNG: every rank's streams (trainer_state["rng_per_rank"]); each rank gets its own back.
- trainer_state["world_size"] records the world size; a resume at another world size is refused with a clear
  message (the data slicing per rank and the per-rank RNG streams would not continue exactly).
Only rank 0 touches the filesystem; the other ranks receive what they need by broadcast.

Integrity. A save refuses non-finite weights (train.py never gets there: memrl/step_guard.py stops a run first), so
a checkpoint never holds NaNs. A load reads everything (trainer_state.pt, the weights) before it changes the model,
the optimizer or anything else, and a file that does not read back (truncated, empty, not safetensors) is a
CheckpointError naming it: `load_first_intact` then falls back to the next older checkpoint, saying why.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from memrl import distributed, hf_io
from memrl.atomic import atomic_path
from memrl.config import RUN_CONFIG_NAME as CONFIG_FILE
from memrl.config import load_config, save_config
from memrl.errors import CheckpointError, ConfigError, MemrlError
from memrl.run_dir import (CKPT_DIR, STATE_FILE, checkpoint_dir, latest_checkpoint,  # noqa: F401  (re-exported)
                           list_checkpoints)


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """All the RNG streams a run draws from, as tensors / plain Python values (torch.load weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        # the numpy key array becomes a tensor: weights_only loading refuses numpy arrays
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ----------------------------------------------------------------------------- listing (memrl/run_dir.py)

def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """train.resume -> a checkpoint dir: "" = none, "latest" = newest complete one in run_dir (None if none yet)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


# ----------------------------------------------------------------------------- save / load

def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    data_state: dict | None = None,
    config=None,
    keep_last: int = 2,
    tokenizer_dir: str | os.PathLike | None = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
    export_dtype: torch.dtype | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`. Returns its directory.

    data_state: e.g. {"epoch": 3, "position": 128, "permutation_seed": 1234} (ints/floats/str/lists only).
    config: a memrl.config.Config (saved as run_config.json). extra: more weights_only-safe state for the trainer.
    export_dtype: the HF export's dtype (None: the weights' own); when it differs from the weights' dtype the
    weights themselves go to trainer_state.pt as `master_weights` (see the module docstring).
    An FSDP-sharded model: call on every rank (gathers weights, optimizer state and RNG states to rank 0, which
    writes; the others wait at a barrier and return the same path).
    """
    assert keep_last >= 1
    final = checkpoint_dir(run_dir, step)
    world = distributed.world_size()
    optimizer_state = None
    sharded = distributed.is_sharded(model)
    if sharded:  # collectives first, on every rank
        model_state_dict = distributed.full_state_dict(model)
        optimizer_state = distributed.full_optimizer_state_dict(model, optimizer) if optimizer is not None else None
    elif optimizer is not None:
        optimizer_state = optimizer.state_dict()
    rngs = distributed.all_gather_object(rng_state()) if world > 1 else None
    if distributed.rank() != 0:
        distributed.barrier()  # rank 0 writes
        return final
    masters = None
    full = model_state_dict if model_state_dict is not None else model.state_dict()
    bad = [k for k, v in full.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # never a checkpoint with NaNs: a resume or an evaluation would silently use them
        if world > 1 or sharded:
            distributed.barrier()
        raise CheckpointError(f"{final}: not saved: non-finite weights in {bad[:4]}{' ...' if len(bad) > 4 else ''}")
    if export_dtype is not None:
        if any(v.dtype != export_dtype for v in full.values()):
            masters = hf_io.to_hf_state_dict({k: v.detach().cpu() for k, v in full.items()}, model.config, copy=True)
            masters = {k: v.contiguous() for k, v in masters.items()}  # HF names, like the export
            model_state_dict = {k: v.to(export_dtype) for k, v in masters.items()}  # save_model keeps HF names
    try:
        return _write(final, run_dir, step, model, optimizer_state, scheduler, data_state, config, keep_last,
                      tokenizer_dir, model_state_dict, extra, world, rngs, masters)
    finally:
        if world > 1 or sharded:
            distributed.barrier()


def _write(final: Path, run_dir, step, model, optimizer_state, scheduler, data_state, config, keep_last,
           tokenizer_dir, model_state_dict, extra, world: int, rngs: list | None,
           masters: dict[str, torch.Tensor] | None = None) -> Path:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*tmp-*"):  # left by a crash mid-save (ours, or hf_io's own temp dirs)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_path(final, directory=True) as tmp:  # a re-saved step (after a resume) is swapped in whole
        hf_io.save_model(model, tmp, tokenizer_dir=tokenizer_dir, state_dict=model_state_dict)
        state = {
            "step": int(step),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data": dict(data_state or {}),
            "extra": dict(extra or {}),
            "world_size": world,
        }
        if rngs is not None:
            state["rng_per_rank"] = rngs
        if masters is not None:
            state["master_weights"] = masters
        torch.save(state, tmp / STATE_FILE)
        if config is not None:
            save_config(config, tmp / CONFIG_FILE)
        _fsync_tree(tmp)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict:
    """Restore what is given (weights into `model` in place, optimizer, scheduler, RNG) from a checkpoint dir.

    Returns the trainer state: {"step", "data", "extra", "config" (a Config or None), "optimizer", "scheduler", ...}.
    Non-weight state is read with torch.load(weights_only=True): a checkpoint can hold tensors and plain containers
    only, never pickled code. Under torchrun (world size > 1): call on every rank; only rank 0 reads the files
    (`path` matters on rank 0 only) and the rest arrives by broadcast. Every file is read before anything is
    changed; an unreadable one raises CheckpointError (on every rank), a checkpoint of another world size ConfigError.
    """
    world = distributed.world_size()
    if world == 1 and not (model is not None and distributed.is_sharded(model)):
        return _load_local(Path(path), model, optimizer, scheduler, restore_rng)
    state, weights, error = None, {}, None
    if distributed.rank() == 0:
        try:
            state = _read_state(Path(path))
            if state.get("world_size", 1) != world:
                raise ConfigError(_world_message(path, state.get("world_size", 1), world))
            if model is not None:  # read here, inside the try: a bad file must stop every rank, not hang the others
                weights = _weights(Path(path), state, model, next(model.parameters()).dtype, "cpu")
        except MemrlError as e:
            error = (type(e).__name__, str(e))
    error = distributed.broadcast_object(error)
    if error is not None:
        raise (ConfigError if error[0] == "ConfigError" else CheckpointError)(error[1])
    if model is not None:
        distributed.load_full_state_dict(model, weights)
    if optimizer is not None:
        full = state["optimizer"] if state is not None else {}
        distributed.load_full_optimizer_state_dict(model, optimizer, full)
    small = None
    if distributed.rank() == 0:  # everything but the big tensors travels as one pickled object
        small = {k: v for k, v in state.items() if k not in ("optimizer", "master_weights")}
    small = distributed.broadcast_object(small)
    if scheduler is not None:
        scheduler.load_state_dict(small["scheduler"])
    if restore_rng:
        set_rng_state(small.get("rng_per_rank", [small["rng"]])[distributed.rank()])  # world 1: "rng" only
    return small


def load_first_intact(candidates: list[Path], model, optimizer=None, scheduler=None,
                      report=print) -> tuple[Path, dict]:
    """The first checkpoint of `candidates` (newest first) that reads back, loaded; each unreadable one is reported
    and skipped. CheckpointError when none reads (naming each). Collective under torchrun, like load_checkpoint."""
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler)
        except CheckpointError as e:
            problems.append(str(e))
            report(f"skipping checkpoint {path}: {e}")
    raise CheckpointError(f"--resume: none of the {len(candidates)} checkpoint(s) reads back", details=problems)


def _weights(path: Path, state: dict, model, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The weights to resume from, in `dtype`, keyed like the model: the fp32 masters when the checkpoint stored
    them (its export is in a lower precision), else the HF export."""
    if state.get("master_weights") is not None:
        masters = {k: v.to(device=device, dtype=dtype) for k, v in state["master_weights"].items()}  # HF names
        return hf_io.from_hf_state_dict(masters, model.config, list(model.state_dict()))
    try:
        weights = hf_io.load_model(path, dtype=dtype, device=device).state_dict()
    except (ValueError, OSError) as e:  # hf_io names the file; a CheckpointError passes through unchanged
        raise CheckpointError(str(e)) from e
    weights.pop("inv_freq", None)
    return weights


def _world_message(path, saved: int, world: int) -> str:
    return (f"{path} was written by a run of {saved} process(es), this run has {world}: resume at the same world "
            f"size (torchrun --nproc_per_node ... x nodes = {saved}), or start a new run from its weights with "
            f"--model.path={path}")


def _read_state(path: Path) -> dict:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        # an empty or truncated file (a disk that filled up, a copy cut short): torch's zip reader says so
        raise CheckpointError(f"{state_file}: unreadable, truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise CheckpointError(f"{state_file}: not a trainer state (no step / optimizer / rng)")
    state["config"] = load_config(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
    return state


def _load_local(path: Path, model, optimizer, scheduler, restore_rng: bool) -> dict:
    state = _read_state(path)
    if state.get("world_size", 1) != 1:
        raise ConfigError(_world_message(path, state["world_size"], 1))
    if optimizer is not None and state["optimizer"] is None:
        raise CheckpointError(f"{path}: checkpoint has no optimizer state")
    if scheduler is not None and state["scheduler"] is None:
        raise CheckpointError(f"{path}: checkpoint has no scheduler state")
    weights = None
    if model is not None:  # read fully before anything changes: a bad file leaves the model as it was
        ref = next(model.parameters())
        weights = _weights(path, state, model, ref.dtype, ref.device)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])  # moves state tensors to the params' devices
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
