"""Optional experiment trackers: every metrics.jsonl row also sent to TensorBoard or Weights & Biases.

    --train.tracker=none          metrics.jsonl only (the default)
    --train.tracker=tensorboard   + event files in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR`)
    --train.tracker=wandb         + a W&B run (project train.tracker_project, files under RUN_DIR/wandb/)

Invariants:
- metrics.jsonl stays the record: a tracker receives exactly the rows written there, after they are written, and
  nothing else; each numeric field becomes the scalar `<kind>/<field>` (train/reward, eval/accuracy/memory, ...)
  at the row's step. Strings, booleans and the `step` / `kind` keys are not scalars.
- A tracker's package is imported only when that tracker is chosen: neither is a dependency of memrl.
- No credential passes through memrl. W&B reads WANDB_API_KEY (or its own login file) by itself; the config we hand
  it is Config.to_dict(), which has no field for a key, so run_config.json and the W&B run config hold none.
"""
from __future__ import annotations

from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb")


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row as {"<kind>/<field>": value} (what every tracker logs)."""
    kind = row.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in row.items()
            if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        self.writer.flush()  # a crashed run still has every row it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, project: str, resume: bool):
        import wandb

        self.wandb = wandb
        # resume="allow" with an id stored beside the metrics: --resume continues the same W&B run
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None  # None: W&B picks one
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow" if run_id else None,
                              dir=str(run_dir), config=config)
        id_file.write_text(self.run.id + "\n")

    def log(self, row: dict) -> None:
        # an eval row shares its step with that step's train row: W&B merges the two until a later step arrives
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: Path, config: dict, project: str = "memrl", resume: bool = False):
    """A tracker with .log(row) and .close(), or None for "none"."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir)
    if kind == "wandb":
        return WandbTracker(run_dir, config, project, resume)
    raise ValueError(f"train.tracker: {kind!r} is not one of {TRACKERS}")
