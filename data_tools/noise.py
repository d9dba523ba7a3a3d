"""Noise variants of a sharded episode file (paper §3.1), from the command line:

    python -m data_tools.noise --input EPISODES.jsonl --wikitext wiki.test.raw --variant mixed --out OUT.jsonl

The variants, the passages and the seeding are memrl/noise.py's (train.py and evaluate.py place the same noise at
run time); this module reads and writes the files, resumably (data_tools/runner.py).
"""

from __future__ import annotations

import argparse
import sys

from data_tools.runner import Outcome, run_resumable
from data_tools.schema import DataError, read_episodes
from memrl.noise import VARIANTS, load_passages, make_variant, problem_shards


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
