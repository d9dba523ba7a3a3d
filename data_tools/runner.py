"""Resumable, crash-safe driver shared by every data_tools CLI.

Files for `--out FILE.jsonl`:
    FILE.jsonl                    the finished episodes; only ever created by os.replace (atomic)
    FILE.jsonl.partial            the working copy: complete lines only, flushed after every record
    FILE.failures.jsonl           failures {"id", "reason", "detail", ...}, same discipline (+ .partial)

Invariants:
- A line is trusted only if it ends in "\n", parses, and passes schema.validate_episode. On start the
  finished file and any leftover .partial are merged (ids deduplicated, torn last line dropped) into a
  fresh .partial written via temp file + rename, so a run killed mid-write never leaves a line a
  rerun would trust or glue onto.
- Re-running skips ids already in the output. Failed ids are retried (they are not in the output),
  unless skip_failed=True, which also keeps their old failure records.
- Each record is flushed as soon as its batch finishes (a killed process loses at most the batch in
  flight); fsync happens at the end, before the rename (power loss is not a goal here, kill -9 is).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.schema import DataError, validate_episode
from memrl.atomic import atomic_path


@dataclass
class Outcome:
    """The result of processing one item: a finished episode, or a failure with a reason code."""

    id: str
    episode: dict | None = None
    reason: str | None = None  # e.g. "api_error", "malformed_json", "check:missing_number"
    detail: str = ""
    extra: dict = field(default_factory=dict)  # stage, attempts, last raw output, ...

    def failure_record(self) -> dict:
        return {"id": self.id, "reason": self.reason, "detail": self.detail, **self.extra}


def failures_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".failures.jsonl")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _read_lines(path: Path, strict: bool, validate: Callable[[dict, Path, int], Any]) -> tuple[list[dict], int]:
    """Records of complete, valid lines; strict raises on a bad line, lenient counts and skips it."""
    if not path.exists():
        return [], 0
    records, dropped = [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends in "\n"; else an incomplete last line
    if torn:
        if strict:
            raise DataError(f"{path}:{len(lines) + 1}: incomplete last line (no newline)")
        dropped += 1
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            validate(obj, path, line_no)
        except (json.JSONDecodeError, UnicodeDecodeError, DataError) as e:
            if strict:
                raise DataError(f"{path}:{line_no}: not a valid record ({e})") from None
            dropped += 1
            continue
        records.append(obj)
    return records, dropped


def _validate_failure(obj: dict, path: Path, line_no: int) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("reason"), str):
        raise DataError(f"{path}:{line_no}: failure record needs string 'id' and 'reason'")


class _LineFile:
    """An append-only JSONL working file that is renamed onto its final name at the end."""

    def __init__(self, final: Path, records: list[dict]):
        self.final, self.partial = final, _partial(final)
        with atomic_path(self.partial) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for rec in records:  # the working copy is replaced whole, never patched
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.f = open(self.partial, "a", encoding="utf-8")

    def append(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write call per complete line
        self.f.flush()

    def finish(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial, self.final)

    def close(self) -> None:
        self.f.close()


@dataclass
class RunSummary:
    out: Path
    episodes: int
    new: int
    resumed: int
    shard_counts: Counter
    failures: Counter
    dropped_partial_lines: int = 0

    def format(self) -> str:
        counts = sorted(self.shard_counts.elements())
        lines = [f"output: {self.out}", f"episodes: {self.episodes} (new {self.new}, resumed {self.resumed})"]
        if self.dropped_partial_lines:
            lines.append(f"dropped incomplete/invalid lines from a killed run: {self.dropped_partial_lines}")
        if counts:
            lines.append(
                f"shards per episode: min {counts[0]}, median {statistics.median(counts):g}, "
                f"mean {statistics.fmean(counts):.2f}, max {counts[-1]}"
            )
            lines.append("  histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.shard_counts.items())))
        total = sum(self.failures.values())
        lines.append(f"failures: {total}" + (" (see " + str(failures_path(self.out)) + ")" if total else ""))
        for reason, n in self.failures.most_common():
            lines.append(f"  {reason}: {n}")
        return "\n".join(lines)


def run_resumable(
    items: Sequence[tuple[str, Any]],
    process: Callable[[list[Any]], list[Outcome]],
    out: str | Path,
    batch_size: int = 1,
    desc: str = "",
    skip_failed: bool = False,
) -> RunSummary:
    """Process (id, payload) items in batches, appending episodes to `out`; see the module docstring."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = [item_id for item_id, _ in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(f"input ids must be unique; {dup!r} repeats")

    # Merge finished output + leftover partial; the finished file must be clean, the partial may be torn.
    finished, _ = _read_lines(out, strict=True, validate=validate_episode)
    leftover, dropped = _read_lines(_partial(out), strict=False, validate=validate_episode)
    episodes: dict[str, dict] = {}
    for ep in finished + leftover:
        episodes.setdefault(ep["id"], ep)
    fpath = failures_path(out)
    old_fail_final, _ = _read_lines(fpath, strict=False, validate=_validate_failure)
    old_fail_partial, _ = _read_lines(_partial(fpath), strict=False, validate=_validate_failure)
    old_failures: dict[str, dict] = {}
    for rec in old_fail_final + old_fail_partial:
        if rec["id"] not in episodes:
            old_failures[rec["id"]] = rec  # later records win: the partial is newer

    skip = set(episodes) | (set(old_failures) if skip_failed else set())
    todo = [(i, p) for i, p in items if i not in skip]
    attempted = {i for i, _ in todo}
    carried = [rec for i, rec in old_failures.items() if i not in attempted]

    episode_file = _LineFile(out, list(episodes.values()))
    failure_file = _LineFile(fpath, carried)
    resumed, new = len(episodes), 0
    shard_counts = Counter(len(ep["shards"]) for ep in episodes.values())
    failures = Counter(rec["reason"] for rec in carried)
    try:
        with tqdm(total=len(todo), desc=desc or out.name, file=sys.stderr, unit="item", mininterval=0.5) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                batch_ids = {i for i, _ in batch}
                outcomes = process([p for _, p in batch])
                seen = set()
                for oc in outcomes:
                    if oc.id not in batch_ids or oc.id in seen:
                        raise RuntimeError(f"process returned an unexpected or repeated id {oc.id!r}")
                    seen.add(oc.id)
                    if oc.episode is not None:
                        validate_episode(oc.episode, f"<episode {oc.id}>")
                        episode_file.append(oc.episode)
                        shard_counts[len(oc.episode["shards"])] += 1
                        new += 1
                    else:
                        failure_file.append(oc.failure_record())
                        failures[oc.reason or "unknown"] += 1
                missing = batch_ids - seen
                for i in sorted(missing):  # a process bug must still be visible, never a silent drop
                    failure_file.append({"id": i, "reason": "no_outcome", "detail": "processor returned nothing"})
                    failures["no_outcome"] += 1
                bar.update(len(batch))
    except BaseException:
        episode_file.close()  # leave .partial files in place: they hold only complete lines
        failure_file.close()
        raise
    episode_file.finish()
    failure_file.finish()
    return RunSummary(out, resumed + new, new, resumed, shard_counts, failures, dropped)
