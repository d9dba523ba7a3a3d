"""Noise variants and long-document chunking: noise lands where the metadata says, chunks are
sentence-aligned and within the token bound, LongBench-format files (written here) and the real
L-Eval files (skipped when ../shared/data is absent) load into valid episodes."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from data_tools.chunk_docs import TokenCounter, chunk_document, load_documents
from data_tools.chunk_docs import main as chunk_main
from memrl.noise import Passage, detokenize, load_passages, make_variant, problem_shards
from data_tools.noise import main as noise_main
from data_tools.schema import DataError, read_episodes, validate_episode
from memrl.sentences import split_sentences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wikitext2" / "wiki.test.raw"
needs_data = pytest.mark.skipif(not WIKI.exists(), reason="../shared/data absent")

PASSAGES = [Passage(f"Noise passage number {i} about rivers and kings.", i + 1) for i in range(40)]
EPISODE = {"id": "gsm8k-test-3", "question": "How many?", "shards": ["A has 3.", "B has 4.", "C has 5."],
           "answer": "12", "metadata": {"problem": "A has 3. B has 4. C has 5. How many?", "source": "gsm8k"}}


# --- noise ------------------------------------------------------------------------------------------------
def test_noise_variants_land_where_they_say():
    sharded = make_variant(EPISODE, "sharded", PASSAGES)
    assert sharded["shards"] == EPISODE["shards"] and sharded["metadata"]["noise_positions"] == []

    for seed in range(5):
        full = make_variant(EPISODE, "full_question", PASSAGES, seed=seed)
        pos = full["metadata"]["noise_positions"]
        assert len(full["shards"]) == 3 and len(pos) == 2
        (problem_at,) = set(range(3)) - set(pos)
        assert full["shards"][problem_at] == EPISODE["metadata"]["problem"]
        assert all(full["shards"][p].startswith("Noise passage") for p in pos)
        sources = full["metadata"]["noise_sources"]
        assert [PASSAGES[line - 1].text for line in sources] == [full["shards"][p] for p in pos]

        mixed = make_variant(EPISODE, "mixed", PASSAGES, seed=seed, mixed_ratio=1.0)
        pos = mixed["metadata"]["noise_positions"]
        assert len(mixed["shards"]) == 6 and len(pos) == 3
        assert problem_shards(mixed) == EPISODE["shards"]  # problem shards in order, untouched
        assert all(mixed["shards"][p].startswith("Noise passage") for p in pos)
        validate_episode(mixed)

    for n in (2, 4):
        noisy = make_variant(EPISODE, "noisy", PASSAGES, n_noise=n)
        sh, pos = noisy["shards"], noisy["metadata"]["noise_positions"]
        assert len(sh) == 3 * (n + 1) and noisy["metadata"]["noise_per_gap"] == n
        assert [sh[i] for i in range(0, len(sh), n + 1)] == EPISODE["shards"]  # n noise after every shard
        assert pos == [i for i in range(len(sh)) if i % (n + 1) != 0]
        assert len(set(sh)) == len(sh)  # no passage repeats inside an episode
    assert noisy["question"] == EPISODE["question"] and EPISODE["shards"] == ["A has 3.", "B has 4.", "C has 5."]


def test_noise_is_seeded_per_episode():
    a = make_variant(EPISODE, "mixed", PASSAGES, seed=1)
    assert a == make_variant(EPISODE, "mixed", PASSAGES, seed=1)
    others = [make_variant(EPISODE, "mixed", PASSAGES, seed=s)["shards"] for s in range(2, 12)]
    assert any(o != a["shards"] for o in others)
    other_id = make_variant({**EPISODE, "id": "other"}, "mixed", PASSAGES, seed=1)
    assert other_id["shards"] != a["shards"] or other_id["metadata"]["noise_sources"] != a["metadata"]["noise_sources"]


def test_wikitext_reader_on_a_crlf_file(tmp_path):
    raw = tmp_path / "wiki.raw"
    body = " ".join(f"Sentence {i} has the word river in it @-@ again ." for i in range(12))
    raw.write_bytes(f" = Title = \r\n = = Section = = \r\n{body}\r\n\r\n Short line .\r\n".encode())
    passages = load_passages(raw, min_words=10, max_words=40)
    assert passages and all("\r" not in p.text and "=" not in p.text for p in passages)
    assert all(10 <= len(p.text.split()) <= 40 and p.line == 3 for p in passages)
    assert "river in it-again." in passages[0].text
    raw_line = " 1 @,@ 000 people ( about 3 @.@ 5 % ) don 't go , ok . "
    assert detokenize(raw_line) == "1,000 people (about 3.5 %) don't go, ok."


@needs_data
def test_noise_cli_on_real_wikitext(tmp_path, capsys):
    passages = load_passages(WIKI)
    assert len(passages) > 1000 and all(20 <= len(p.text.split()) <= 100 for p in passages)
    inp = tmp_path / "eps.jsonl"
    inp.write_text("".join(json.dumps({**EPISODE, "id": f"e{i}"}) + "\n" for i in range(20)))
    out = tmp_path / "noisy.jsonl"
    assert noise_main(["--input", str(inp), "--wikitext", str(WIKI), "--variant", "noisy", "--n-noise", "2",
                       "--out", str(out)]) == 0
    eps = read_episodes(out)
    assert len(eps) == 20 and all(len(e["shards"]) == 9 and problem_shards(e) == EPISODE["shards"] for e in eps)
    assert "episodes: 20" in capsys.readouterr().out
    lines = WIKI.read_text(encoding="utf-8").splitlines()
    for e in eps[:3]:  # each noise shard comes from the WikiText line it names
        for p, line in zip(e["metadata"]["noise_positions"], e["metadata"]["noise_sources"]):
            assert e["shards"][p].split()[0] in detokenize(lines[line - 1])


# --- chunking --------------------------------------------------------------------------------------------
def make_doc(n_sentences: int) -> str:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return " ".join(f"Sentence {i} says {' '.join(words[: 3 + i % 7])}, and more." for i in range(n_sentences))


def test_chunks_are_sentence_aligned_and_bounded():
    doc = make_doc(300)
    counter = TokenCounter()
    ends = {e for _, e in split_sentences(doc, protect_math=False)}
    for kwargs in ({"chunk_tokens": 50}, {}, {"target_shards": 10}):
        ch = chunk_document(doc, counter, **kwargs)
        assert all(counter.count(c) <= ch.size for c in ch.chunks) and ch.hard_cuts == 0
        assert " ".join(ch.chunks) == doc  # verbatim, nothing lost
        pos = 0
        for c in ch.chunks:  # every chunk starts and ends on a sentence boundary
            start = doc.index(c, pos)
            assert start + len(c) in ends and c[0].isupper()
            pos = start + len(c)
    assert len(chunk_document(doc, counter).chunks) == 12  # aims at the paper's 10-14
    assert len(chunk_document(doc, counter, target_shards=10).chunks) == 10
    fixed = chunk_document(doc, counter, chunk_tokens=50)
    assert fixed.size == 50 and len(fixed.chunks) >= math.ceil(counter.count(doc) / 50)


def test_overlong_sentence_is_cut_at_whitespace():
    doc = "Short one. " + " ".join(["word"] * 500) + ". Tail sentence."
    ch = chunk_document(doc, TokenCounter(), chunk_tokens=100)
    assert ch.hard_cuts == 1 and all(TokenCounter().count(c) <= 100 for c in ch.chunks)
    assert "".join(ch.chunks).replace(" ", "") == doc.replace(" ", "")


def write_longbench(path: Path, n: int = 3) -> list[dict]:
    rows = [{"input": f"What does sentence {i} say?", "context": make_doc(100 + 50 * i), "answers": [f"a{i}", f"b{i}"],
             "length": 1000, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": f"id{i}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_longbench_loader_and_cli(tmp_path, capsys):
    inp, out = tmp_path / "hotpotqa.jsonl", tmp_path / "hotpotqa.episodes.jsonl"
    rows = write_longbench(inp)
    assert chunk_main(["--input", str(inp), "--out", str(out)]) == 0
    eps = read_episodes(out)
    assert [e["id"] for e in eps] == ["id0", "id1", "id2"]
    for e, r in zip(eps, rows):
        assert e["question"] == r["input"] and e["answer"] == r["answers"][0]
        assert e["metadata"]["answers"] == r["answers"] and e["metadata"]["source"] == "longbench:hotpotqa"
        assert 10 <= len(e["shards"]) <= 14 and " ".join(e["shards"]) == r["context"]
    assert "episodes: 3" in capsys.readouterr().out
    assert chunk_main(["--input", str(inp), "--out", str(out)]) == 0  # resumed: nothing to do
    assert read_episodes(out) == eps

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answers": "b1"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'answers': expected list, got str"):
        load_documents(bad)
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: neither LongBench"):
        load_documents(bad)
    assert chunk_main(["--input", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@needs_data
def test_leval_reader_on_real_file(tmp_path):
    path = DATA / "leval" / "scientific_qa.jsonl"
    questions = load_documents(path)
    assert len(questions) == 184 and len({q.id for q in questions}) == 184
    out = tmp_path / "sci.jsonl"
    assert chunk_main(["--input", str(path), "--out", str(out), "--limit", "40"]) == 0
    eps = read_episodes(out)
    assert len(eps) == 40
    assert Counter(len(e["shards"]) for e in eps).keys() <= set(range(10, 15))
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    first = records[0]
    assert eps[0]["question"] == first["instructions"][0].strip() and eps[0]["answer"] == first["outputs"][0]
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash("".join(eps[0]["shards"])) == squash(first["input"])
    assert all(TokenCounter().count(s) <= e["metadata"]["chunk_tokens"] for e in eps for s in e["shards"])


def test_every_output_loads_through_the_trainers_reader(tmp_path):
    """data_tools writes what memrl.episodes (the core's reader) accepts: sharded, every noise variant,
    and chunked long documents."""
    episodes_mod = pytest.importorskip("memrl.episodes")
    from data_tools.shard import main as shard_main

    gsm = tmp_path / "test.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Ann has {i} pens. Bob has 1,000 pens. How many pens in all?",
                                       "answer": f"#### {1000 + i:,}"}) + "\n" for i in range(5)))
    sharded = tmp_path / "sharded.jsonl"
    assert shard_main(["--input", str(gsm), "--dataset", "gsm8k", "--method", "rule", "--out", str(sharded)]) == 0
    files = [sharded]
    for variant in ("sharded", "full_question", "mixed", "noisy"):
        out = tmp_path / f"{variant}.jsonl"
        eps = [make_variant(e, variant, PASSAGES, n_noise=4) for e in read_episodes(sharded)]
        out.write_text("".join(json.dumps(e) + "\n" for e in eps))
        files.append(out)
    docs, chunked = tmp_path / "hotpotqa.jsonl", tmp_path / "chunked.jsonl"
    write_longbench(docs)
    assert chunk_main(["--input", str(docs), "--out", str(chunked)]) == 0
    files.append(chunked)
    for f in files:
        loaded = episodes_mod.load_episodes(f, max_shards=35)
        assert [e.id for e in loaded] == [e["id"] for e in read_episodes(f)]
    first = episodes_mod.load_episodes(sharded)[0]
    assert first.answer == "1000" and first.problem.startswith("Ann has 0 pens.")
    assert first.metadata["reward_kind"] == "gsm8k" and first.metadata["answer_raw"] == "1,000"
    noisy = episodes_mod.load_episodes(tmp_path / "noisy.jsonl")[0]
    assert len(noisy.noise_positions) == 4 * len(first.shards)
    assert episodes_mod.load_episodes(chunked)[0].references == ["a0", "b0"]
