"""A train.py run directory: its layout, its checkpoints, and the rules for starting or resuming a run in it.

    <run_dir>/run_config.json                  the resolved config, written once the run's checks have passed
    <run_dir>/metrics.jsonl                    one JSON line per logged step and per evaluation
    <run_dir>/checkpoints/step_00000120/       a complete checkpoint (memrl/checkpoint.py writes it atomically)

Starting a run (plan_start), the rules:
- no --resume: the directory must not hold a run yet (a metrics line or a checkpoint), since starting over would
  erase its history. --resume continues it; another train.run_dir starts a new run beside it.
- --resume (= latest): the complete checkpoints, newest first. train.py loads the first one that reads back intact
  and reports each corrupt one it skips (memrl/checkpoint.py). When there is none: a directory that holds no run yet
  starts from step 0 (nothing is lost, so `--resume` is safe in a restart loop); a directory that holds a run
  (metrics, or only incomplete checkpoints) is an error: never a silent restart from step 0.
- --resume=DIR: that checkpoint.
- The config may differ from the checkpoint's own run_config.json only in RESUME_MAY_CHANGE (below: run length,
  eval / save / log cadence, run_dir, device, threads, gradient checkpointing) and in the keys the user
  lists in --train.allow_config_change; any other difference is refused, naming every key with both values.
Metrics: a last line without its newline is what a kill mid-write leaves: it is dropped with a note. Any other line
that does not parse is an error naming file:line. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from memrl.atomic import write_text_atomic
from memrl.config import RUN_CONFIG_NAME, Config, config_changes, load_config
from memrl.errors import CheckpointError, ConfigError, DataError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# What --resume may change without --train.allow_config_change: how long the run goes, how often it evaluates,
# saves and logs, where it lives, what it runs on. None of these changes what a step computes; every other key does
# (the data, the model, the algorithm, the optimizer, the seed) and would silently make the run another experiment.
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "train.eval_every", "train.eval_at_start",
                     "train.save_every", "train.keep_last", "train.log_every", "train.device", "train.run_dir",
                     "train.resume", "train.allow_config_change", "train.max_skipped_steps", "train.cpu_threads",
                     "model.gradient_checkpointing")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every step_* directory, complete or not, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs and anything without trainer_state.pt are ignored)."""
    return [p for _, p in step_dirs(run_dir) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def what_it_holds(run_dir: str | os.PathLike) -> str:
    """"" for a directory without a run; else what is there, e.g. "2 checkpoint(s) (up to step 40), metrics"."""
    run_dir = Path(run_dir)
    parts = []
    if steps := step_dirs(run_dir):
        parts.append(f"{len(steps)} checkpoint dir(s) (up to step {steps[-1][0]})")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        parts.append(f"{METRICS_FILE}")
    return ", ".join(parts)


def plan_start(cfg: Config) -> list[Path]:
    """The checkpoints to try, in order (empty: start at step 0); CheckpointError where the rules forbid a start."""
    run_dir = Path(cfg.train.run_dir)
    held = what_it_holds(run_dir)
    if not cfg.train.resume:
        if held:
            raise CheckpointError(f"--train.run_dir: {run_dir} already holds a run ({held}); --resume continues it, "
                                  f"another --train.run_dir starts a new one (delete {run_dir} to start it over)")
        return []
    if cfg.train.resume != "latest":
        return [Path(cfg.train.resume)]
    candidates = list_checkpoints(run_dir)[::-1]
    if not candidates and held:
        raise CheckpointError(f"--resume: {run_dir} holds a run ({held}) but no complete checkpoint to resume from; "
                              f"resuming would restart it at step 0. Delete {run_dir} (or pick another "
                              f"--train.run_dir) to start over")
    return candidates


def saved_config(checkpoint: Path) -> tuple[Config | None, Path | None]:
    """The config a checkpoint was trained with: its own run_config.json, else its run directory's."""
    for path in (checkpoint / RUN_CONFIG_NAME, checkpoint.parent.parent / RUN_CONFIG_NAME):
        if path.is_file():
            return load_config(path), path
    return None, None


def check_resume_config(saved: Config, cfg: Config, source: Path) -> list[str]:
    """The allowed changes as 'key: old -> new' lines; ConfigError listing the others (see the module docstring)."""
    allowed = set(RESUME_MAY_CHANGE) | {k.strip() for k in cfg.train.allow_config_change.split(",") if k.strip()}
    changes = config_changes(saved, cfg)
    refused = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes if k not in allowed]
    if refused:
        keys = ",".join(k for k, _, _ in changes if k not in allowed)
        raise ConfigError(f"--resume: the config differs from the checkpoint's ({source}) in "
                          f"{len(refused)} key(s) that change the experiment; start a new run (another "
                          f"--train.run_dir), or allow them explicitly with --train.allow_config_change={keys}",
                          details=refused)
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changes if k not in ("train.resume",)]


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """(rows, whether a torn last line was dropped). DataError naming path:line for any other bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such metrics file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else the line a kill cut short
    rows = []
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{line_no}: not a metrics line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{line_no}: not a metrics line (needs a JSON object with an integer 'step')")
        rows.append(row)
    torn = bool(tail.strip())
    if torn:  # complete JSON without its newline is still a whole line
        try:
            row = json.loads(tail)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
                torn = False
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return rows, torn


def keep_metrics_up_to(path: str | os.PathLike, step: int) -> bool:
    """Rewrite metrics.jsonl (temp file + rename) with the rows of steps <= `step`: a resumed run continues the
    history its checkpoint belongs to. Returns whether a torn last line was dropped."""
    path = Path(path)
    if not path.is_file():
        return False
    rows, torn = read_metrics(path)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    return torn
