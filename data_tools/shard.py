"""CLI: single-turn math problems -> sharded episodes (schema.py), resumable.

    python -m data_tools.shard --input ../shared/data/gsm8k/test.jsonl --dataset gsm8k \\
        --method rule --out data/gsm8k_test.sharded.jsonl
    OPENAI_API_KEY=... python -m data_tools.shard --input ... --dataset math500 --method llm \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --out data/math500.llm.jsonl
    python -m data_tools.shard ... --method llm --local-model /path/to/hf_checkpoint

Re-running the same command skips finished ids; failures go to FILE.failures.jsonl with reasons;
the summary (episodes, shards per episode, failures by reason) is printed at the end. Bad input (a missing, empty or
malformed file, an option out of range) is one `error: ` line and a non-zero exit (memrl/errors.py; --debug for the
traceback).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from data_tools.checks import check_sharding
from data_tools.datasets import DATASETS, Problem, load_problems
from data_tools.rule_shard import ShardingError, rule_shard
from data_tools.runner import Outcome, run_resumable
from memrl.errors import ConfigError, install_error_handler


# The longest real problem is 1,733 characters (MATH500; GSM8K: 985). A problem 30x longer is not a math word problem
# but a broken or hostile input: it is recorded as a failure (too_long) without being read, in constant time. The
# sharders themselves are linear (memrl/sentences.py), so the bound is a limit on output, not on run time.
MAX_PROBLEM_CHARS = 50_000


def too_long(problem: Problem, max_chars: int) -> Outcome | None:
    if len(problem.text) <= max_chars:
        return None
    return Outcome(problem.id, reason="too_long",
                   detail=f"{len(problem.text):,} characters > --max-chars {max_chars:,}")


def bounded(process, max_chars: int):
    """`process` for the problems within max_chars, a too_long failure for each other one."""
    def run(batch: list[Problem]) -> list[Outcome]:
        refused = [oc for p in batch if (oc := too_long(p, max_chars)) is not None]
        within = [p for p in batch if len(p.text) <= max_chars]
        return refused + (process(within) if within else [])
    return run


def episode_for(problem: Problem, question: str, shards: list[str], method: str, unsharded: bool = False) -> dict:
    meta = {**problem.metadata, "method": method}
    if unsharded:
        meta["unsharded"] = True
    return {"id": problem.id, "question": question, "shards": shards, "answer": problem.answer, "metadata": meta}


def rule_outcome(problem: Problem, unshardable: str = "fail", max_shards: int = 35) -> Outcome:
    """Shard one problem with the rule sharder and check it; a failure carries its reason."""
    unsharded = False
    try:
        question, shards = rule_shard(problem.text)
    except ShardingError as e:
        if e.reason != "single_sentence" or unshardable != "whole":
            return Outcome(problem.id, reason=e.reason, detail=e.detail, extra={"method": "rule"})
        question, shards, unsharded = e.question, [problem.text.strip()], True
    issues = check_sharding(problem.text, question, shards, max_shards)
    if unsharded:  # the one shard is the whole problem, so it contains the question by construction
        issues = [i for i in issues if i.code != "question_not_withheld"]
    if issues:
        return Outcome(problem.id, reason=f"check:{issues[0].code}", detail="; ".join(map(str, issues)),
                       extra={"method": "rule", "question": question, "shards": shards})
    return Outcome(problem.id, episode=episode_for(problem, question, shards, "rule", unsharded))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own "usage: ... error:" as the one `error: ` line of memrl/errors.py
        raise ConfigError(f"{message} (python -m data_tools.shard --help)")


def count(minimum: int):
    """An argparse type: an int >= minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value
    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its message
    return parse


def seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


