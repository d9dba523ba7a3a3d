"""Conversation rollout benchmark: KV continuation vs prefilling the whole chat every turn (the `conversation`
condition, memrl/conversation.py), Qwen2.5-1.5B shapes with random weights, or a real model directory.

    python -m benchmarks.bench_conversation                    # H200: 16 problems x G 4, 6 shards, ~1-2 min
    python -m benchmarks.bench_conversation --model DIR        # a real HF checkpoint (its tokenizer, ignore_eos)
    python -m benchmarks.bench_conversation --cpu              # CPU smoke run on a tiny config (automatic without CUDA)
    options: --problems N --group G --shards S --shard-chars C --reply R --answer A --out DIR (default $OUT, else
             bench_out/) --no-compile

The same rollout (memrl.rollout.rollout, condition "conversation", sampled at temperature 1 with the rollout's
seeds as in training, every reply run to its budget with rollout.ignore_eos: random weights never stop) is timed
twice per mode, the first run as warm-up (torch.compile,
CUDA graphs); each turn is one generate() call over all live conversations:
  - reuse:     each conversation's K/V is retained between turns; a turn prefills only the previous reply's last
               token and the new user message (Generator retain= / extend=);
  - re-prefill: every turn prefills the whole chat so far (kv_reuse=False), as a generator without continuation must.
Per turn: the tokens prefilled, prefill seconds, the call's seconds; then the totals and the speed-up. The sampled
replies of the two modes are compared (same seeds; on a GPU bf16 rounding that differs between prefill shapes can
flip a near-tie: reported, not asserted).
Random-weight runs use the repo's byte-level tokenizer (ChatML template; ids >= 259 masked), so a shard of C
characters is C tokens. Writes bench_conversation.json + .md to the output directory.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import QWEN25_1P5B, TINY, build_model  # noqa: E402
from memrl.episodes import Episode  # noqa: E402
from memrl.generate import Generator  # noqa: E402
from memrl.config import RolloutCfg  # noqa: E402
from memrl.rollout import rollout  # noqa: E402
from memrl.templates import Templates  # noqa: E402
from memrl.tokenizer import Tokenizer, make_byte_tokenizer  # noqa: E402

WORDS = "the of a to in shop sells apples pears each costs dollars more than half twice left after buys gives".split()


def episodes(n: int, shards: int, chars: int) -> list[Episode]:
    """n problems of `shards` shards of `chars` characters (deterministic filler text: the content is irrelevant)."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(shards * chars)]
        text = " ".join(words)
        parts = [text[s * chars:(s + 1) * chars] for s in range(shards)]
        out.append(Episode(f"p{i}", f"How many apples are left in shop {i}?", parts, "0"))
    return out


