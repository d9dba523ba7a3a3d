"""Make the built-in starting policy: a tiny Qwen2-shaped model, supervised-pretrained on the coin-tally task.

    python scripts/make_synthetic_policy.py                     # writes assets/synthetic-policy/ (~2.5 MB, ~15 min)
    python scripts/make_synthetic_policy.py --out=some/dir --steps=200

What it does (memrl/synthetic.py explains the task and why the demonstrations mix two habits):
  1. the repo's byte tokenizer (256 bytes + ChatML specials), with its chat template;
  2. a random Qwen2-architecture Transformer (memrl.model; ~0.6M parameters, tied embeddings, GQA);
  3. teacher-forced next-token training on demonstrations of every turn kind the rollout produces:
     memory turns and the final turn (habit "add" with probability add_fraction, else "overwrite"),
     full-history turns and the single-turn prompt (always the right total);
     the prompts are built by memrl.templates exactly as memrl.rollout builds them;
  4. memrl.hf_io.save_model (HF safetensors + config.json + tokenizer files), then a held-out greedy check.
Deterministic for a given --seed on the same torch build and thread count.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from memrl import synthetic  # noqa: E402
from memrl.hf_io import save_model  # noqa: E402
from memrl.model import ModelConfig, Transformer  # noqa: E402
from memrl.templates import Templates  # noqa: E402
from memrl.tokenizer import Tokenizer, make_byte_tokenizer  # noqa: E402

# Qwen2 shapes scaled down: q/k/v bias, GQA (4 query heads over 2 kv heads), SwiGLU, RMSNorm, tied embeddings.
# vocab_size 272 > the tokenizer's 259 tokens, padded like Qwen's 151,936 > 151,665: the rollout must mask them.
MODEL_CONFIG = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=272, hidden_size=128, intermediate_size=384,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
    eos_token_id=258, pad_token_id=256,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "synthetic-policy"))
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--episodes_per_step", type=int, default=16, help="each gives ~4 demonstration rows")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1: robust to a busy machine (OpenMP threads spin)")
    p.add_argument("--eval_problems", type=int, default=256)
    p.add_argument("--save_every", type=int, default=0, help="also save OUT-step_N every N steps (0 = only at the end)")
    return p.parse_args(argv)


# How often each row kind enters pretraining. Copying the memory into \boxed{} is learnt in a few hundred steps; the
# memory update (compare names, add) is the hard part and gets every row; the whole-problem rows (full-history final
# turn, single-turn) give the other two evaluation conditions a competent start.
ROW_RATES = {"memory": 1.0, "final": 0.25, "history_final": 0.5, "single_turn": 0.5}


def demonstration_rows(ep, habit: str, tpl: Templates, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, prompt text, target text) for the turns of one demonstrated episode (memory turns, final turn) plus a
    full-history final turn and a single-turn prompt, which always carry the right answer; kinds kept at ROW_RATES."""
    memories, answer = synthetic.demonstration(ep, habit)
    rows, memory = [], tpl.initial_memory
    for t, (shard, new_memory) in enumerate(zip(ep.shards, memories)):  # memory: (q, m_{t-1}, s_t) -> m_t
        rows.append(("memory0" if t == 0 else "memory", tpl.memory_turn(ep.question, memory, shard), new_memory))
        memory = new_memory
    rows.append(("final", tpl.final_turn(ep.question, memory), answer))
    correct = f"\\boxed{{{ep.answer}}}"
    rows.append(("history_final", tpl.final_turn(ep.question, tpl.history(ep.shards)), correct))
    rows.append(("single_turn", tpl.single_turn_prompt(ep.question, " ".join(ep.shards)), correct))
    return [r for r in rows if rng.random() < ROW_RATES.get(r[0], 1.0)]


@torch.no_grad()
def habit_probability(model, tok: Tokenizer, tpl: Templates, eps) -> float:
    """Mean probability of the "add" habit at the first memory turn: P("h" | "... Bob ") over "h" (has) + "g" (got)."""
    h_id, g_id = tok.encode("h")[0], tok.encode("g")[0]
    probs = []
    for ep in eps:
        target = ep.question.split(" ")[4]  # "How many coins does NAME have?"
        ids = tok.encode_prompt(tpl.memory_turn(ep.question, tpl.initial_memory, ep.shards[0])) + tok.encode(
            target + " ")
        p = model(torch.tensor([ids]))[0, -1].float().softmax(-1)
        probs.append(float(p[h_id] / (p[h_id] + p[g_id])))
    return sum(probs) / len(probs)


