"""Atomic checkpoints and exact resume (DESIGN §8).

A checkpoint is one directory `<run_dir>/checkpoints/step_00000120/` holding
    config.json + model.safetensors   the policy, as a Hugging Face checkpoint (memrl.hf_io.save_model), so that
                                      evaluate.py and transformers load the directory itself
    trainer_state.pt                  optimizer, scheduler, RNG states (torch CPU/CUDA, python, numpy), data order,
                                      step; tensors and plain containers only, read with torch.load(weights_only=True)
    run_config.json                   the resolved memrl config of the run
Atomicity: everything is written into `checkpoints/.tmp-step_XXXXXXXX-<pid>/`, fsynced, then renamed with os.replace
(atomic within a filesystem). Only directories named `step_<digits>` that hold trainer_state.pt are ever listed, so a
crash at any point leaves either the previous checkpoints or the new complete one, never half of one; stale temp
directories are removed by the next save.

One writer per run directory (rank 0): a save removes any temp directory it finds under checkpoints/.

Exact resume holds when the weights are saved in the dtype they train in (fp32 on CPU): the safetensors round trip
is then bitwise, and so is every other piece of state here.
FSDP: pass `model_state_dict` (a gathered full state dict) and the optimizer's full state dict from the rank that
writes; the distributed helper owns the gathering.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from memrl import hf_io
from memrl.config import load_config, save_config

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


# ----------------------------------------------------------------------------- listing

def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs and anything without trainer_state.pt are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """train.resume -> a checkpoint dir: "" = none, "latest" = newest complete one in run_dir (None if none yet)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
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
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`. Returns its directory.

    data_state: e.g. {"epoch": 3, "position": 128, "permutation_seed": 1234} (ints/floats/str/lists only).
    config: a memrl.config.Config (saved as run_config.json). extra: more weights_only-safe state for the trainer.
    """
    assert keep_last >= 1
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*tmp-*"):  # left by a crash mid-save (ours, or hf_io's own temp dirs)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        hf_io.save_model(model, tmp, tokenizer_dir=tokenizer_dir, state_dict=model_state_dict)  # creates tmp
        state = {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data": dict(data_state or {}),
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        if config is not None:
            save_config(config, tmp / CONFIG_FILE)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out only once the new is done
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    only, never pickled code.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if model is not None:
        ref = next(model.parameters())
        loaded = hf_io.load_model(path, dtype=ref.dtype, device=ref.device)
        model.load_state_dict(loaded.state_dict(), strict=True)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path}: checkpoint has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])  # moves state tensors to the params' devices
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"{path}: checkpoint has no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    state["config"] = load_config(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
    return state
