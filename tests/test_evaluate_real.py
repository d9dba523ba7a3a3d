"""evaluate.py on the real data, end to end: data_tools builds every evaluation set from ../shared/data, the user's
command compares two tiny checkpoints on all of them, and the outputs are checked against the episode files.

    GSM8K test, MATH500 (rule sharder), noisy MATH500 n = 2, 4 (WikiText noise), long-document QA from a LongBench
    file written here (chunked by data_tools.chunk_docs) and from L-Eval (the raw file, chunked as evaluate.py reads it)

The tiny random models answer nonsense, so their scores say nothing; what is checked is that every number in the
outputs is what the episode files and memrl.reward give, and (with an oracle policy) that right answers on the real
references score 1.0 and wrong ones 0.0.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from data_tools.chunk_docs import chunk_raw_documents
from data_tools.chunk_docs import main as chunk_main
from data_tools.noise import main as noise_main
from data_tools.shard import main as shard_main
from memrl.config import EVAL_CONDITIONS, parse_cli
from memrl.episodes import load_episodes
from memrl.evaluation import eval_episodes
from memrl.generate import Completion
from memrl.reward import score
from tests.tiny import make_tiny_checkpoint

CONDITIONS = EVAL_CONDITIONS  # the paper's three, evaluate.py's default

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no real data at {DATA}")

WINDOW = 2048  # the tiny models' context: an L-Eval document (12,813 bytes) must be cut, a chunk of it must not
BUDGET = 8  # memory cap and answer budget, tokens
LEVAL = DATA / "leval" / "multidoc_qa.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"


def write_longbench(path: Path) -> list[dict]:
    """Three LongBench-format records (hotpotqa fields); two references each, the second phrased differently."""
    rows = []
    for i, (city, river) in enumerate([("Ostrava", "Oder"), ("Passau", "Danube"), ("Koblenz", "Moselle")]):
        sentences = [f"Paragraph {k}: the council of {city} met on day {k} to discuss the bridges, the tram lines "
                     f"and the budget for the next year, and it adjourned without a vote." for k in range(30)]
        sentences.insert(17, f"The river that flows through {city} is the {river}.")
        rows.append({"input": f"Which river flows through {city}?", "context": " ".join(sentences),
                     "answers": [f"the {river}", f"{river} river"], "length": 900, "dataset": "hotpotqa",
                     "language": "en", "all_classes": None, "_id": f"lb-{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> episode file: the evaluation sets, built by data_tools' CLIs as the README says."""
    d = tmp_path_factory.mktemp("data")
    f = {"gsm8k": d / "gsm8k_test.jsonl", "math500": d / "math500.jsonl", "math500-noisy2": d / "math500.noisy2.jsonl",
         "math500-noisy4": d / "math500.noisy4.jsonl", "longbench": d / "longbench.jsonl", "leval": d / "leval.jsonl"}
    assert shard_main(["--input", str(DATA / "gsm8k" / "test.jsonl"), "--dataset", "gsm8k", "--method", "rule",
                       "--unshardable", "whole", "--limit", "3", "--out", str(f["gsm8k"])]) == 0
    assert shard_main(["--input", str(DATA / "math500" / "test.jsonl"), "--dataset", "math500", "--method", "rule",
                       "--unshardable", "whole", "--limit", "3", "--out", str(f["math500"])]) == 0
    for n in (2, 4):
        assert noise_main(["--input", str(f["math500"]), "--wikitext", str(WIKITEXT), "--variant", "noisy",
                           "--n-noise", str(n), "--out", str(f[f"math500-noisy{n}"])]) == 0
    write_longbench(d / "hotpotqa.jsonl")
    assert chunk_main(["--input", str(d / "hotpotqa.jsonl"), "--out", str(f["longbench"])]) == 0
    # evaluate.py reads the raw L-Eval file itself (--data.eval_limit=3 below); the CLI's output is the reference
    assert chunk_main(["--input", str(LEVAL), "--limit", "3", "--out", str(f["leval"])]) == 0
    for path in f.values():
        assert len(load_episodes(path)) == 3
    return f


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    """The user's command: base vs trained on every dataset under all three conditions."""
    d = tmp_path_factory.mktemp("eval")
    base = make_tiny_checkpoint(d / "base", "qwen2", seed=0, max_position_embeddings=WINDOW)
    trained = make_tiny_checkpoint(d / "trained", "qwen2", seed=1, max_position_embeddings=WINDOW)
    out = {"json": d / "eval.json", "table": d / "eval.md", "bar": d / "eval.png", "trace": d / "trace.jsonl"}
    datasets = [f"--dataset={name}={path}" for name, path in files.items() if name != "leval"]
    datasets.append(f"--dataset=leval:qa={LEVAL}")
    cmd = [sys.executable, "evaluate.py", f"--checkpoint=base={base}", f"--checkpoint=trained={trained}", *datasets,
           "--data.eval_limit=3", f"--rollout.memory_cap_tokens={BUDGET}", f"--rollout.response_max_tokens={BUDGET}",
           f"--out={out['json']}", f"--table={out['table']}", f"--bar={out['bar']}", f"--trace={out['trace']}"]
    env = dict(os.environ, MEMRL_KERNELS="torch", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = [json.loads(line) for line in out["trace"].read_text().splitlines()]
    return {**out, "stdout": proc.stdout, "result": json.loads(out["json"].read_text()), "turns": trace}


def squash(text: str) -> str:
    return re.sub(r"[\s@]", "", text)  # WikiText's " @-@ " tokenisation and all spacing out


def references(ep) -> list[str]:
    return ep.metadata.get("answers") or [ep.answer]


def test_every_score_is_what_the_episode_file_and_the_reward_give(files, run):
    res = run["result"]
    assert list(res["results"]) == list(files) and res["conditions"] == list(CONDITIONS)
    for name, path in files.items():
        episodes = {e.id: e for e in load_episodes(path)}
        assert res["datasets"][name]["episodes"] == len(episodes)
        per_ckpt = res["results"][name]
        assert list(per_ckpt) == ["base", "trained"]
        for label, r in per_ckpt.items():
            for condition in CONDITIONS:
                c = r["conditions"][condition]
                assert c["n"] == len(episodes) == len(c["episodes"])
                assert [e["id"] for e in c["episodes"]] == list(episodes)  # every episode once, in file order
                for rec in c["episodes"]:
                    ep = episodes[rec["id"]]
                    kind = ep.metadata["reward_kind"]
                    assert rec["condition"] == condition and rec["reward_kind"] == kind
                    assert rec["score"] == score(rec["final_text"], references(ep), kind)
                assert c["accuracy"] == pytest.approx(sum(e["score"] for e in c["episodes"]) / len(episodes))
            single = r["conditions"]["single_turn"]["accuracy"]
            for multi in ("full_history", "memory"):
                assert r["lic_drop"][multi] == pytest.approx(single - r["conditions"][multi]["accuracy"])
        # two different checkpoints really ran: their answers differ somewhere
        texts = {lab: [e["final_text"] for c in r["conditions"].values() for e in c["episodes"]]
                 for lab, r in per_ckpt.items()}
        assert texts["base"] != texts["trained"]
    kinds = {name: set(res["datasets"][name]["reward_kinds"]) for name in files}
    assert kinds == {"gsm8k": {"gsm8k"}, "math500": {"math"}, "math500-noisy2": {"math"},
                     "math500-noisy4": {"math"}, "longbench": {"qa"}, "leval": {"qa"}}


def test_long_documents_are_cut_to_the_window_only_where_they_must(run):
    leval = run["result"]["results"]["leval"]["base"]["conditions"]
    assert leval["single_turn"]["truncated_prompts"] == 3  # 12.8 KB document > 2,048-token window
    assert leval["full_history"]["truncated_prompts"] == 3
    assert leval["memory"]["truncated_prompts"] == 0  # a chunk fits: the memory condition sees the whole document
    gsm8k = run["result"]["results"]["gsm8k"]["base"]["conditions"]
    assert all(c["truncated_prompts"] == 0 for c in gsm8k.values())


def test_leval_read_raw_equals_the_chunk_cli(files):
    cfg = parse_cli(["--data.eval_limit=3"])
    direct = eval_episodes(cfg, path=str(LEVAL), limits=False, chunk_documents=chunk_raw_documents)
    assert direct == load_episodes(files["leval"])
    assert all(e.metadata["source"] == "leval:multidoc_qa" and len(e.shards) >= 10 for e in direct)


def test_noisy_prompts_carry_the_wikitext_passages(files, run):
    wikitext = WIKITEXT.read_text(encoding="utf-8").splitlines()
    clean = {e.id: e for e in load_episodes(files["math500"])}
    before, after = parse_cli([]).rollout.memory_template.split("{segment}")  # the run's preset: the default
    label = before.rsplit("}", 1)[-1]  # what stands between the memory and the shard ("<segment> " in Figure 4)
    for n in (2, 4):
        name = f"math500-noisy{n}"
        for ep in load_episodes(files[name]):
            pos, sources = ep.metadata["noise_positions"], ep.metadata["noise_sources"]
            problem = [s for i, s in enumerate(ep.shards) if i not in pos]
            assert problem == clean[ep.id].shards and len(ep.shards) == len(problem) * (n + 1)
            for line, p in zip(sources, pos):  # each passage is a stretch of its WikiText line (detokenised)
                assert squash(ep.shards[p]) in squash(wikitext[line - 1]) and len(ep.shards[p].split()) >= 20
            turns = sorted((t for t in run["turns"] if t["dataset"] == name and t["id"] == ep.id
                            and t["condition"] == "memory" and t["checkpoint"] == "trained"), key=lambda t: t["turn"])
            assert [t["kind"] for t in turns] == ["memory"] * len(ep.shards) + ["final"]
            for shard, t in zip(ep.shards, turns):  # turn t shows shard t, noise included, framed as the template
                assert f"{label}{shard}{after}" in t["prompt"]
            single = [t for t in run["turns"] if t["dataset"] == name and t["id"] == ep.id
                      and t["condition"] == "single_turn" and t["checkpoint"] == "trained"]
            assert len(single) == 1 and not any(ep.shards[p] in single[0]["prompt"] for p in pos)


def test_table_and_plot(files, run):
    table = run["table"].read_text()
    assert table.strip() in run["stdout"]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 2 * len(files)  # one row per checkpoint per dataset
    results = run["result"]["results"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        dataset, metric, n, label = cells[:4]
        r = results[dataset][label]
        assert metric == ("F1" if dataset in ("longbench", "leval") else "accuracy") and n == "3"
        assert cells[4:7] == [f"{r['conditions'][c]['accuracy']:.3f}" for c in CONDITIONS]
        assert cells[7:] == [f"{r['lic_drop'][c]:+.3f}" for c in ("full_history", "memory")]
    png = run["bar"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(run["bar"]).shape
    assert width > height  # six dataset panels: 3 columns x 2 rows


class Oracle:
    """Knows every reference: answers single-turn and full-history final turns right (QA: the LAST reference, so
    only the max over references scores it), the memory condition's wrong (its memory is just "noted")."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tok, self.answers, self.last_stats = tokenizer, answers, {}

    def generate(self, prompts, params):
        out = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            text = self.tok.decode(ids)  # whatever the preset's templates: find the question, the turn's kind
            question = max((q for q in self.answers if q in text), key=len)
            if "Updated memory:" in text:  # a memory turn
                reply = "noted"
            elif "noted" in text:  # a final turn answering from the memory "noted"
                reply = "\\boxed{-987654.321}"
            else:
                reply = self.answers[question]
            tokens = self.tok.encode(reply) + [max(self.tok.stop_ids)]
            out += [Completion(i, j, tokens, [0.0] * len(tokens), "stop") for j in range(p.n)]
        return out

    def release(self):
        pass


def test_oracle_scores_one_on_real_references(files, tmp_path, monkeypatch, capsys):
    import memrl.generate
    from memrl.tokenizer import Tokenizer

    answers = {}
    for path in files.values():
        for ep in load_episodes(path):
            kind = ep.metadata["reward_kind"]
            reply = references(ep)[-1] if kind == "qa" else f"The answer is \\boxed{{{ep.answer}}}."
            assert answers.setdefault(ep.question, reply) == reply  # one reply per question
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen2", max_position_embeddings=WINDOW)
    tok = Tokenizer.from_pretrained(ckpt)
    monkeypatch.setattr(memrl.generate, "Generator", lambda model, vocab_size, **kw: Oracle(tok, answers))
    out = tmp_path / "oracle.json"
    args = [f"--checkpoint=oracle={ckpt}", *(f"--dataset={n}={p}" for n, p in files.items()),
            f"--rollout.response_max_tokens={BUDGET}", f"--out={out}"]
    assert evaluate.main(args) == 0
    res = json.loads(out.read_text())["results"]
    for name in files:
        r = res[name]["oracle"]
        assert r["conditions"]["single_turn"]["accuracy"] == 1.0, name
        assert r["conditions"]["full_history"]["accuracy"] == 1.0, name
        assert r["conditions"]["memory"]["accuracy"] == 0.0, name
        assert r["lic_drop"] == {"full_history": 0.0, "memory": 1.0}
    assert "| longbench | F1 | 3 | oracle | 1.000 | 1.000 | 0.000 | +0.000 | +1.000 |" in capsys.readouterr().out