def make_batch(rows, tok: Tokenizer, eos: int):
    """Right-padded [B, T] ids and a [B, T] target mask (the response tokens and the closing <|im_end|>)."""
    seqs = [(tok.encode_prompt(p), tok.encode(t) + [eos]) for _, p, t in rows]
    T = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (p, t) in enumerate(seqs):
        ids[b, : len(p) + len(t)] = torch.tensor(p + t)
        loss_mask[b, len(p) - 1: len(p) + len(t) - 1] = True  # row i predicts token i+1
    return ids, loss_mask


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="synthetic-policy-"))
    tok_dir = make_byte_tokenizer(work / "tokenizer")
    tok = Tokenizer.from_pretrained(tok_dir)
    eos = tok.hf.eos_token_id  # <|im_end|>: ends every turn
    model = Transformer(ModelConfig.from_hf_dict(MODEL_CONFIG, source="MODEL_CONFIG"))
    with torch.no_grad():  # GPT-2 style init: small normal weights, the residual outputs scaled by depth
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers) if name.endswith(("o_proj.weight",
                                                                                              "down_proj.weight")) else 0.02
                p.normal_(0.0, std)
            elif name.endswith(".bias"):
                p.zero_()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {args.steps} steps")

    task = synthetic.CoinTally()
    tpl = Templates()
    train = synthetic.make_episodes(args.steps * args.episodes_per_step, "train", seed=args.seed, task=task,
                                    distinct=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    t0 = time.time()
    for step in range(args.steps):
        eps = train[step * args.episodes_per_step: (step + 1) * args.episodes_per_step]
        rows = [r for ep in eps
                for r in demonstration_rows(ep, "add" if rng.random() < task.add_fraction else "overwrite", tpl, rng)]
        ids, loss_mask = make_batch(rows, tok, eos)
        hidden = model(ids, return_hidden=True)  # (B, T, H); right padding needs no mask under causal attention
        logits = F.linear(hidden[:, :-1][loss_mask[:, :-1]], model.output_weight())  # (N, V) target rows only
        targets = ids[:, 1:][loss_mask[:, :-1]]
        loss = F.cross_entropy(logits[:, : tok.vocab_size].float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            # teacher-forced exact match per row kind (memory0 is a habit coin flip by design: ~add_fraction
            # of its rows say "has"; "p(has)" is the mean probability the model gives that habit there)
            hit = (logits.argmax(-1) == targets).split(loss_mask[:, :-1].sum(1).tolist())
            by_kind: dict[str, list[float]] = {}
            for (kind, _, _), h in zip(rows, hit):
                by_kind.setdefault(kind, []).append(float(h.all()))
            em = "  ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(by_kind.items()))
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  exact {em}  "
                  f"p(has) {habit_probability(model, tok, tpl, eps):.2f}  {time.time() - t0:.0f}s", flush=True)

        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_model(model, f"{args.out}-step_{step + 1}", tokenizer_dir=tok_dir)

    out = save_model(model, args.out, tokenizer_dir=tok_dir)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    if args.eval_problems:
        report(out, args.eval_problems)


def report(policy_dir: Path, n: int):
    """Held-out greedy accuracy per condition, with the default preset's rollout settings (what train.py uses)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evaluate import evaluate_policy, markdown_table, lic_drop
    from memrl.config import preset
    from memrl.generate import Generator
    from memrl.hf_io import load_model
    from memrl.rollout import CONDITIONS

    tok = Tokenizer.from_pretrained(policy_dir)
    generator = Generator(load_model(policy_dir, dtype=torch.float32), tok.vocab_size)
    episodes = synthetic.make_episodes(n, "eval", seed=synthetic.EVAL_SEED)
    acc = evaluate_policy(generator, tok, episodes, preset("default"), CONDITIONS)
    print(markdown_table({str(policy_dir): {"conditions": acc, "lic_drop": lic_drop(acc)}}))


if __name__ == "__main__":
    main()
