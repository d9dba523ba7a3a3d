"""WikiText noise shards and the noise variants of a sharded episode file (paper section 3.1).

Variants (metadata["variant"]; metadata["noise_positions"] lists the 0-based noise shard indices):
  sharded        the episode unchanged, no noise (the control, in the same format)
  full_question  one randomly placed shard holds the whole problem (metadata["problem"]); the others
                 are noise. Total shards = the episode's shard count (at least 2) or --total-shards.
  mixed          the problem shards, in order, interleaved with round(mixed_ratio * #shards) noise
                 shards at uniformly random positions
  noisy          evaluation: n noise shards after EVERY problem shard, i.e. between consecutive turns
                 and between the last shard and the final answer turn (metadata["noise_per_gap"] = n)
The question is never changed. Problem shards keep their text and order in every variant.

Noise passages: the paragraphs of a WikiText file (.raw is CRLF: read in text mode, "\\r" stripped;
headings " = Title = " and blank lines skipped), lightly detokenised ("1 @,@ 000" -> "1,000",
" , " -> ", "), cut at sentence boundaries into passages of min_words..max_words words. Each
passage remembers its 1-based line number (metadata["noise_sources"]).

Seeding: every episode draws from random.Random(f"{seed}|{variant}|{id}"), a string seed hashed
with SHA-512, so results do not depend on file order, --limit, resuming or PYTHONHASHSEED.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.runner import Outcome, run_resumable
from data_tools.schema import DataError, read_episodes
from data_tools.sentences import split_sentences

VARIANTS = ("sharded", "full_question", "mixed", "noisy")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.noise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="sharded episode JSONL (data_tools.shard output)")
    p.add_argument("--wikitext", required=True, help="e.g. ../shared/data/wikitext2/wiki.test.raw")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--out", required=True)
    p.add_argument("--n-noise", type=int, default=2, help="noisy: noise shards after every problem shard")
    p.add_argument("--mixed-ratio", type=float, default=1.0, help="mixed: noise shards per problem shard")
    p.add_argument("--total-shards", type=int, default=None, help="full_question: shards per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-min-words", type=int, default=20)
    p.add_argument("--noise-max-words", type=int, default=100)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    try:
        episodes = read_episodes(args.input)[: args.limit]
        passages = load_passages(args.wikitext, args.noise_min_words, args.noise_max_words)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def process(batch: list[dict]) -> list[Outcome]:
        out = []
        for ep in batch:
            try:
                new = make_variant(ep, args.variant, passages, args.seed, args.n_noise, args.mixed_ratio,
                                   args.total_shards)
            except ValueError as e:  # e.g. more noise requested than passages exist
                out.append(Outcome(ep["id"], reason="noise_error", detail=str(e)))
                continue
            ok = args.variant == "full_question" or problem_shards(new) == ep["shards"]
            out.append(Outcome(ep["id"], episode=new) if ok else
                       Outcome(ep["id"], reason="check:noise_placement", detail="problem shards changed"))
        return out

    try:
        summary = run_resumable([(ep["id"], ep) for ep in episodes], process, args.out, batch_size=256,
                                desc=f"noise {args.variant}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
