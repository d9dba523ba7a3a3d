"""The run-directory rules (start, resume, config changes, metrics) and the local-path / hub-id rule, on plain files:
no model, no torch."""
import json
from pathlib import Path

import pytest

from memrl import run_dir as runs
from memrl.config import parse_cli, save_config
from memrl.errors import CheckpointError, ConfigError, DataError
from memrl.paths import is_hub_id, model_source


def make_checkpoint(run, step, complete=True):
    path = runs.checkpoint_dir(run, step)
    path.mkdir(parents=True)
    if complete:
        (path / runs.STATE_FILE).write_bytes(b"state")
    return path


def test_a_fresh_start_never_overwrites_a_run(tmp_path):
    run = tmp_path / "run"
    assert runs.plan_start(parse_cli([f"--train.run_dir={run}"])) == []  # nothing there yet
    run.mkdir()
    (run / "run_config.json").write_text("{}")  # a config alone (a run refused before step 1) is not a run
    assert runs.plan_start(parse_cli([f"--train.run_dir={run}"])) == []
    (run / runs.METRICS_FILE).write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match=r"already holds a run \(metrics.jsonl\); --resume continues it"):
        runs.plan_start(parse_cli([f"--train.run_dir={run}"]))


def test_resume_tries_the_newest_complete_checkpoints_first_and_never_restarts_a_run(tmp_path):
    run = tmp_path / "run"
    assert runs.plan_start(parse_cli([f"--train.run_dir={run}", "--resume"])) == []  # a new run dir: step 0
    make_checkpoint(run, 10, complete=False)  # a step dir without trainer_state.pt (a crash mid-save)
    with pytest.raises(CheckpointError, match="holds a run .* but no complete checkpoint"):
        runs.plan_start(parse_cli([f"--train.run_dir={run}", "--resume"]))
    a, b = make_checkpoint(run, 20), make_checkpoint(run, 30)
    assert runs.plan_start(parse_cli([f"--train.run_dir={run}", "--resume"])) == [b, a]
    assert runs.plan_start(parse_cli([f"--train.run_dir={run}", f"--resume={a}"])) == [a]


def test_resume_may_change_only_what_does_not_change_the_experiment(tmp_path):
    saved = parse_cli(["--train.run_dir=r"])
    ok = parse_cli(["--train.run_dir=elsewhere", "--train.max_steps=40", "--train.eval_every=2", "--resume"])
    assert runs.check_resume_config(saved, ok, tmp_path) == [
        "train.run_dir: 'r' -> 'elsewhere'", "train.max_steps: 20 -> 40", "train.eval_every: 5 -> 2"]
    changed = parse_cli(["--train.run_dir=r", "--optim.lr=1e-3", "--train.seed=1", "--rollout.group_size=4"])
    with pytest.raises(ConfigError) as exc:
        runs.check_resume_config(saved, changed, tmp_path / "run_config.json")
    assert "--train.allow_config_change=rollout.group_size,optim.lr,train.seed" in str(exc.value)
    assert exc.value.details == ["rollout.group_size: 8 -> 4", "optim.lr: 0.0008 -> 0.001", "train.seed: 0 -> 1"]
    allowed = parse_cli(["--train.run_dir=r", "--optim.lr=1e-3", "--train.allow_config_change=optim.lr"])
    assert "optim.lr: 0.0008 -> 0.001" in runs.check_resume_config(saved, allowed, tmp_path)


def test_the_saved_config_is_the_checkpoints_own(tmp_path):
    run = tmp_path / "run"
    ckpt = make_checkpoint(run, 5)
    assert runs.saved_config(ckpt) == (None, None)
    save_config(parse_cli(["--train.seed=3"]), run / "run_config.json")
    assert runs.saved_config(ckpt)[0].train.seed == 3  # the run's, when the checkpoint has none
    save_config(parse_cli(["--train.seed=4"]), ckpt / "run_config.json")
    assert runs.saved_config(ckpt) == (parse_cli(["--train.seed=4"]), ckpt / "run_config.json")


def test_metrics_a_torn_last_line_is_dropped_any_other_bad_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "kind": "train", "reward": 0.5}, {"step": 2, "kind": "train", "reward": 0.25}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "ki')
    assert runs.read_metrics(path) == (rows, True)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]))  # whole, only its newline missing: kept
    assert runs.read_metrics(path) == (rows, False)
    path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 3, "ki' + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics line"):
        runs.read_metrics(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "ki')
    assert runs.keep_metrics_up_to(path, 1) is True
    assert path.read_text() == json.dumps(rows[0]) + "\n"


def test_a_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert is_hub_id("Qwen/Qwen2.5-Math-1.5B-Instruct")
    for text in ("./Qwen/x", "/abs/x", "~/x", "a/b/c", "Qwen", "runs/nothere", "data/x", "models/x", "Qwen/x/"):
        assert not is_hub_id(text), text
    with pytest.raises(CheckpointError, match="runs/nothere: no such directory .*local, never a hub id"):
        model_source("runs/nothere")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        model_source("ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    assert model_source("ckpt") == Path("ckpt")
    assert model_source("Qwen/Qwen2.5-Math-1.5B-Instruct") == "Qwen/Qwen2.5-Math-1.5B-Instruct"  # fetched later
