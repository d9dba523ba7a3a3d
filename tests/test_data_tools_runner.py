"""The resumable runner: atomic output, resume after an exception mid-run, torn and invalid lines,
failure sidecar bookkeeping, and clear errors for a corrupt finished file or repeated ids."""

import json

import pytest

from data_tools.runner import Outcome, failures_path, run_resumable
from data_tools.schema import DataError, read_episodes


def episode(i: int) -> dict:
    return {"id": f"e{i}", "question": f"q{i}?", "shards": [f"s{i}"] * (1 + i % 3), "answer": str(i)}


def make_process(fail_ids=(), crash_at=None, seen=None):
    calls = {"n": 0}

    def process(batch):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt  # what Ctrl-C (or any exception) mid-run looks like
        if seen is not None:
            seen.extend(batch)
        return [Outcome(f"e{i}", reason="boom", detail="d") if f"e{i}" in fail_ids
                else Outcome(f"e{i}", episode=episode(i)) for i in batch]

    return process


def test_run_resume_after_exception(tmp_path):
    out = tmp_path / "o.jsonl"
    items = [(f"e{i}", i) for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        run_resumable(items, make_process(fail_ids={"e1"}, crash_at=3), out, batch_size=2)
    assert not out.exists()
    partial = out.with_name("o.jsonl.partial")
    assert [json.loads(x)["id"] for x in partial.read_text().splitlines()] == ["e0", "e2", "e3"]
    seen = []
    summary = run_resumable(items, make_process(fail_ids={"e1"}, seen=seen), out, batch_size=2)
    assert seen == [1, 4, 5, 6, 7, 8, 9]  # finished ids skipped; the failed one retried
    eps = read_episodes(out)
    assert [e["id"] for e in eps] == ["e0", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"]
    assert eps == [episode(i) for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert (summary.episodes, summary.new, summary.resumed, summary.failures["boom"]) == (9, 6, 3, 1)
    assert [json.loads(x)["id"] for x in failures_path(out).read_text().splitlines()] == ["e1"]
    assert "shards per episode: min 1" in summary.format() and "boom: 1" in summary.format()
    # Now e1 succeeds: its failure record disappears, nothing else is redone.
    seen = []
    summary = run_resumable(items, make_process(seen=seen), out, batch_size=2)
    assert seen == [1] and summary.episodes == 10 and failures_path(out).read_text() == ""
    assert [e["id"] for e in read_episodes(out)][-1] == "e1"


def test_torn_and_invalid_partial_lines_are_dropped(tmp_path):
    out = tmp_path / "o.jsonl"
    partial = out.with_name("o.jsonl.partial")
    partial.write_text(json.dumps(episode(0)) + "\n" + '{"id": "e5", "question": "q5?"}\n'  # invalid: no shards
                       + json.dumps(episode(1)) + "\n" + json.dumps(episode(2))[:-5])  # torn
    seen = []
    summary = run_resumable([(f"e{i}", i) for i in range(4)], make_process(seen=seen), out)
    assert seen == [2, 3] and summary.dropped_partial_lines == 2
    assert read_episodes(out) == [episode(i) for i in (0, 1, 2, 3)]


def test_corrupt_finished_file_and_repeated_ids_are_errors(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps(episode(0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"o\.jsonl:2"):
        run_resumable([("e0", 0)], make_process(), out)
    with pytest.raises(DataError, match="'e1' repeats"):
        run_resumable([("e1", 1), ("e1", 1)], make_process(), tmp_path / "p.jsonl")


def test_skip_failed_keeps_old_failure_records(tmp_path):
    out = tmp_path / "o.jsonl"
    run_resumable([(f"e{i}", i) for i in range(3)], make_process(fail_ids={"e1"}), out)
    seen = []
    summary = run_resumable([(f"e{i}", i) for i in range(4)], make_process(seen=seen), out, skip_failed=True)
    assert seen == [3] and summary.failures == {"boom": 1}
    assert json.loads(failures_path(out).read_text())["id"] == "e1"
