"""PPO mini-batches: one RL step's batch split by problem into `algo.mini_batches` optimizer steps (DESIGN §3.6).

    rows [records]  --split_by_problem-->  M lists of records  --pack_turns each-->  M lists of micro-batches

MemAgent (the verl recipe the paper builds on) makes 16 optimizer steps per RL step; old log-probs come from ONE
no-grad scoring pass before the first update, so the first mini-batch trains at ratio 1 and later ones see the
policy move: that is where clip-higher and the dual clip act (with one mini-batch the ratio is exactly 1).

Invariants
- By problem: all G samples and all turns (or the one conversation row) of a problem land in the same mini-batch,
  so a group's advantages, computed together, are also trained together.
- Shuffled, not turn-ordered: the problems of the step are permuted with a seed derived from (seed, step); the
  mini-batch of a problem depends only on its GLOBAL index in the step's batch (rank * problems_per_rank + its group
  in the rank's slice), so N ranks split exactly as one process would, and a resumed run splits as the original.
- Within a mini-batch, records follow the shuffled problem order, then trajectory, then turn: a deterministic order,
  so the micro-batches packed for the scoring pass and for the training pass are the same (bitwise equal logp).
- Token-mean per mini-batch: its loss divides by ITS global response-token count (summed over ranks), so each
  optimizer step is an exact token-mean over its own tokens (train.py).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from memrl.algo import TurnRecord
from memrl.rollout import derive_seed


def problem_positions(batch_size: int, seed: int, step: int) -> list[int]:
    """position[p]: where global problem p of this step sits in the step's shuffled order."""
    order = list(range(batch_size))
    random.Random(derive_seed(seed, "mini-batches", step)).shuffle(order)
    position = [0] * batch_size
    for pos, p in enumerate(order):
        position[p] = pos
    return position


def split_by_problem(records: Sequence[TurnRecord], global_problem: Sequence[int], batch_size: int,
                     mini_batches: int, seed: int, step: int) -> list[list[TurnRecord]]:
    """records (this rank's) -> `mini_batches` lists; global_problem[i] in [0, batch_size) is record i's problem.
    Mini-batch k holds the problems at shuffled positions [k·B/M, (k+1)·B/M): B/M problems each over all ranks."""
    assert 1 <= mini_batches <= batch_size, (mini_batches, batch_size)
    assert len(records) == len(global_problem)
    position = problem_positions(batch_size, seed, step)
    out: list[list[TurnRecord]] = [[] for _ in range(mini_batches)]
    order = sorted(range(len(records)), key=lambda i: (position[global_problem[i]], records[i].trajectory_id,
                                                       records[i].turn_index))
    for i in order:
        out[position[global_problem[i]] * mini_batches // batch_size].append(records[i])
    return out