def run(gen: Generator, tok: Tokenizer, eps: list[Episode], group: int, settings: RolloutCfg, reuse: bool):
    t0 = time.perf_counter()
    res = rollout(gen, tok, eps, "conversation", group, Templates(), settings, seed=0, kv_reuse=reuse)
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    turns = [{"turn": t, "rows": s["rows"], "prefill_tokens": s["prefill_tokens"],
              "reused_kv_tokens": s.get("reused_kv_tokens", 0), "prefill_s": s["prefill_s"], "call_s": s["total_s"],
              "capture_s": s["capture_s"], "new_tokens": s["new_tokens"]} for t, s in enumerate(res.generate_stats)]
    return res, {"wall_s": time.perf_counter() - t0, "turns": turns}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--model", default="", help="a real HF checkpoint directory (default: random Qwen2.5-1.5B)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--shard-chars", type=int, default=200)
    ap.add_argument("--reply", type=int, default=128, help="reply budget of a shard turn (memory_cap_tokens)")
    ap.add_argument("--answer", type=int, default=256, help="final answer budget (response_max_tokens)")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:  # a smoke run: small everything
        args.problems, args.group, args.shards, args.shard_chars, args.reply, args.answer = 2, 2, 3, 40, 8, 8
    if args.model:
        from memrl.hf_io import load_model

        model = load_model(args.model, dtype=dtype, device=device).eval()
        tok = Tokenizer.from_pretrained(args.model)
        name = args.model
    else:
        model = build_model(QWEN25_1P5B if on_gpu else TINY, device, dtype)
        tok = Tokenizer.from_pretrained(make_byte_tokenizer(Path(tempfile.mkdtemp()) / "byte-tokenizer"))
        name = "Qwen2.5-1.5B shapes, random weights" if on_gpu else "tiny config, random weights"
    compile_ = on_gpu and not args.no_compile
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
           "torch": torch.__version__, "model": name, "dtype": str(dtype).removeprefix("torch."), "compile": compile_}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    eps = episodes(args.problems, args.shards, args.shard_chars)
    settings = RolloutCfg(memory_cap_tokens=args.reply, response_max_tokens=args.answer, ignore_eos=True)
    results = {"env": env, "args": vars(args), "modes": {}}
    replies = {}
    # one generator for both modes: the same compiled functions, cache and slot layout (min_slot_len is the same)
    gen = Generator(model, tok.vocab_size, kv_memory_fraction=0.6, compile=compile_, compile_fallback=False)
    for mode, reuse in (("reuse", True), ("re-prefill", False)):
        run(gen, tok, eps, args.group, settings, reuse)  # warm-up: compile, CUDA graphs, this mode's prefill shapes
        res, timing = run(gen, tok, eps, args.group, settings, reuse)
        replies[mode] = [r.response_ids for r in res.records]
        results["modes"][mode] = timing
        print(f"{mode}: {timing['wall_s']:.2f} s for {len(timing['turns'])} turns", flush=True)
    same = sum(a == b for a, b in zip(replies["reuse"], replies["re-prefill"]))
    results["identical_replies"] = f"{same}/{len(replies['reuse'])}"
    write(results, Path(args.out))


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_conversation.json").write_text(json.dumps(res, indent=2) + "\n")
    e, a = res["env"], res["args"]
    reuse, fresh = res["modes"]["reuse"], res["modes"]["re-prefill"]
    lines = [
        "# Conversation rollout: KV continuation vs re-prefill", "",
        f"{e['device']} | torch {e['torch']} | {e['model']} ({e['dtype']}) | compile={e['compile']} | {e['date']}", "",
        f"{a['problems']} problems x G {a['group']} = {a['problems'] * a['group']} conversations, {a['shards']} shards "
        f"of {a['shard_chars']} characters, replies {a['reply']} tokens, answer {a['answer']} tokens (ignore_eos); "
        f"sampled replies identical in both modes: {res['identical_replies']}.", "",
        "| turn | rows | prefilled tokens (reuse / re-prefill) | prefill s (reuse / re-prefill) | "
        "call s (reuse / re-prefill) | x |",
        "|---|---|---|---|---|---|",
    ]
    for r, f in zip(reuse["turns"], fresh["turns"]):
        lines.append(f"| {r['turn']} | {r['rows']} | {r['prefill_tokens']:,} / {f['prefill_tokens']:,} | "
                     f"{r['prefill_s']:.3f} / {f['prefill_s']:.3f} | {r['call_s']:.3f} / {f['call_s']:.3f} | "
                     f"{f['call_s'] / max(r['call_s'], 1e-9):.2f} |")
    tr, tf = sum(t["call_s"] for t in reuse["turns"]), sum(t["call_s"] for t in fresh["turns"])
    n = len(reuse["turns"])
    lines += ["", f"Per turn (mean of {n}): reuse {tr / n:.3f} s, re-prefill {tf / n:.3f} s "
              f"({tf / max(tr, 1e-9):.2f}x); whole rollout {reuse['wall_s']:.2f} s vs {fresh['wall_s']:.2f} s."]
    text = "\n".join(lines) + "\n"
    (out / "bench_conversation.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
