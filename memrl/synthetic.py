"""The built-in synthetic sharded task ("coin tally"): generated in code, seeded, nothing downloaded.

    question  How many coins does Bob have?                      (withheld from the shards, shown at every turn)
    shards    Bob gets 3.  |  Ann gets 2.  |  Bob gets 1.         (one per turn)
    answer    4                                                  (the final turn answers \\boxed{4})

Each shard gives one of four people 1-3 coins; the question asks about one of them, who gets coins in at least one
shard. Memory matters: the turn-t prompt shows only (question, memory, shard t), so the answer exists only if the
memory carried the running total of the asked person across shards.

The starting policy (scripts/make_synthetic_policy.py) is pretrained on demonstrations that mix two note-taking
habits, on purpose:
    "add"        memory "Bob has 7."  the running total of the asked person        -> always right
    "overwrite"  memory "Bob got 3."  only the asked person's latest amount        -> right only when the person
                                                                                      appears in exactly one shard
The mix is `add_fraction` : 1 - add_fraction (default 35:65) and a demonstration keeps one habit for all its turns,
so the habit is chosen at the first memory turn and followed afterwards (the memory's wording shows it). Greedy
decoding therefore starts on the losing habit (held-out memory accuracy ~25%: the chance that the person appears
once) while samples are diverse (about half of them succeed): group-relative RL has signal, and its only way up is
to learn, from the final answer's reward alone, to write a better memory at the first turn. That is the paper's
credit-assignment problem (§3.2) in miniature: the reward is on the answer, the fix is in a memory turn.

Splits: a problem belongs to the held-out split iff crc32 of its text is 0 mod 8, so train and eval never share
a problem whatever the seeds. Every function here is a pure function of its seed.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from memrl.episodes import Episode

HABITS = ("add", "overwrite")
EVAL_SEED = 1234  # the held-out set evaluate.py and train.py measure by default
TRAIN_SEED = 0

SOURCE = "synthetic:coin-tally"  # metadata.source of every episode of this task


@dataclass(frozen=True)
class CoinTally:
    names: tuple[str, ...] = ("Ann", "Bob", "Cy", "Dee")  # short names: byte-level prompts stay short
    num_shards: tuple[int, int] = (3, 3)  # inclusive range of shards per problem (3 memory turns + the final turn)
    p_target: float = 0.65  # chance that a shard is about the asked person: ~25% of problems mention them once
    max_amount: int = 3  # coins per shard, 1..3: totals stay one digit (1-9), easy arithmetic for a tiny model
    add_fraction: float = 0.35  # demonstrations using the "add" habit (the rest "overwrite")

    def __post_init__(self):
        assert 1 <= self.num_shards[0] <= self.num_shards[1] and 0 < self.p_target < 1 and self.max_amount >= 1
        assert len(set(self.names)) == len(self.names) >= 2 and 0 <= self.add_fraction <= 1


def question_text(name: str) -> str:
    return f"How many coins does {name} have?"


def shard_text(name: str, amount: int) -> str:
    return f"{name} gets {amount}."


def is_eval_problem(question: str, shards: list[str]) -> bool:
    return zlib.crc32("|".join([question, *shards]).encode()) % 8 == 0


def sample_problem(rng: random.Random, task: CoinTally) -> tuple[str, list[tuple[str, int]]]:
    """(target name, [(name, amount), ...]) with the target in at least one shard."""
    target = rng.choice(task.names)
    others = [n for n in task.names if n != target]
    while True:
        k = rng.randint(*task.num_shards)
        events = [(target if rng.random() < task.p_target else rng.choice(others), rng.randint(1, task.max_amount))
                  for _ in range(k)]
        if any(n == target for n, _ in events):
            return target, events


def make_episodes(n: int, split: str = "train", seed: int = TRAIN_SEED, task: CoinTally = CoinTally(),
                  distinct: bool = True) -> list[Episode]:
    """n problems of `split` ("train" | "eval"), deterministic in (split, seed, task); all different unless
    distinct=False (a stream drawn with replacement, e.g. for pretraining). The default task has ~3,500 training
    and ~500 held-out problems."""
    assert split in ("train", "eval"), split
    rng = random.Random(f"coin-tally/{split}/{seed}")
    episodes, seen, misses = [], set(), 0
    while len(episodes) < n:
        target, events = sample_problem(rng, task)
        question, shards = question_text(target), [shard_text(nm, a) for nm, a in events]
        key = "|".join([question, *shards])
        if is_eval_problem(question, shards) != (split == "eval") or (distinct and key in seen):
            misses += 1
            if misses > 100 * n + 10_000:
                raise ValueError(f"cannot find {n} distinct {split} problems of {task}: ask for fewer")
            continue
        seen.add(key)
        answer = sum(a for nm, a in events if nm == target)
        episodes.append(Episode(id=f"coin-tally-{split}-{seed}-{len(episodes)}", question=question, shards=shards,
                                answer=str(answer), metadata={"source": SOURCE, "split": split,
                                                              "reward_kind": "gsm8k"}))
    return episodes


def parse_episode(ep: Episode) -> tuple[str, list[tuple[str, int]]]:
    """Inverse of make_episodes' text: (target, events). Raises ValueError on anything else."""
    prefix, suffix = "How many coins does ", " have?"
    if not (ep.question.startswith(prefix) and ep.question.endswith(suffix)):
        raise ValueError(f"not a coin-tally question: {ep.question!r}")
    target = ep.question[len(prefix):-len(suffix)]
    events = []
    for s in ep.shards:
        name, verb, amount = s.rstrip(".").split(" ")
        if verb != "gets":
            raise ValueError(f"not a coin-tally shard: {s!r}")
        events.append((name, int(amount)))
    return target, events


# ----------------------------------------------------------------------------- demonstrations (for the SFT script)

def memory_text(target: str, events: list[tuple[str, int]], habit: str) -> str:
    """The memory a demonstrator with `habit` writes after seeing `events` (the shards so far)."""
    mine = [a for nm, a in events if nm == target]
    if habit == "add":
        return f"{target} has {sum(mine)}."
    if habit == "overwrite":
        return f"{target} got {mine[-1] if mine else 0}."
    raise ValueError(habit)


def answer_from_memory(memory: str) -> str:
    """The final-turn demonstration: the number in the memory, boxed (both habits answer what they wrote)."""
    number = memory.rstrip(".").split(" ")[-1]
    return f"\\boxed{{{number}}}"


def demonstration(ep: Episode, habit: str) -> tuple[list[str], str]:
    """(memory after each shard, final answer) of one demonstrated trajectory."""
    target, events = parse_episode(ep)
    memories = [memory_text(target, events[: t + 1], habit) for t in range(len(events))]
    return memories, answer_from_memory(memories[-1])
