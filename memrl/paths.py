"""Where inputs come from: a local path or a Hugging Face hub id, and the checks train.py and evaluate.py run on every
path they were given before anything heavy loads (a typo costs a second, not a model load).

The hub-id rule: `text` names a hub repository only when ALL of these hold
    - nothing exists at `text` locally;
    - it reads `owner/name`: exactly one "/", letters, digits and . _ - only, not starting with ".", "/" or "~";
    - `owner` is not a local directory, nor one of the folders this project writes (runs, data, assets, checkpoints),
      so `runs/nothere` or `data/typo` is a local path that does not exist (an error), never a download.
Everything else is a local path, and a local path that does not exist is an error. `Qwen/Qwen2.5-Math-1.5B-Instruct`
is a hub id; `./Qwen/x`, `/models/x`, `~/x`, `a/b/c` and `runs/x` (with a local runs/) are not.

A model directory is usable when it holds config.json and its weights (model.safetensors, or the index of a sharded
checkpoint); a train.py run directory stands for its newest complete checkpoint. Nothing here imports torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from memrl import run_dir as runs
from memrl.config import NO_EVAL, Config
from memrl.errors import CheckpointError, ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
LOCAL_ROOTS = ("runs", "data", "assets", "checkpoints")  # where this project's own outputs live: never hub owners
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_POLICY = REPO / "assets" / "synthetic-policy"  # model.path "": the default run's starting policy


def is_hub_id(text: str) -> bool:
    """The rule of the module docstring."""
    if not _HUB_ID.match(text) or Path(text).exists():
        return False
    owner = text.split("/", 1)[0]
    return owner not in LOCAL_ROOTS and not Path(owner).is_dir()


def model_source(text: str, key: str = "--model.path") -> Path | str:
    """A local model directory (a train.py run directory: its newest complete checkpoint), or a hub id (str).
    CheckpointError naming `key` when it is neither."""
    if is_hub_id(text):
        return text
    path = Path(text).expanduser()
    if not path.exists():
        owner = text.split("/", 1)[0]
        why = (f" (a path under {owner}/ is local, never a hub id: memrl/paths.py)"
               if "/" in text and (Path(owner).is_dir() or owner in LOCAL_ROOTS) else "")
        raise CheckpointError(f"{key}: {text}: no such directory{why}")
    if not path.is_dir():
        raise CheckpointError(f"{key}: {text}: a file; expected a checkpoint directory (config.json + weights)")
    if not (path / "config.json").is_file():
        newest = runs.latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{key}: {text}: neither a checkpoint (no config.json) nor a run directory with "
                                  f"complete checkpoints")
        path = newest
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{key}: {path}: no weights ({' or '.join(WEIGHT_FILES)})")
    return path


def resolve_policy(path: str, key: str = "--model.path") -> Path | str:
    """"" -> the built-in synthetic policy (scripts/make_synthetic_policy.py makes it); else model_source."""
    if not path:
        return SYNTHETIC_POLICY
    return model_source(path, key)


def check_input_file(key: str, text: str) -> None:
    if not Path(text).is_file():
        kind = "a directory" if Path(text).is_dir() else "no such file"
        raise ConfigError(f"--{key}: {text}: {kind}")


def check_input_paths(cfg: Config) -> None:
    """Every path a training run reads exists and is of the right kind (the model's files are read later)."""
    if cfg.model.path:
        model_source(cfg.model.path, "--model.path")
    if cfg.model.ref_path and cfg.algo.kl_coef > 0:
        model_source(cfg.model.ref_path, "--model.ref_path")
    if cfg.data.train_path:
        check_input_file("data.train_path", cfg.data.train_path)
    if cfg.data.eval_path and cfg.data.eval_path != NO_EVAL:
        check_input_file("data.eval_path", cfg.data.eval_path)
    if cfg.data.noise_variant != "sharded" or cfg.data.eval_noise_shards:
        check_input_file("data.noise_path", cfg.data.noise_path)
    if cfg.train.resume not in ("", "latest"):
        if not (Path(cfg.train.resume) / runs.STATE_FILE).is_file():
            raise CheckpointError(f"--train.resume: {cfg.train.resume}: not a complete checkpoint (no "
                                  f"{runs.STATE_FILE}); give a checkpoints/step_* directory, or --resume for the "
                                  f"newest one of train.run_dir")


def writable_output(key: str, text: str) -> None:
    """An output file we will write at the end: refuse a directory, or a folder we cannot create, now."""
    path = Path(text)
    if path.is_dir():
        raise ConfigError(f"--{key}: {text}: is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--{key}: {text}: cannot write into {parent}")