seconds.__name__ = "positive number of seconds"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m data_tools.shard", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="dataset JSONL (gsm8k/{train,test}.jsonl, math500/test.jsonl)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--method", required=True, choices=("rule", "llm"))
    p.add_argument("--out", required=True, help="episode JSONL to write (resumed if it exists)")
    p.add_argument("--limit", type=count(0), default=None, help="only the first N problems of the input")
    p.add_argument("--unshardable", choices=("fail", "whole"), default="fail",
                   help="a problem with nothing to shard besides its question: record a failure (default) "
                        "or keep it as one shard holding the whole problem (metadata.unsharded)")
    p.add_argument("--max-shards", type=count(1), default=35, help="the paper caps episodes at 35 shards")
    p.add_argument("--max-chars", type=count(1), default=MAX_PROBLEM_CHARS,
                   help="a longer problem is recorded as a failure (too_long) without being read")
    p.add_argument("--skip-failed", action="store_true", help="do not retry ids in FILE.failures.jsonl")
    p.add_argument("--batch-size", type=count(1), default=None,
                   help="problems per backend round (llm: 16; rule: 256)")
    llm = p.add_argument_group("llm over an OpenAI-compatible endpoint")
    llm.add_argument("--base-url", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    llm.add_argument("--model", help="model name sent to the endpoint")
    llm.add_argument("--api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the API key ('' for a server without keys)")
    llm.add_argument("--timeout", type=seconds, default=60.0, help="seconds per HTTP request")
    llm.add_argument("--max-retries", type=count(0), default=3, help="client retries on timeouts, 429 and 5xx")
    llm.add_argument("--concurrency", type=count(1), default=8, help="requests in flight")
    llm.add_argument("--max-attempts", type=count(1), default=3,
                     help="attempts per stage (malformed output is retried)")
    llm.add_argument("--max-tokens", type=count(1), default=2048)
    local = p.add_argument_group("llm on a local HF checkpoint (memrl's generator)")
    local.add_argument("--local-model", help="HF checkpoint directory")
    local.add_argument("--device", default=None)
    local.add_argument("--dtype", default="bfloat16")
    return p


def make_backend(args: argparse.Namespace):
    if args.local_model:
        from data_tools.llm_backends import LocalGeneratorBackend
        from memrl.paths import model_source

        model_source(args.local_model, "--local-model")  # before torch loads: a typo fails at once, never a download

        return LocalGeneratorBackend(args.local_model, max_new_tokens=args.max_tokens, device=args.device,
                                     dtype=args.dtype)
    if not (args.base_url and args.model):
        raise ConfigError("--base-url and --model: --method llm needs both (an OpenAI-compatible endpoint), or "
                          "--local-model")
    from data_tools.llm_backends import OpenAIChatBackend

    try:
        return OpenAIChatBackend(args.base_url, args.model, api_key_env=args.api_key_env or None,
                                 timeout=args.timeout, max_retries=args.max_retries,
                                 concurrency=args.concurrency, max_tokens=args.max_tokens)
    except ValueError as e:
        raise ConfigError(f"--api-key-env: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Errors (memrl.errors.MemrlError: bad files, bad options) propagate; `python -m` prints them as one line."""
    args = build_parser().parse_args(argv)
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a directory; give the episode file to write")
    problems = load_problems(args.input, args.dataset)
    if args.limit is not None:
        problems = problems[: args.limit]
    items = [(p.id, p) for p in problems]
    backend = None
    if args.method == "rule":
        def process(batch: list[Problem]) -> list[Outcome]:
            return [rule_outcome(p, args.unshardable, args.max_shards) for p in batch]
        batch_size = args.batch_size or 256
    else:
        from data_tools.llm_shard import LLMShardConfig, LLMSharder

        backend = make_backend(args)
        sharder = LLMSharder(backend, LLMShardConfig(max_attempts=args.max_attempts, max_shards=args.max_shards,
                                                     max_units=args.max_shards + 1, unshardable=args.unshardable))
        process = sharder.shard_many
        batch_size = args.batch_size or 16
    try:
        summary = run_resumable(items, bounded(process, args.max_chars), args.out, batch_size=batch_size,
                                desc=f"{args.method} {args.dataset}", skip_failed=args.skip_failed)
    finally:
        if backend is not None:
            backend.close()
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main(install_error_handler(sys.argv[1:])))
