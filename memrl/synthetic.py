"""The built-in synthetic sharded task ("coin sum"): generated in code, seeded, nothing downloaded.

    question  How many coins do Ann and Cy have?                   (shown at every turn, never in a shard)
    shards    Cy has 4.  |  Bob has 7.  |  Ann has 3.  |  Eve has 5.   (one per turn; Bob and Eve are distractors)
    memory    Cy has 4.  ->  Cy has 4.  ->  Cy has 4. Ann has 3.  ->  Cy has 4. Ann has 3.
              (after each turn: the facts the answer needs, in arrival order, worded as in the shards)
    answer    Ann has 3. Cy has 4. 3+4 = \\boxed{7}          (each asked person's fact looked up, then added)

Each shard gives one person's coins (1-9); the question asks for the total of 2-3 of the people, and 1-2 other
people appear as distractors. No person appears twice. The facts the answer combines arrive in different shards and
the turn-t prompt shows only (question, memory, shard t), so the answer exists at the end only if every memory
rewrite carried every asked fact seen so far. That is what the memory condition measures; the single-turn condition
(the whole problem in one prompt) needs no memory, and the gap between the two is the memory's fault.

The starting policy (scripts/make_synthetic_policy.py) is a supervised warm-up on a FORGETFUL demonstrator: it writes
the memory format, ignores distractors and answers exactly from its memory, but at each memory rewrite it re-copies
an old fact only with a probability that depends on the person (`recall`: Ann 90% ... Hal 20%). So the warm-up
teaches the format and partial memory habits, and leaves memory-keeping imperfect and graded:
  - greedy decoding drops the facts of the people recalled < 50% of the time, keeps the others;
  - sampled memories keep all the asked facts in a fair share of a group (the ones recalled >= 50% often, the rest
    sometimes), so groups have mixed rewards and group-relative RL has signal;
  - the reward comes from the final answer only; the fix (copy one more fact) is in an earlier memory turn: the
    paper's credit-assignment problem (§3.2). The improvement is graded, one person's recall at a time, and can be
    read directly off the final memories (`facts_kept`), not only off the accuracy.
A constant answer scores ~8% (`best_constant_accuracy`): the sum of 2-3 digits has no dominant value.

Splits: a problem belongs to the held-out split iff crc32 of its text is 0 mod 8, so train and eval never share a
problem whatever the seeds. Every function here is a pure function of its arguments (and its seeded rng).
"""
from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass

from memrl.episodes import Episode

EVAL_SEED = 1234  # the held-out set evaluate.py and train.py measure by default
TRAIN_SEED = 0
EMPTY_MEMORY = "Nothing yet."  # what the demonstrator writes while no asked fact has arrived
SOURCE = "synthetic:coin-sum"

# The task's own templates: the paper's Figure 4 structure (question, memory, segment -> updated memory; question,
# memory -> answer) in fewer bytes. Every byte is a token for the byte tokenizer and the prompt is most of what the
# CPU computes: the Figure 4 tags would make each turn ~1.6x longer (warm-up and RL alike). The default preset
# (memrl/config.py) sets these: the starting policy learnt exactly these prompts.
MEMORY_TEMPLATE = "{question}\nMemory: {memory}\nNew: {segment}\nUpdated memory:"
FINAL_TEMPLATE = "{question}\nMemory: {memory}\nAnswer:"
SINGLE_TURN_TEMPLATE = "{question}\nFacts: {problem}\nAnswer:"

Fact = tuple[str, int]  # (person, coins)


@dataclass(frozen=True)
class CoinSum:
    # short names with distinct first letters: the byte that starts a fact in the memory names the person, so
    # "keep this fact or skip it" is a single token for the policy (and for the reader of a trace)
    names: tuple[str, ...] = ("Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal")
    # the forgetful demonstrator's per-rewrite chance of re-copying a person's fact (the warm-up's imperfection):
    # spread around 50% so that greedy keeps some people and drops others, and RL can raise them one at a time
    recall: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
    num_asked: tuple[int, int] = (2, 3)  # inclusive range: the answer combines 2-3 facts
    num_distractors: tuple[int, int] = (1, 2)  # inclusive range: people who appear but are not asked about
    max_coins: int = 9  # 1..9 per person: one digit per fact, a total of at most 27

    def __post_init__(self):
        assert len(set(n[0] for n in self.names)) == len(self.names) >= 2, "names need distinct first letters"
        assert len(self.recall) == len(self.names) and all(0 <= p <= 1 for p in self.recall)
        assert 1 <= self.num_asked[0] <= self.num_asked[1] and 0 <= self.num_distractors[0] <= self.num_distractors[1]
        assert self.num_asked[1] + self.num_distractors[1] <= len(self.names) and 1 <= self.max_coins <= 9

    def recall_of(self, name: str) -> float:
        return self.recall[self.names.index(name)]


# ----------------------------------------------------------------------------- text

def question_text(asked: list[str]) -> str:
    """How many coins do Ann and Cy have? / How many coins do Ann, Cy and Dee have?"""
    people = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    return f"How many coins do {people} have?"


def shard_text(fact: Fact) -> str:
    return f"{fact[0]} has {fact[1]}."


def memory_text(facts: list[Fact]) -> str:
    """"Cy has 4. Ann has 3." (arrival order, each fact worded as its shard: keeping a fact is copying a span, which
    a tiny model learns far sooner than rewording it), or EMPTY_MEMORY."""
    return " ".join(shard_text(f) for f in facts) if facts else EMPTY_MEMORY


