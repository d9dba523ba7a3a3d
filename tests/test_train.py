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


# a few steps of the real default task, small: 2 problems x 4 samples, KL on, dynamic sampling on, 2 mini-batches
# (2 optimizer steps per RL step: the second one off-policy, so the resume must restore exactly what the ratio sees)
SMALL = ["--train.batch_size=2", "--rollout.group_size=4", "--data.eval_limit=8", "--train.eval_every=2",
         "--train.save_every=2", "--algo.kl_coef=0.01", "--algo.dynamic_sampling=true",
         "--algo.max_sampling_rounds=2", "--train.micro_batch_tokens=1024", "--algo.mini_batches=2"]


@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")
def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(*SMALL, f"--train.run_dir={whole}", "--train.max_steps=4")
    run_train(*SMALL, f"--train.run_dir={parts}", "--train.max_steps=2")  # stopped right after the checkpoint
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step_00000002"]
    out = run_train(*SMALL, f"--train.run_dir={parts}", "--train.max_steps=4", "--resume")
    assert "resumed from" in out.stdout and "changed: train.max_steps: 2 -> 4" in out.stdout
    assert "eval @ step 4: synthetic:coin-sum/eval (memory, n=8)" in out.stderr  # progress says what it evaluates

    a, b = metrics(whole), metrics(parts)
    assert a == b  # every logged number, bit for bit (json round-trips floats exactly)
    train_rows = [r for r in a if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert any(r["grad_norm"] > 0 for r in train_rows)  # the policy did learn something: a real test
    # one per mini-batch that holds a problem (dynamic sampling may keep a single group of the 2: then only one)
    assert all(1 <= r["optimizer_steps"] <= 2 for r in train_rows) and any(r["optimizer_steps"] == 2
                                                                           for r in train_rows)
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


def design_loss64(logp, old, ref, adv, keep, weight, n_tokens, eps_low, eps_high, clip_c, beta):
    """DESIGN §5 token by token in float64, with rollout correction's weight w on the pg term and its mask:
    Σ keep·(w·pg + β·k3) / N."""
    total = 0.0
    for lp, o, r, a, kp, w in zip(logp, old, ref, adv, keep, weight):
        if not kp:
            continue
        rho = math.exp(min(max(lp - o, -20.0), 20.0))
        pg = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
        if a < 0:
            pg = min(pg, -clip_c * a)
        k = min(max(r - lp, -20.0), 20.0)
        total += w * pg + beta * (math.exp(k) - k - 1)
    return total / n_tokens


@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")
def test_mini_batches_clip_and_the_loss_is_design_section_5(tmp_path):
    """One RL step with 4 mini-batches, KL, a top-p sampler (so the sampler's log-probs differ from the trainer's)
    with truncated IS and the sequence mask on: every recorded micro-batch loss equals DESIGN §5 evaluated here in
    float64; the first mini-batch trains at ratio 1 exactly (one scoring pass, bitwise the training numerics); later
    ones clip."""
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    C, lo, hi, beta = 1.5, 0.999, 1.001, 0.01  # verl's typical geometric bounds: ~1 in 6 sequences masked here
    run_train("--train.batch_size=8", "--rollout.group_size=4", "--train.micro_batch_tokens=1024",
              "--algo.mini_batches=4", f"--algo.kl_coef={beta}", "--optim.lr=5e-3", "--optim.warmup_steps=0",
              "--rollout.top_p=0.9", f"--algo.tis_cap={C}", "--algo.seq_mask=true", f"--algo.seq_mask_low={lo}",
              f"--algo.seq_mask_high={hi}",
              "--train.max_steps=1", "--train.eval_at_start=false", "--data.eval_limit=4",
              f"--train.run_dir={run_dir}", f"--train.dump_loss_inputs={dump}")
    row = [r for r in metrics(run_dir) if r["kind"] == "train"][0]
    assert row["optimizer_steps"] == 4 and row["pg_clipfrac"] > 0
    assert row["logp_gap"] > 0 and 0 < row["mismatch/seq_masked_frac"] < 1 and row["mismatch/tis_clip_frac"] >= 0
    recorded = torch.load(dump / "step_00000001_rank0.pt", weights_only=True)
    assert {r["mini_batch"] for r in recorded} == {0, 1, 2, 3}
    for k in range(4):
        mbs = [r for r in recorded if r["mini_batch"] == k]
        assert sum(int(r["keep"].sum()) for r in mbs) == mbs[0]["num_tokens"]  # N_k: the kept tokens of k alone
    for r in recorded:
        old, rollout_logp = r["old_logp"].double(), r["rollout_logp"].double()
        # rollout correction recomputed here: w = min(π_train/π_rollout, C), the geometric-mean sequence mask
        torch.testing.assert_close(r["pg_weight"].double(), torch.exp(old - rollout_logp).clamp(max=C),
                                   rtol=1e-6, atol=0)
        for s in r["record"].unique().tolist():
            tokens = r["record"] == s
            geo = math.exp((old - rollout_logp)[tokens].mean().item())
            if min(abs(geo - lo), abs(geo - hi)) > 1e-6:
                assert bool(r["keep"][tokens].all()) == (lo <= geo <= hi) and bool(r["keep"][tokens].any()) == (
                    lo <= geo <= hi)
        expected = design_loss64(r["logp"].double().tolist(), old.tolist(), r["ref_logp"].double().tolist(),
                                 r["advantages"].double().tolist(), r["keep"].tolist(),
                                 r["pg_weight"].double().tolist(), r["num_tokens"], 0.2, 0.28, 3.0, beta)
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        if r["mini_batch"] == 0:  # before any update: the scoring pass IS the training pass's numerics
            assert torch.equal(r["logp"], r["old_logp"]) and r["ppo_kl"] == 0.0 and r["pg_clipfrac"] == 0.0
    assert any(r["pg_clipfrac"] > 0 for r in recorded if r["mini_batch"] > 0)


@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")
def test_conversation_trains_one_row_per_trajectory(tmp_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    run_train("--rollout.condition=conversation", "--train.batch_size=2", "--rollout.group_size=2",
              "--rollout.memory_cap_tokens=8", "--rollout.response_max_tokens=8", "--train.max_steps=1",
              "--train.eval_at_start=false", "--data.eval_limit=2", f"--train.run_dir={run_dir}",
              f"--train.dump_loss_inputs={dump}")
    row = [r for r in metrics(run_dir) if r["kind"] == "train"][0]
    recorded = torch.load(dump / "step_00000001_rank0.pt", weights_only=True)
    kinds = [kind for r in recorded for kind in r["kinds"]]
    assert kinds == ["conversation"] * 4  # 2 problems x 2 samples: one training row each
    assert sum(len(r["logp"]) for r in recorded) == row["response_tokens"] == row["rollout_new_tokens"]
    assert [r for r in metrics(run_dir) if r["kind"] == "eval"][0]["accuracy/conversation"] >= 0
