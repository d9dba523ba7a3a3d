"""How many RL steps a run can reach in the seconds it has left, from its own metrics so far (a leased GPU machine
is held for a fixed time: scripts/h200_session.sh stops a run at a checkpoint and resumes it to this step count).

    python scripts/steps_that_fit.py RUN/metrics.jsonl SECONDS_LEFT STEPS_DONE [--eval-every N] [--restart-s S]

Prints one integer: STEPS_DONE + the steps that fit, where a step costs the mean step time of the run's train rows
after the first (the first compiles and captures) and every eval_every-th step also costs the mean eval time; the
restart (model load, compile, capture) is charged once. Never less than STEPS_DONE.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def steps_that_fit(rows: list[dict], seconds_left: float, steps_done: int, eval_every: int, restart_s: float) -> int:
    train = [r["step_s"] for r in rows if r.get("kind") == "train"][1:]
    evals = [r["eval_s"] for r in rows if r.get("kind") == "eval" and "eval_s" in r]
    if not train:
        return steps_done
    step_s = sum(train) / len(train)
    eval_s = sum(evals) / len(evals) if evals else 0.0
    per_step = step_s + (eval_s / eval_every if eval_every else 0.0)
    budget = seconds_left - restart_s - eval_s  # the final evaluation runs whatever the step count
    return steps_done + max(0, math.floor(budget / per_step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path)
    ap.add_argument("seconds_left", type=float)
    ap.add_argument("steps_done", type=int)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--restart-s", type=float, default=75.0, help="model load + compile + capture after a resume")
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.metrics.read_text().splitlines() if line.strip()]
    print(steps_that_fit(rows, a.seconds_left, a.steps_done, a.eval_every, a.restart_s))


if __name__ == "__main__":
    main()
