"""The default run learns: `python train.py` (no arguments but the run directory) on the shipped starting policy
raises held-out memory accuracy, sampled and greedy, by at least 20 points over one seed (README, "The default run").

Slow (the whole default run: minutes on 2 CPU cores): runs with MEMRL_SLOW=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "assets" / "synthetic-policy"


@pytest.mark.slow
@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")
def test_default_run_raises_memory_accuracy(tmp_path):
    env = dict(os.environ, MEMRL_KERNELS="torch")  # the kernels' torch references, as a CPU run uses them
    proc = subprocess.run([sys.executable, "train.py", f"--train.run_dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and len(evals) >= 4  # before training, then every few steps
    sampled = last["sampled_accuracy/memory"] - first["sampled_accuracy/memory"]
    greedy = last["accuracy/memory"] - first["accuracy/memory"]
    assert sampled >= 0.20, f"sampled memory accuracy {first['sampled_accuracy/memory']:.3f} -> " \
                            f"{last['sampled_accuracy/memory']:.3f}"
    assert greedy >= 0.20, f"greedy memory accuracy {first['accuracy/memory']:.3f} -> {last['accuracy/memory']:.3f}"
    # the graded behaviour behind it: the final memories keep more of the asked facts
    assert last["sampled_facts_kept/memory"] > first["sampled_facts_kept/memory"]
