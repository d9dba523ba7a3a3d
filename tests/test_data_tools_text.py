"""data_tools text rules: sentence splitting, the rule sharder, the checks, the dataset readers, and
the rule sharder over ALL of GSM8K train/test and MATH500 (skipped when ../shared/data is absent)."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data_tools.checks import check_chunks, check_sharding, numbers
from data_tools.datasets import load_gsm8k, load_math500, load_problems
from data_tools.rule_shard import ShardingError, rule_shard
from data_tools.schema import DataError, read_episodes, validate_episode
from memrl.sentences import protected_spans, sentences

REPO = Path(__file__).resolve().parents[1]
from data_tools.shard import main as shard_main
from data_tools.shard import rule_outcome

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason="../shared/data absent")


# --- sentences ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("It costs $2.50 or 1,000 cents. Pi is 3.5 here.", ["It costs $2.50 or 1,000 cents.", "Pi is 3.5 here."]),
        ("Mr. Lee met Dr. Roe at 7 a.m. on Monday. They ate.",
         ["Mr. Lee met Dr. Roe at 7 a.m. on Monday.", "They ate."]),
        ("He left at 9 p.m. He slept.", ["He left at 9 p.m.", "He slept."]),
        ("Use tools, e.g. hammers. Then stop.", ["Use tools, e.g. hammers.", "Then stop."]),
        ("See No. 5 now. Done?", ["See No. 5 now.", "Done?"]),
        ("Let $x = 1. 5$ be it. Find $x.$ Now go.", ["Let $x = 1. 5$ be it.", "Find $x.$", "Now go."]),
        ("Define \\(a. B\\) here. Next.", ["Define \\(a. B\\) here.", "Next."]),
        ("Let\n\\[p = 1.\\]Find $p$.", ["Let\n\\[p = 1.\\]", "Find $p$."]),
        ("It is $5. He has $3 left. How much?", ["It is $5.", "He has $3 left.", "How much?"]),
        ("Point A. Find it.", ["Point A.", "Find it."]),
        ("She said \"Stop!\" Then 5! ways remain. Why?", ["She said \"Stop!\"", "Then 5! ways remain.", "Why?"]),
        ("First part\n\nSecond part", ["First part", "Second part"]),
        ("Sam ate.Then he left.", ["Sam ate.", "Then he left."]),  # glued sentences are split
        ("Go to the U.S.A. soon.", ["Go to the U.S.A. soon."]),
    ],
)
def test_sentences(text, expected):
    assert sentences(text) == expected


def test_currency_dollars_are_not_math():
    text = "Eggs cost $2 per dozen. How much do 3 dozen cost in $?"
    assert protected_spans(text) == []
    assert protected_spans("Let $x$ and $y$ be reals.") == [(4, 7), (12, 15)]


# --- rule sharder -------------------------------------------------------------------------------------
def test_rule_shard_gsm8k_style():
    text = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast. She sells the rest for $2 each. "
            "How much in dollars does she make every day?")
    q, shards = rule_shard(text)
    assert q == "How much in dollars does she make every day?"
    assert shards == ["Janet's ducks lay 16 eggs per day.", "She eats three for breakfast.",
                      "She sells the rest for $2 each."]


def test_rule_shard_condition_and_format_instruction():
    text = "Let $f(x) = 2x$. If $f(a) = 6$ and $b = 1.5$, what is $a + b$? Express your answer as a decimal."
    q, shards = rule_shard(text)
    assert shards == ["Let $f(x) = 2x$.", "If $f(a) = 6$ and $b = 1.5$"]
    assert q == "what is $a + b$? Express your answer as a decimal."
    q, shards = rule_shard("A box holds 12 pens. If 3 boxes are full, calculate the total number of pens.")
    assert q == "calculate the total number of pens."
    assert shards == ["A box holds 12 pens.", "If 3 boxes are full"]


def test_rule_shard_math_comma_inside_dollars():
    text = "Let $g$ be a function. If $f(1) = 1,$ then find $f(2).$"
    q, shards = rule_shard(text)
    assert q == "then find $f(2).$" and shards == ["Let $g$ be a function.", "If $f(1) = 1,$"]
    assert check_sharding(text, q, shards) == []


def test_rule_shard_failures_carry_reasons():
    with pytest.raises(ShardingError) as e:
        rule_shard("How many divisors does 196 have?")
    assert e.value.reason == "single_sentence" and e.value.question == "How many divisors does 196 have?"
    with pytest.raises(ShardingError) as e:
        rule_shard("Tom has 3 apples. Mary has 4 apples.")
    assert e.value.reason == "no_question"


# --- checks ---------------------------------------------------------------------------------------------
def test_numbers_by_value():
    got = numbers("Three cost $1,000.50 and .5 and 007 and 2.50")
    assert {"3", "1000.5", "0.5", "7", "2.5"} <= set(got)


def test_checks_catch_each_problem():
    problem = "Ann has 3 apples and $x = 2$. Bob has 1,000 pears. How many fruits are there?"
    ok = check_sharding(problem, "How many fruits are there?", ["Ann has 3 apples and $x = 2$.", "Bob has 1000 pears."])
    assert ok == []
    codes = lambda q, s: {i.code for i in check_sharding(problem, q, s)}  # noqa: E731
    assert codes("", ["Ann has 3 apples and $x = 2$.", "Bob has 1,000 pears."]) == {"empty_question"}
    assert "missing_number" in codes("How many?", ["Ann has apples and $x = 2$.", "Bob has 1,000 pears."])
    assert "invented_number" in codes("How many?", ["Ann has 3 apples and $x = 2$.", "Bob has 1,000 pears, 7 total."])
    assert "missing_math" in codes("How many?", ["Ann has 3 apples and x = 2.", "Bob has 1,000 pears."])
    assert "empty_shard" in codes("How many?", ["Ann has 3 apples and $x = 2$.", " ", "Bob has 1,000 pears."])
    assert "duplicate_shard" in codes("How many?", ["Ann has 3 apples and $x = 2$."] * 2 + ["Bob has 1,000 pears."])
    repeated = ["Ann has 3 apples and $x = 2$.", "Bob has 1,000 pears.", "How many?"]
    assert "question_not_withheld" in codes("How many?", repeated)
    assert "no_shards" in codes("How many?", [])
    too_many = check_sharding(problem, "q", ["Ann has 3 apples and $x = 2$.", "Bob has 1,000 pears."], max_shards=1)
    assert {i.code for i in too_many} == {"too_many_shards"}
    assert check_chunks("a b. c d.", ["a b.", "c d."]) == []
    assert [i.code for i in check_chunks("a b. c d.", ["a b."])] == ["lossy_chunking"]


# --- dataset readers and schema ---------------------------------------------------------------------------
def test_readers_and_clear_errors(tmp_path):
    g = tmp_path / "test.jsonl"
    g.write_text(json.dumps({"question": "Q?", "answer": "work\n#### 1,080"}) + "\n")
    (p,) = load_gsm8k(g)
    assert (p.id, p.answer, p.metadata["answer_raw"], p.metadata["problem"]) == ("gsm8k-test-0", "1080", "1,080", "Q?")
    lines = lambda *rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    g.write_text(lines({"question": "Q?", "answer": "1"}, {"question": 3, "answer": "#### 1"}))
    with pytest.raises(DataError, match=r"test\.jsonl:1: field 'answer'"):
        load_gsm8k(g)
    g.write_text(lines({"question": "Q?", "answer": "#### 2"}, {"question": 3, "answer": "#### 1"}))
    with pytest.raises(DataError, match=r"test\.jsonl:2: field 'question': expected str, got int"):
        load_gsm8k(g)
    g.write_text('{"question": "Q?", "answer": "#### 2"}\n{"question": \n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: invalid JSON"):
        load_gsm8k(g)
    m = tmp_path / "m.jsonl"
    m.write_text(lines({"problem": "Find $x$.", "answer": "\\frac12", "unique_id": "test/a/1.json", "level": 2}))
    (p,) = load_math500(m)
    assert p.id == "test/a/1.json" and p.answer == "\\frac12" and p.metadata["level"] == 2
    m.write_text(json.dumps({"problem": "Find $x$.", "unique_id": "u"}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'answer': missing"):
        load_math500(m)
    with pytest.raises(DataError, match=r"field 'shards\[1\]'"):
        validate_episode({"id": "a", "question": "q", "answer": "1", "shards": ["x", ""]}, "f.jsonl", 3)
    with pytest.raises(DataError, match="noise_positions"):
        validate_episode({"id": "a", "question": "q", "answer": "1", "shards": ["x"],
                          "metadata": {"noise_positions": [1]}})


def test_cli_bad_input_names_file_line_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "#### 1"}) + "\n" + json.dumps({"answer": "#### 1"}) + "\n")
    args = ["--input", str(bad), "--dataset", "gsm8k", "--method", "rule", "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(DataError, match="bad.jsonl:2: field 'question': missing"):
        shard_main(args)


# --- real data: every problem of GSM8K train/test and MATH500 -------------------------------------------------
@needs_data
def test_rule_sharder_on_all_real_math_data(tmp_path, capsys):
    t0 = time.perf_counter()
    results = {}
    files = [("gsm8k", "gsm8k/train.jsonl"), ("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl")]
    for dataset, rel in files:
        problems = load_problems(DATA / rel, dataset)
        outcomes = [rule_outcome(p) for p in problems]
        ok = [o for o in outcomes if o.episode is not None]
        reasons = Counter(o.reason for o in outcomes if o.episode is None)
        assert all(o.reason and o.detail for o in outcomes if o.episode is None)  # every failure says why
        for o in ok:  # rule_outcome ran the checks; the pieces are also verbatim slices of the problem
            p = o.episode["metadata"]["problem"]
            assert all(s in p for s in o.episode["shards"])
        results[rel] = (len(problems), len(ok), reasons)
    elapsed = time.perf_counter() - t0
    assert [r[0] for r in results.values()] == [7473, 1319, 500]
    for rel, (n, n_ok, reasons) in results.items():
        assert set(reasons) <= {"single_sentence", "no_question"}, (rel, reasons)
    assert results["gsm8k/train.jsonl"][1] / 7473 > 0.99 and results["gsm8k/test.jsonl"][1] / 1319 > 0.99
    assert results["math500/test.jsonl"][1] / 500 > 0.6  # 160 one-sentence problems ("Compute $\\dbinom{31}{28}$.")
    assert sum(r[1] for r in results.values()) / sum(r[0] for r in results.values()) > 0.97
    assert elapsed < 60, f"rule sharding took {elapsed:.1f}s"

    # The CLI end to end on MATH500 with --unshardable whole: all 500 kept, and the counts printed.
    out = tmp_path / "math500.jsonl"
    assert shard_main(["--input", str(DATA / "math500/test.jsonl"), "--dataset", "math500", "--method", "rule",
                       "--unshardable", "whole", "--out", str(out)]) == 0
    eps = read_episodes(out)
    assert len(eps) == 500 and len({e["id"] for e in eps}) == 500
    assert sum(bool(e["metadata"].get("unsharded")) for e in eps) == 160
    assert "episodes: 500" in capsys.readouterr().out


def test_the_rule_sharder_is_linear_on_hostile_input(tmp_path):
    """Shapes that used to cost the square of their length (an opener without its closer searched for from every
    opener, every blank-line paragraph counted against all others, a long word re-scanned from each letter), each
    ~500 kB, sharded and checked in a subprocess. Linear: seconds; the old code: hours. The bound is generous."""
    script = tmp_path / "hostile.py"
    script.write_text(
        "from data_tools.datasets import Problem\n"
        "from data_tools.shard import rule_outcome\n"
        "n = 500_000\n"
        "shapes = ['Let \\\\[ x. ' * (n // 10), 'A b.\\n\\n' * (n // 6) + 'What?',\n"
        "          '$' + 'a' * n + '$ What is it?', 'x \\\\begin{align} y. ' * (n // 19) + 'What?',\n"
        "          'How many? ' + 'Express your answer as a fraction. ' * (n // 36)]\n"
        "for text in shapes:\n"
        "    print(rule_outcome(Problem('p', text, '1')).reason, flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 5  # every shape came back with an outcome (a failure reason or None)
