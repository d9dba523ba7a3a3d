"""memrl/evaluation.py and evaluate.py: accuracy per condition checked against a scripted policy; the CLI end to end on a tiny model; plots."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memrl.config import Config
from memrl.episodes import Episode, write_episodes
from memrl.errors import CheckpointError
from memrl.evaluation import evaluate_policy, lic_drop
from memrl.generate import Completion
from memrl.paths import resolve_policy
from memrl.report import markdown_table
from memrl.rollout import CONDITIONS
from tests.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


class ScriptedGenerator:
    """Answers every final turn with a fixed text per question; memory turns write "noted"."""

    window = 10**6  # the conversation condition checks a chat against the window

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tok, self.answers, self.last_stats = tokenizer, answers, {}

    def free(self, handles):  # the conversation condition frees retained K/V (none here)
        pass

    def generate(self, prompts, params, **continuation):
        out = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            text = self.tok.decode(ids)
            question = text.split("<question> ")[1].split(" </question>")[0]
            reply = self.answers[question] if "Your final answer:" in text else "noted"
            tokens = self.tok.encode(reply) + [max(self.tok.stop_ids)]
            out += [Completion(i, j, tokens, [0.0] * len(tokens), "stop") for j in range(p.n)]
        return out


def test_accuracy_and_lic_drop_against_a_scripted_policy(tmp_path):
    from memrl.tokenizer import Tokenizer, make_byte_tokenizer

    tok = Tokenizer.from_pretrained(make_byte_tokenizer(tmp_path / "tok"))
    eps = [Episode(f"e{i}", f"Question {i}?", ["a.", "b."], str(i)) for i in range(4)]
    answers = {f"Question {i}?": f"\\boxed{{{i if i < 3 else 99}}}" for i in range(4)}  # 3 of 4 right
    acc = evaluate_policy(ScriptedGenerator(tok, answers), tok, eps, Config(), CONDITIONS,
                          batch_size=3)
    for c in CONDITIONS:
        assert acc[c]["accuracy"] == 0.75 and acc[c]["n"] == 4
    # sampled evaluation: k trajectories per episode; the scripted policy answers the same whatever the seed
    sampled = evaluate_policy(ScriptedGenerator(tok, answers), tok, eps, Config(), ("memory",),
                              batch_size=3, samples=3)["memory"]
    assert sampled["sampled_accuracy"] == 0.75 and sampled["samples"] == 3 and "facts_kept" not in sampled
    acc["memory"]["accuracy"] = 0.25
    assert lic_drop(acc) == {"full_history": 0.0, "conversation": 0.0, "memory": 0.5}
    table = markdown_table({"ckpt": {"conditions": acc, "lic_drop": lic_drop(acc)}})
    assert "| ckpt | 0.750 | 0.750 | 0.750 | 0.250 | +0.000 | +0.000 | +0.500 |" in table


def test_cli_end_to_end_on_a_tiny_model(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "qwen3")
    data = tmp_path / "eps.jsonl"
    write_episodes(data, [Episode(f"e{i}", "How many?", [f"A gets {i}.", "B gets 1."], str(i)) for i in range(3)])
    out, bar = tmp_path / "res.json", tmp_path / "bar.png"
    env = dict(os.environ, MEMRL_KERNELS="torch")
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"--checkpoint={ckpt}", f"--checkpoint={ckpt}", f"--data.eval_path={data}",
         "--rollout.memory_cap_tokens=4", "--rollout.response_max_tokens=4", f"--out={out}", f"--bar={bar}",
         f"--conditions={','.join(CONDITIONS)}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{ckpt} on eps (memory, n=3)" in proc.stderr  # the progress bar says what it evaluates
    assert ("| checkpoint | single_turn | full_history | conversation | memory | LiC drop (full_history) | "
            "LiC drop (conversation) | LiC drop (memory) |") in proc.stdout
    res = json.loads(out.read_text())
    (r,) = res["results"]["eps"].values()  # the same checkpoint twice is one entry
    assert set(r["conditions"]) == set(CONDITIONS) and all(a["n"] == 3 for a in r["conditions"].values())
    assert all(0 <= a["accuracy"] <= 1 for a in r["conditions"].values())
    assert bar.stat().st_size > 1000


def test_plot_of_training_curves(tmp_path):
    rows = [{"step": 0, "kind": "eval", "accuracy/memory": 0.2}]
    rows += [{"step": s, "kind": "train", "reward": s / 10, "kl": 0.01 * s, "ppo_kl": 0.0, "entropy": 1 - s / 20,
              "memory_tokens": 10, "answer_tokens": 9, "step_s": 2.0} for s in range(1, 6)]
    rows.append({"step": 5, "kind": "eval", "accuracy/memory": 0.8})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "evaluate.py", "--plot", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_resolve_policy(tmp_path):
    assert resolve_policy("") == REPO / "assets" / "synthetic-policy"
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_policy(str(tmp_path))  # neither a checkpoint nor a run directory with checkpoints
