"""Counts for data_tools/README.md: the rule sharder over all of GSM8K train/test and MATH500, and
the chunker over the L-Eval files, computed in memory (nothing written but the README, when asked).

    python -m data_tools.report --data ../shared/data                  # print the markdown
    python -m data_tools.report --data ../shared/data --write-readme   # replace the README block

The README block sits between the markers <!-- report:begin --> and <!-- report:end -->.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from data_tools.chunk_docs import TokenCounter, load_leval, make_processor
from data_tools.datasets import load_problems
from data_tools.runner import Outcome
from data_tools.shard import rule_outcome

MATH_FILES = [("gsm8k", "gsm8k/train.jsonl"), ("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl")]
LEVAL_FILES = ["leval/natural_question.jsonl", "leval/scientific_qa.jsonl", "leval/multidoc_qa.jsonl"]
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


def _row(name: str, n_in: int, outcomes: list[Outcome]) -> tuple[str, str, list[str]]:
    eps = [o.episode for o in outcomes if o.episode is not None]
    counts = sorted(len(e["shards"]) for e in eps)
    stats = (f"{counts[0]} / {statistics.median(counts):g} / {statistics.fmean(counts):.2f} / {counts[-1]}"
             if counts else "-")
    fails = Counter(o.reason for o in outcomes if o.episode is None)
    row = f"| {name} | {n_in} | {len(eps)} | {sum(fails.values())} | {stats} |"
    hist = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(counts).items()))
    examples = defaultdict(list)
    for o in outcomes:
        if o.episode is None:
            examples[o.reason].append(o.id)
    reasons = [f"- `{name}` {r}: {n} (e.g. {', '.join(examples[r][:3])})" for r, n in fails.most_common()]
    return row, f"- `{name}`: {hist}", reasons


def build_report(data: Path, with_leval: bool = True) -> str:
    header = ["| file | problems | episodes | failures | shards per episode (min / median / mean / max) |",
              "|---|---:|---:|---:|---|"]
    out = ["### Rule sharder (`--method rule`), default `--unshardable fail`", ""] + header
    hists, reasons, whole_rows = [], [], []
    t0 = time.perf_counter()
    n_total = 0
    for dataset, rel in MATH_FILES:
        problems = load_problems(data / rel, dataset)
        n_total += len(problems)
        outcomes = [rule_outcome(p) for p in problems]
        row, hist, why = _row(rel, len(problems), outcomes)
        out.append(row)
        hists.append(hist)
        reasons += why
        whole = [rule_outcome(p, unshardable="whole") for p in problems]
        whole_rows.append(_row(rel, len(problems), whole)[0])
    seconds = time.perf_counter() - t0
    out += ["", "Shards per episode (histogram, shards: episodes):", *hists, "", "Failures by reason:",
            *(reasons or ["- none"]), "",
            "With `--unshardable whole` (a problem with nothing to shard besides its question becomes one "
            "shard holding the whole problem, `metadata.unsharded = true`):", "", *header, *whole_rows, "",
            f"Both passes over {n_total} problems took {seconds:.1f} s on this machine's CPU."]
    if with_leval:
        counter = TokenCounter(None)
        out += ["", "### Long-document chunking of L-Eval (`python -m data_tools.chunk_docs`, defaults: "
                "target 12 shards, max 1024 regex tokens per shard)", "", *header]
        hists = []
        for rel in LEVAL_FILES:
            questions = load_leval(data / rel)
            process = make_processor(counter)
            outcomes = [oc for q in questions for oc in process([q])]
            row, hist, _ = _row(rel, len(questions), outcomes)
            out.append(row)
            hists.append(hist)
        out += ["", "Shards per episode (histogram):", *hists]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="the shared data folder")
    p.add_argument("--no-leval", action="store_true")
    p.add_argument("--write-readme", action="store_true", help="replace the block in data_tools/README.md")
    args = p.parse_args(argv)
    report = build_report(Path(args.data), with_leval=not args.no_leval)
    print(report)
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        text = readme.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            print(f"error: {readme} has no {BEGIN} ... {END} block", file=sys.stderr)
            return 2
        head, rest = text.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + report + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
