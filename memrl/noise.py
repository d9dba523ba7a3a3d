"""Noise shards (paper §3.1): WikiText passages placed among a sharded episode's shards.

    passages = load_passages("../shared/data/wikitext2/wiki.test.raw")
    episode_dict = make_variant(episode_dict, "mixed", passages, seed=0)      # data_tools.noise writes files of these
    episodes = noisy_episodes(episodes, passages, "noisy", seed=0, n_noise=2)  # train.py / evaluation, on the fly

Variants (metadata["variant"]; metadata["noise_positions"] lists the 0-based noise shard indices):
  sharded        the episode unchanged, no noise (the control, in the same format)
  full_question  one randomly placed shard holds the whole problem (metadata["problem"]); the others
                 are noise. Total shards = the episode's shard count (at least 2) or total_shards.
  mixed          the problem shards, in order, interleaved with round(mixed_ratio * #shards) noise
                 shards at uniformly random positions
  noisy          evaluation: n noise shards after EVERY problem shard, i.e. between consecutive turns
                 and between the last shard and the final answer turn (metadata["noise_per_gap"] = n)
The question is never changed. Problem shards keep their text and order in every variant.

Noise passages: the paragraphs of a WikiText file (.raw is CRLF: read in text mode, "\\r" stripped;
headings " = Title = " and blank lines skipped), lightly detokenised ("1 @,@ 000" -> "1,000",
" , " -> ", "), cut at sentence boundaries (memrl/sentences.py) into passages of min_words..max_words
words. Each passage remembers its 1-based line number (metadata["noise_sources"]).

Seeding: every episode draws from random.Random(f"{seed}|{variant}|{id}"), a string seed hashed
with SHA-512, so results do not depend on file order, --limit, resuming or PYTHONHASHSEED.

Why here and not in data_tools: train.py (data.noise_variant) and evaluation (data.eval_noise_shards) place noise
at run time, and memrl never imports data_tools (data_tools is built on memrl: README, "One RL step, file by
file"). data_tools.noise is the command line that writes these variants to files.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memrl.episodes import Episode
from memrl.errors import DataError
from memrl.sentences import split_sentences

VARIANTS = ("sharded", "full_question", "mixed", "noisy")
TRAIN_VARIANTS = VARIANTS[:3]  # data.noise_variant; "noisy" is the evaluation's (data.eval_noise_shards)
_HEADING = re.compile(r"^\s*=(?:\s*=)*\s.*\s=(?:\s*=)*\s*$")


@dataclass(frozen=True)
class Passage:
    text: str
    line: int  # 1-based line in the WikiText file


def detokenize(line: str) -> str:
    text = re.sub(r" @([-,.])@ ", r"\1", line.strip())
    text = re.sub(r" ([.,;:!?)\]}])", r"\1", text)
    text = re.sub(r"([(\[{]) ", r"\1", text)
    return re.sub(r"(?<=\w) '(s|t|re|ve|m|ll|d)\b", r"'\1", text)  # "don 't", "Teddy 's"


def load_passages(path: str | Path, min_words: int = 20, max_words: int = 100) -> list[Passage]:
    assert 0 < min_words <= max_words
    passages = []
    with open(path, encoding="utf-8", newline=None) as f:  # universal newlines: CRLF -> "\n"
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n").replace("\r", "")
            if not line.strip() or _HEADING.match(line):
                continue
            text = detokenize(line)
            group: list[str] = []
            for s, e in split_sentences(text, protect_math=False) + [(len(text), len(text))]:
                sentence = text[s:e]  # the empty sentinel at the end flushes the last group
                if group and (not sentence or len(" ".join(group + [sentence]).split()) > max_words):
                    if min_words <= len(" ".join(group).split()) <= max_words:  # a lone giant sentence is skipped
                        passages.append(Passage(" ".join(group), line_no))
                    group = []
                if sentence:
                    group.append(sentence)
    if not passages:
        raise DataError(f"{path}: no WikiText passages of {min_words}..{max_words} words")
    return passages


def _place(problem_shards: list[str], noise: list[Passage], noise_positions: list[int]) -> tuple[list[str], list[int]]:
    """Merge problem shards (in order) and noise at the given final positions."""
    total = len(problem_shards) + len(noise)
    at = set(noise_positions)
    it_shard, it_noise = iter(problem_shards), iter(noise)
    shards = [next(it_noise).text if i in at else next(it_shard) for i in range(total)]
    return shards, sorted(at)


def make_variant(episode: dict, variant: str, passages: list[Passage], seed: int = 0, n_noise: int = 2,
                 mixed_ratio: float = 1.0, total_shards: int | None = None) -> dict:
    """A new episode dict; the input is not modified."""
    assert variant in VARIANTS, variant
    rng = random.Random(f"{seed}|{variant}|{episode['id']}")
    shards, meta = list(episode["shards"]), dict(episode.get("metadata", {}))
    if variant == "sharded":
        positions, noise = [], []
    elif variant == "full_question":
        problem = meta.get("problem") or " ".join(shards + [episode["question"]])
        total = total_shards or max(2, len(shards))
        noise = rng.sample(passages, total - 1)
        problem_at = rng.randrange(total)
        shards, positions = _place([problem], noise, [i for i in range(total) if i != problem_at])
    elif variant == "mixed":
        k = max(1, round(mixed_ratio * len(shards)))
        noise = rng.sample(passages, k)
        shards, positions = _place(shards, noise, rng.sample(range(len(shards) + k), k))
    else:  # noisy: n after every problem shard
        noise = rng.sample(passages, n_noise * len(shards))
        positions = [i * (n_noise + 1) + 1 + j for i in range(len(shards)) for j in range(n_noise)]
        shards, positions = _place(shards, noise, positions)
        meta["noise_per_gap"] = n_noise
    by_position = dict(zip(positions, noise))  # _place consumed noise in position order
    meta.update(variant=variant, noise_positions=positions, noise_seed=seed,
                noise_sources=[by_position[p].line for p in positions] if noise else [])
    return {**episode, "shards": shards, "metadata": meta}


def problem_shards(episode: dict) -> list[str]:
    """The non-noise shards, in order (for checks: they must equal the source episode's shards)."""
    noise = set(episode.get("metadata", {}).get("noise_positions", []))
    return [s for i, s in enumerate(episode["shards"]) if i not in noise]


def noisy_episodes(episodes: Sequence[Episode], passages: list[Passage], variant: str, seed: int = 0,
                   n_noise: int = 2) -> list[Episode]:
    """make_variant over Episode objects: train.py's training variants (data.noise_variant) and the noisy
    evaluation (variant "noisy", n_noise = data.eval_noise_shards)."""
    return [Episode(**make_variant(ep.to_json(), variant, passages, seed=seed, n_noise=n_noise)) for ep in episodes]
