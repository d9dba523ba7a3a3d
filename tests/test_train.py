"""train.py end to end on CPU: --help, exact resume (bitwise), and a non-finite step being skipped."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "assets" / "synthetic-policy"
TIMING = ("_s", "_per_s")  # wall-clock fields differ between runs; everything else must not


def run_train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEMRL_KERNELS="torch")  # the kernels' torch references (not Triton's CPU interpreter)
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def test_help_lists_every_config_key():
    proc = run_train("--help")
    assert "python train.py" in proc.stdout
    for key in ("--rollout.memory_cap_tokens=", "--algo.kl_coef=", "--train.resume=", "--optim.lr="):
        assert key in proc.stdout
    bad = run_train("--rollout.no_such_key=3", check=False)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr


# a few steps of the real default task, small: 2 problems x 4 samples, KL on, dynamic sampling on
SMALL = ["--train.batch_size=2", "--rollout.group_size=4", "--rollout.memory_cap_tokens=16",
         "--rollout.response_max_tokens=12", "--data.eval_limit=8", "--train.eval_every=2",
         "--train.save_every=2", "--algo.kl_coef=0.01", "--algo.dynamic_sampling=true",
         "--algo.max_sampling_rounds=2", "--train.micro_batch_tokens=1024"]


@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")
def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(*SMALL, f"--train.run_dir={whole}", "--train.max_steps=4")
    run_train(*SMALL, f"--train.run_dir={parts}", "--train.max_steps=2")  # stopped right after the checkpoint
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step_00000002"]
    out = run_train(*SMALL, f"--train.run_dir={parts}", "--train.max_steps=4", "--resume")
    assert "resumed from" in out.stdout and "changed: train.max_steps: 2 -> 4" in out.stdout
    assert "eval @ step 4: synthetic:coin-tally/eval (memory, n=8)" in out.stderr  # progress says what it evaluates

    a, b = metrics(whole), metrics(parts)
    assert a == b  # every logged number, bit for bit (json round-trips floats exactly)
    train_rows = [r for r in a if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert any(r["grad_norm"] > 0 for r in train_rows)  # the policy did learn something: a real test
    assert all(r["kl"] >= 0 for r in train_rows)
    wa = load_file(str(whole / "checkpoints" / "step_00000004" / "model.safetensors"))
    wb = load_file(str(parts / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((parts / "run_config.json").read_text())["train"]["resume"] == "latest"


def test_non_finite_loss_skips_the_step(tmp_path):
    policy = make_tiny_checkpoint(tmp_path / "policy", "qwen2")
    nan_ref = make_tiny_checkpoint(tmp_path / "nan_ref", "qwen2")
    weights = load_file(str(nan_ref / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")  # reference log-probs NaN -> KL NaN -> loss NaN
    from safetensors.torch import save_file

    save_file(weights, str(nan_ref / "model.safetensors"), metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    out = run_train(f"--model.path={policy}", f"--model.ref_path={nan_ref}", "--algo.kl_coef=0.1",
                    f"--train.run_dir={run_dir}", "--train.max_steps=1", "--train.batch_size=1",
                    "--rollout.group_size=2", "--rollout.memory_cap_tokens=3", "--rollout.response_max_tokens=3",
                    "--data.eval_limit=1")
    assert "update skipped" in out.stdout + out.stderr
    row = [r for r in metrics(run_dir) if r["kind"] == "train"][0]
    assert row["skipped"] == 1 and math.isnan(row["loss"])
    before = load_file(str(policy / "model.safetensors"))
    after = load_file(str(run_dir / "checkpoints" / "step_00000001" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in after)  # no update, not even weight decay
