"""Episode data: one sharded problem per JSONL line, loaded and validated with file:line error reports.

This file is the one definition of a valid line (`validate_record`): data_tools (the writer) validates through it too,
and data_tools/schema.py documents every metadata key it writes. The schema:

    {"id": "gsm8k-train-17",                      # str, unique within the file
     "question": "How much does she pay?",        # str: the core question, shown at every turn
     "shards": ["Ann buys 3 pens.", "..."],       # non-empty list of non-empty str, revealed one per turn
     "answer": "18",                              # str: the reference answer
     "metadata": {"noise_positions": [2], ...}}   # optional dict

Metadata keys read here (others are carried through untouched; see data_tools/schema.py for all of them):
    noise_positions: list[int]  0-based indices into `shards` of the WikiText noise shards (validated)
    answers:         list[str]  every reference answer (long-document QA: the score is the max F1 over them)
    problem:         str        the original single-turn problem (the single-turn condition shows it)
    reward_kind:     str        "math" | "gsm8k" | "qa": overrides the run's data.reward_kind for this episode

Invariants of a loaded Episode: every field present, of the right type and non-empty; at most `max_shards` shards and
every shard at most `max_shard_tokens` tokens (when those limits are given); noise_positions distinct and in range;
ids unique. Loading reports every problem it finds (up to `max_errors`) as `path:line: field 'name': what is wrong`,
then raises once (the first problem is the error's line, the others its details), so a bad file is fixed in one pass
instead of deep inside a training step. Lines are decoded one by one: a byte that is not UTF-8 is a problem of its
line, not an anonymous UnicodeDecodeError.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from memrl.atomic import atomic_path
from memrl.errors import DataError

FIELDS = ("id", "question", "shards", "answer", "metadata")
REQUIRED = ("id", "question", "shards", "answer")


@dataclass
class Episode:
    id: str
    question: str
    shards: list[str]
    answer: str
    metadata: dict = field(default_factory=dict)

    @property
    def noise_positions(self) -> list[int]:
        return list(self.metadata.get("noise_positions", []))

    @property
    def references(self) -> list[str]:
        """All reference answers: metadata.answers when given (QA), else [answer]."""
        return list(self.metadata.get("answers") or [self.answer])

    @property
    def problem(self) -> str:
        """The whole problem in one text (single-turn condition): metadata.problem, else the problem shards (noise
        left out) followed by the question."""
        if self.metadata.get("problem"):
            return self.metadata["problem"]
        noise = set(self.noise_positions)
        return " ".join([s for i, s in enumerate(self.shards) if i not in noise] + [self.question])

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "shards": list(self.shards), "answer": self.answer,
                "metadata": dict(self.metadata)}


class EpisodeFormatError(DataError):
    """Raised by load_episodes; `.problems` holds every `path:line: message` found (up to max_errors)."""

    def __init__(self, problems: list[str], total: int):
        self.problems = problems
        more = [f"... and {total - len(problems)} more"] if total > len(problems) else []
        count = f" ({total} problem(s) in this file, listed below)" if total > 1 else ""
        super().__init__(problems[0] + count, details=problems[1:] + more)


REWARD_KINDS = ("math", "gsm8k", "qa")  # how memrl.reward.score grades an episode (metadata.reward_kind)


def _is_nonempty_str(x) -> bool:
    return isinstance(x, str) and x.strip() != ""


def validate_record(
    obj,
    *,
    max_shards: int | None = None,
    max_shard_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[str]:
    """Every problem with one decoded JSON record as "field 'name': what is wrong" (empty list = valid).

    The one definition of a valid episode: memrl's loader reports all of a line's problems, data_tools'
    writer (data_tools/schema.py validate_episode) raises on the first; both prefix `path:line: `.
    """
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"field {key!r}: missing" for key in REQUIRED if key not in obj]
    problems += [f"field {key!r}: unknown top-level field (allowed: {list(FIELDS)}; put extra data under 'metadata')"
                 for key in sorted(set(obj) - set(FIELDS))]
    for key in ("id", "question", "answer"):
        if key in obj and not isinstance(obj[key], str):
            problems.append(f"field {key!r}: expected a string, got {type(obj[key]).__name__}")
        elif key in obj and not obj[key].strip():
            problems.append(f"field {key!r}: empty")

    shards = obj.get("shards")
    if "shards" in obj:
        if not isinstance(shards, list):
            problems.append(f"field 'shards': expected a list of strings, got {type(shards).__name__}")
            shards = None
        elif not shards:
            problems.append("field 'shards': empty list")
        else:
            for i, s in enumerate(shards):
                if not isinstance(s, str):
                    problems.append(f"field 'shards[{i}]': expected a string, got {type(s).__name__}")
                elif not s.strip():
                    problems.append(f"field 'shards[{i}]': empty")
                elif max_shard_tokens is not None:
                    n = count_tokens(s)
                    if n > max_shard_tokens:
                        problems.append(f"field 'shards[{i}]': {n} tokens > max_shard_tokens={max_shard_tokens}")
            if max_shards is not None and len(shards) > max_shards:
                problems.append(f"field 'shards': {len(shards)} shards > max_shards={max_shards}")

    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        problems.append(f"field 'metadata': expected an object, got {type(meta).__name__}")
    else:
        problems += _validate_metadata(meta, shards)
    return problems


def _validate_metadata(meta: dict, shards) -> list[str]:
    problems = []
    if "answers" in meta and (not isinstance(meta["answers"], list) or not meta["answers"]
                              or not all(_is_nonempty_str(a) for a in meta["answers"])):
        problems.append("field 'metadata.answers': expected a non-empty list of non-empty strings")
    for key in ("problem", "reward_kind"):
        if key in meta and not _is_nonempty_str(meta[key]):
            problems.append(f"field 'metadata.{key}': expected a non-empty string")
    if _is_nonempty_str(meta.get("reward_kind")) and meta["reward_kind"] not in REWARD_KINDS:
        problems.append(f"field 'metadata.reward_kind': expected one of {REWARD_KINDS}, got {meta['reward_kind']!r}")
    if "noise_positions" in meta:
        pos = meta["noise_positions"]
        if not isinstance(pos, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
            problems.append("field 'metadata.noise_positions': expected a list of integers")
        elif len(set(pos)) != len(pos):
            problems.append(f"field 'metadata.noise_positions': duplicates in {pos}")
        elif isinstance(shards, list) and any(not 0 <= p < len(shards) for p in pos):
            problems.append(f"field 'metadata.noise_positions': {pos} out of range for {len(shards)} shards")
    return problems


def load_episodes(
    path: str | os.PathLike,
    *,
    max_shards: int | None = None,
    max_shard_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_errors: int = 20,
) -> list[Episode]:
    """Read and validate a JSONL file of episodes; raise EpisodeFormatError listing `path:line: problem`s.

    count_tokens(text) -> int is required with max_shard_tokens (e.g. `lambda s: len(tokenizer.encode(s))`).
    """
    if max_shard_tokens is not None and count_tokens is None:
        raise ValueError("max_shard_tokens needs count_tokens (a callable text -> number of tokens)")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such episode file")
    problems: list[str] = []
    total = 0
    episodes: list[Episode] = []
    first_line_of: dict[str, int] = {}

    def report(lineno: int, msg: str):
        nonlocal total
        total += 1
        if len(problems) < max_errors:
            problems.append(f"{path}:{lineno}: {msg}")

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report(lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report(lineno, f"malformed JSON: {e.msg} (column {e.colno})")
                continue
            record_problems = validate_record(
                obj, max_shards=max_shards, max_shard_tokens=max_shard_tokens, count_tokens=count_tokens
            )
            for msg in record_problems:
                report(lineno, msg)
            if record_problems:
                continue
            ep_id = obj["id"]
            if ep_id in first_line_of:
                report(lineno, f"field 'id': duplicate {ep_id!r} (first on line {first_line_of[ep_id]})")
                continue
            first_line_of[ep_id] = lineno
            episodes.append(Episode(ep_id, obj["question"], list(obj["shards"]), obj["answer"],
                                    dict(obj.get("metadata", {}))))
    if total:
        raise EpisodeFormatError(problems, total)
    if not episodes:
        raise EpisodeFormatError([f"{path}: no episodes (the file is empty)"], 1)
    return episodes


def is_raw_documents(path: str | os.PathLike) -> bool:
    """True for a LongBench / L-Eval JSONL (its first record has no "shards"), False for an episode file (and for
    anything unreadable: load_episodes then reports it with its line number)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "shards" not in obj and ("context" in obj or "instructions" in obj)


def write_episodes(path: str | os.PathLike, episodes: Iterable[Episode]) -> Path:
    """Write episodes as JSONL, each validated first, atomically (memrl/atomic.py)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for ep in episodes:
            problems = validate_record(ep.to_json())
            assert not problems, f"episode {ep.id!r}: {problems}"
            f.write(json.dumps(ep.to_json(), ensure_ascii=False) + "\n")
    return Path(path)
