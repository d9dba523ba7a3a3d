"""Experiment trackers: TensorBoard receives exactly the metrics.jsonl scalars (read back from the event file with
TensorBoard's own reader); no credential reaches the run directory; tracker packages are imported only on demand."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memrl.trackers import scalars
from tests.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECRET = "not-a-real-key-0123456789"  # planted in the environment: it must not land in any file the run writes


def test_tensorboard_event_file_holds_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    policy = make_tiny_checkpoint(tmp_path / "policy", "qwen2")
    run_dir = tmp_path / "run"
    env = dict(os.environ, MEMRL_KERNELS="torch", OMP_NUM_THREADS="1", WANDB_API_KEY=SECRET)
    proc = subprocess.run(
        [sys.executable, "train.py", f"--model.path={policy}", f"--train.run_dir={run_dir}", "--train.max_steps=2",
         "--train.batch_size=2", "--rollout.group_size=2", "--rollout.memory_cap_tokens=3",
         "--rollout.response_max_tokens=3", "--data.eval_limit=2", "--rollout.eval_samples=2",
         "--train.eval_every=1", "--train.tracker=tensorboard"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["eval", "train", "eval", "train", "eval"]
    assert "sampled_accuracy/memory" in rows[0]  # the sampled evaluation is logged too
    expected: dict[str, dict[int, float]] = {}
    for r in rows:
        for tag, v in scalars(r).items():
            expected.setdefault(tag, {})[r["step"]] = v
    # the tags are the numeric fields of the rows, independently of scalars(): kind/field
    assert set(expected) == {f"{r['kind']}/{k}" for r in rows for k, v in r.items()
                             if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)}

    (event_dir,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, v in by_step.items():  # TensorBoard stores float32
            assert (math.isnan(got[step]) and math.isnan(v)) or got[step] == pytest.approx(v, rel=1e-6, abs=1e-30), tag

    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in p.read_bytes() for p in written)
    assert SECRET not in proc.stdout + proc.stderr
    assert json.loads((run_dir / "run_config.json").read_text())["train"]["tracker"] == "tensorboard"


def test_tracker_packages_are_imported_only_when_chosen():
    code = ("import sys, memrl.trackers as t; assert t.make_tracker('none', None, {}) is None; "
            "print(sorted(m for m in sys.modules if m.startswith(('wandb', 'tensorboard', 'torch.utils.tensorboard'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_wandb_offline_run_resumes_and_holds_no_key(tmp_path, monkeypatch):
    """W&B (when installed) in offline mode: the run gets its id file, --resume reuses that id, and the key that
    W&B reads from the environment is in none of the files written."""
    pytest.importorskip("wandb")
    from memrl.config import preset
    from memrl.trackers import make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = preset("default").to_dict()
    first = make_tracker("wandb", tmp_path, cfg, "memrl-test")
    first.log({"step": 0, "kind": "eval", "accuracy/memory": 0.25})
    first.log({"step": 1, "kind": "train", "reward": 0.5, "loss": float("nan")})
    first.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    again = make_tracker("wandb", tmp_path, cfg, "memrl-test", resume=True)
    assert again.run.id == run_id
    again.log({"step": 2, "kind": "train", "reward": 0.75})
    again.close()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs)
    assert all(SECRET.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