def answer_text(asked: list[str], facts: list[Fact]) -> str:
    """An answer turn's demonstration: for each asked person, in the question's order, their fact looked up in
    `facts` (the memory, or the whole problem) and restated, then the sum boxed ("Ann has 3. Cy has 4. 3+4 =
    \\boxed{7}"). A person without a fact is left out, so the answer is right only if every asked fact is there under
    its person's name: a memory that keeps a number under the wrong name does not score. Looking facts up by name
    also makes the single-turn and full-history answers (pick the asked facts out of all of them, then add) the two
    skills the memory turns already teach: find a person's fact and copy it, add digits."""
    found = [next(f for f in facts if f[0] == name) for name in asked if any(f[0] == name for f in facts)]
    if not found:
        return "\\boxed{0}"
    terms = "+".join(str(c) for _, c in found)
    return f"{memory_text(found)} {terms} = \\boxed{{{sum(c for _, c in found)}}}"


_QUESTION = re.compile(r"How many coins do (.+) have\?")
_SHARD = re.compile(r"([A-Z][a-z]*) has (\d+)\.")
_MEMORY_FACT = re.compile(r"([A-Z][a-z]*) has (\d+)")


def parse_episode(ep: Episode) -> tuple[list[str], list[Fact]]:
    """Inverse of make_episodes' text: (asked names, facts in shard order). Raises ValueError on anything else."""
    m = _QUESTION.fullmatch(ep.question)
    if not m:
        raise ValueError(f"not a coin-sum question: {ep.question!r}")
    asked = re.split(r", | and ", m.group(1))
    facts = []
    for s in ep.shards:
        f = _SHARD.fullmatch(s)
        if not f:
            raise ValueError(f"not a coin-sum shard: {s!r}")
        facts.append((f.group(1), int(f.group(2))))
    return asked, facts


def parse_memory(memory: str) -> list[Fact]:
    """The (person, coins) pairs a memory states, in order; anything else in it is ignored."""
    return [(n, int(c)) for n, c in _MEMORY_FACT.findall(memory)]


def facts_kept(ep: Episode, memory: str) -> tuple[int, int]:
    """(asked facts the final memory states correctly, asked facts): the graded quantity RL should raise."""
    asked, facts = parse_episode(ep)
    held = set(parse_memory(memory))
    needed = [f for f in facts if f[0] in asked]
    return sum(f in held for f in needed), len(needed)


# ----------------------------------------------------------------------------- problems

def is_eval_problem(question: str, shards: list[str]) -> bool:
    return zlib.crc32("|".join([question, *shards]).encode()) % 8 == 0


def sample_problem(rng: random.Random, task: CoinSum) -> tuple[list[str], list[Fact]]:
    """(asked names in the task's order, facts in shard order)."""
    k, d = rng.randint(*task.num_asked), rng.randint(*task.num_distractors)
    people = rng.sample(task.names, k + d)
    asked = sorted(people[:k], key=task.names.index)
    rng.shuffle(people)
    return asked, [(p, rng.randint(1, task.max_coins)) for p in people]


def make_episodes(n: int, split: str = "train", seed: int = TRAIN_SEED, task: CoinSum = CoinSum(),
                  distinct: bool = True) -> list[Episode]:
    """n problems of `split` ("train" | "eval"), deterministic in (split, seed, task); all different unless
    distinct=False (a stream drawn with replacement, e.g. for the warm-up)."""
    assert split in ("train", "eval"), split
    rng = random.Random(f"coin-sum/{split}/{seed}")
    episodes, seen, misses = [], set(), 0
    while len(episodes) < n:
        asked, facts = sample_problem(rng, task)
        question, shards = question_text(asked), [shard_text(f) for f in facts]
        key = "|".join([question, *shards])
        if is_eval_problem(question, shards) != (split == "eval") or (distinct and key in seen):
            misses += 1
            if misses > 100 * n + 10_000:
                raise ValueError(f"cannot find {n} distinct {split} problems of {task}: ask for fewer")
            continue
        seen.add(key)
        answer = sum(c for p, c in facts if p in asked)
        episodes.append(Episode(id=f"coin-sum-{split}-{seed}-{len(episodes)}", question=question, shards=shards,
                                answer=str(answer), metadata={"source": SOURCE, "split": split,
                                                              "reward_kind": "gsm8k"}))
    return episodes


def best_constant_accuracy(episodes: list[Episode]) -> tuple[str, float]:
    """The answer that is right most often on `episodes`, and how often: the floor a trivial policy reaches."""
    answer, hits = Counter(ep.answer for ep in episodes).most_common(1)[0]
    return answer, hits / len(episodes)


# ----------------------------------------------------------------------------- demonstrations (the warm-up)

def forgetful_memories(ep: Episode, rng: random.Random, task: CoinSum = CoinSum()) -> list[list[Fact]]:
    """The forgetful demonstrator's memory after each shard: every old fact re-copied with its person's recall
    (independently at every rewrite), the shard's fact appended when its person is asked, distractors ignored."""
    asked, facts = parse_episode(ep)
    memory: list[Fact] = []
    out = []
    for fact in facts:
        memory = [f for f in memory if rng.random() < task.recall_of(f[0])]
        if fact[0] in asked:
            memory = memory + [fact]
        out.append(memory)
    return out


def perfect_memories(ep: Episode) -> list[list[Fact]]:
    """What a perfect memory holds after each shard: every asked fact seen so far."""
    asked, facts = parse_episode(ep)
    return [[f for f in facts[: t + 1] if f[0] in asked] for t in range(len(facts))]
