"""The episode JSONL schema as data_tools writes it (memrl/episodes.py reads and validates it).

One JSON object per line, UTF-8, no blank lines:

    {"id":       str,         unique within the file; stable across reruns (resume keys on it)
     "question": str,         the core question, withheld from the shards and shown at every turn
     "shards":   [str, ...],  the pieces revealed one per turn, in order (1 <= len; every shard non-empty)
     "answer":   str,         reference answer (GSM8K: digits with thousands commas removed;
                              MATH500: the dataset's LaTeX answer; long-document QA: the first reference)
     "metadata": {...}}       optional; every key below is optional too

Metadata keys written by data_tools (readers must ignore keys they do not know):

    "problem":         str        the original single-turn problem text (question included): the
                                  single-turn condition shows this; Full-question noise puts it in one shard
    "source":          str        "gsm8k" | "math500" | "longbench:<dataset>" | "leval:<file stem>"
    "reward_kind":     str        "gsm8k" | "math" | "qa": which memrl.reward scorer applies
    "split":           str        input file stem, e.g. "train", "test"
    "method":          str        "rule" | "llm" | "chunk"
    "answers":         [str]      every reference answer (long-document QA; score = max F1 over them)
    "answer_raw":      str        the dataset's answer before normalisation (GSM8K "1,080")
    "variant":         str        "sharded" | "full_question" | "mixed" | "noisy"   (data_tools.noise)
    "noise_positions": [int]      0-based indices into "shards" of the WikiText noise shards;
                                  every other shard is problem content, in its original order
    "noise_per_gap":   int        "noisy" only: noise shards inserted after every problem shard
    "noise_sources":   [int]      WikiText line number (1-based) of each noise shard, aligned with noise_positions
    "noise_seed":      int        the seed the noise was drawn with
    "subject", "level", "unique_id"   MATH500 fields, copied
    "unsharded":       bool       true when the problem had nothing to shard besides its question and was
                                  kept whole as the single shard (--unshardable whole)
    "verify":          {...}      llm method: the VERIFY step's verdict {complete, non_redundant, issues}
    "chunk_tokens":    int        long-document QA: the token budget per shard; "token_counter" names the
                                  counter, "hard_cuts" counts sentences cut inside for being too long

Failures never enter an episode file: they go to the sidecar FILE.failures.jsonl (see runner.py) as
{"id", "reason", "detail", ...}.

"A valid line" is defined once, by memrl.episodes.validate_record (the trainer's reader; memrl/episodes.py
imports nothing heavy). `validate_episode` here is its writer-side use: it raises DataError naming the
file, the line and the field of the first problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from memrl.episodes import REWARD_KINDS, validate_record  # noqa: F401  (REWARD_KINDS re-exported)
from memrl.errors import DataError  # noqa: F401  (re-exported: the one error type for bad data, memrl/errors.py)


def where(path: str | Path, line_no: int | None) -> str:
    return f"{path}:{line_no}" if line_no is not None else str(path)


def validate_episode(obj: object, path: str | Path = "<episode>", line_no: int | None = None) -> dict:
    """Return obj if it is a valid episode, else raise DataError naming path:line and the field.

    The rules are memrl.episodes.validate_record's (the trainer's reader): one definition of a valid line."""
    problems = validate_record(obj)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{where(path, line_no)}: {problems[0]}{more}")
    return obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, object) for every non-blank line; DataError on a missing file, bytes that are not UTF-8 or bad
    JSON, naming path:line."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def read_episodes(path: str | Path) -> list[dict]:
    """Read and validate an episode file; ids must be unique."""
    episodes, seen = [], {}
    for line_no, obj in read_jsonl(path):
        validate_episode(obj, path, line_no)
        if obj["id"] in seen:
            raise DataError(f"{path}:{line_no}: field 'id': duplicate of line {seen[obj['id']]} ({obj['id']!r})")
        seen[obj["id"]] = line_no
        episodes.append(obj)
    return episodes


def require(obj: dict, key: str, kind: type | tuple[type, ...], path: str | Path, line_no: int) -> object:
    """obj[key] checked against kind, else DataError naming path:line and the field (for dataset readers)."""
    if key not in obj:
        raise DataError(f"{path}:{line_no}: field '{key}': missing")
    value = obj[key]
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{path}:{line_no}: field '{key}': expected {names}, got {type(value).__name__}")
    return value
