"""Make the built-in starting policy: a tiny Qwen2-shaped model, warmed up (supervised) on the coin-sum task.

    python scripts/make_synthetic_policy.py --device=cuda       # writes assets/synthetic-policy/ (~2.5 MB), ~6 min
    python scripts/make_synthetic_policy.py                     # the same on the CPU: hours (~1.3 s per step here)
    python scripts/make_synthetic_policy.py --out=some/dir --steps=200

What it does (memrl/synthetic.py explains the task and why the demonstrator is forgetful):
  1. the repo's byte tokenizer (256 bytes + ChatML specials), with its chat template;
  2. a random Qwen2-architecture Transformer (memrl.model; ~0.6M parameters, tied embeddings, GQA);
  3. teacher-forced next-token training on demonstrations of every turn kind the rollout produces, built with
     the default preset's templates exactly as memrl.rollout builds them:
       memory turns   the forgetful demonstrator: distractors ignored, each old fact re-copied with its person's
                      recall; half of the rows rewrite the demonstrator's own previous memory, half a complete one
                      (so memories of every completeness have been seen when RL starts keeping more facts)
       final turn     the answer from the memory it is shown (a forgetful or a complete one): each asked
                      person's fact looked up in it and restated, then their sum (exact arithmetic)
       whole problem  the full-history final turn and the single-turn prompt: the same answer from every asked
                      fact, so always right;
  4. memrl.hf_io.save_model (HF safetensors + config.json + tokenizer files), then a held-out report: greedy
     accuracy per condition, sampled memory accuracy, facts kept, and the best constant answer.
Deterministic for a given --seed on the same torch build, device and thread count. The shipped policy was made with
`--device=cuda` (10,000 steps, 5.5 minutes on an H200, 2026-11-30); on a 2-core CPU a step takes ~1-3 s, so the
same recipe takes hours there (other bits, the same kind of policy).
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
from memrl.config import preset  # noqa: E402
from memrl.hf_io import save_model  # noqa: E402
from memrl.model import ModelConfig, Transformer  # noqa: E402
from memrl.rollout import problem_text  # noqa: E402
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

# How often each row kind enters the warm-up. Memory turns carry the habit being taught and get every row; the
# answer turns reuse their copying and add 2-3 digits, learnt from fewer rows.
ROW_RATES = {"memory": 1.0, "final": 0.5, "history_final": 0.25, "single_turn": 0.75}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "synthetic-policy"))
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps")
    p.add_argument("--episodes_per_step", type=int, default=16, help="each gives ~5 demonstration rows")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1: robust to a busy machine (OpenMP threads spin)")
    p.add_argument("--device", default="cpu", help="cpu (~1 h on a 2-core machine) or cuda (minutes; other bits)")
    p.add_argument("--eval_problems", type=int, default=256)
    p.add_argument("--save_every", type=int, default=0, help="also save OUT-step_N every N steps (0 = only at the end)")
    return p.parse_args(argv)


def demonstration_rows(ep, tpl: Templates, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, prompt text, target text) for one episode's turns, each kind kept at its ROW_RATES."""
    asked, facts = synthetic.parse_episode(ep)
    perfect = synthetic.perfect_memories(ep)
    own_chain = rng.random() < 0.5  # rewrite the demonstrator's own memories, or complete ones
    rows, shown = [], None  # shown: the facts of the memory in the prompt (None = m_0)
    for t, shard in enumerate(ep.shards):
        held = [f for f in (shown or []) if rng.random() < synthetic.CoinSum().recall_of(f[0])]
        new = held + [facts[t]] if facts[t][0] in asked else held
        prompt_memory = tpl.initial_memory if shown is None else synthetic.memory_text(shown)
        rows.append(("memory", tpl.memory_turn(ep.question, prompt_memory, shard), synthetic.memory_text(new)))
        shown = new if own_chain else perfect[t]
    final_memory = shown if rng.random() < 0.5 else perfect[-1]
    rows.append(("final", tpl.final_turn(ep.question, synthetic.memory_text(final_memory)),
                 synthetic.answer_text(asked, final_memory)))
    correct = synthetic.answer_text(asked, facts)
    rows.append(("history_final", tpl.final_turn(ep.question, tpl.history(ep.shards)), correct))
    rows.append(("single_turn", tpl.single_turn_prompt(ep.question, problem_text(ep)), correct))
    return [r for r in rows if rng.random() < ROW_RATES[r[0]]]


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
    model.to(args.device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {args.steps} steps on {args.device}")

    tpl = Templates.from_config(preset("default").rollout)  # the prompts train.py's default run builds
    train = synthetic.make_episodes(args.steps * args.episodes_per_step, "train", seed=args.seed, distinct=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    t0 = time.time()
    for step in range(args.steps):
        eps = train[step * args.episodes_per_step: (step + 1) * args.episodes_per_step]
        rows = [r for ep in eps for r in demonstration_rows(ep, tpl, rng)]
        ids, loss_mask = (t.to(args.device) for t in make_batch(rows, tok, eos))
        hidden = model(ids, return_hidden=True)  # (B, T, H); right padding needs no mask under causal attention
        logits = F.linear(hidden[:, :-1][loss_mask[:, :-1]], model.output_weight())  # (N, V) target rows only
        targets = ids[:, 1:][loss_mask[:, :-1]]
        loss = F.cross_entropy(logits[:, : tok.vocab_size].float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            # teacher-forced exact match per row kind (memory rows cannot reach 1: the demonstrator's forgetting
            # is random; the answer rows can)
            hit = (logits.argmax(-1) == targets).split(loss_mask[:, :-1].sum(1).tolist())
            by_kind: dict[str, list[float]] = {}
            for (kind, _, _), h in zip(rows, hit):
                by_kind.setdefault(kind, []).append(float(h.all()))
            em = "  ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(by_kind.items()))
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  exact {em}  "
                  f"{time.time() - t0:.0f}s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_model(model, f"{args.out}-step_{step + 1}", tokenizer_dir=tok_dir)

    out = save_model(model, args.out, tokenizer_dir=tok_dir)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    if args.eval_problems:
        report(out, args.eval_problems, device=args.device)


def report(policy_dir: Path, n: int, samples: int = 4, device: str = "cpu"):
    """Held-out accuracy per condition with the default preset's rollout settings (what train.py uses): greedy for
    all three, sampled (T = 1) for memory, the facts the final memories keep, and the best constant answer."""
    from memrl.config import EVAL_CONDITIONS
    from memrl.evaluation import evaluate_policy, lic_drop
    from memrl.generate import Generator
    from memrl.hf_io import load_model
    from memrl.report import markdown_table

    tok = Tokenizer.from_pretrained(policy_dir)
    generator = Generator(load_model(policy_dir, dtype=torch.float32).to(device), tok.vocab_size)
    episodes = synthetic.make_episodes(n, "eval", seed=synthetic.EVAL_SEED)
    cfg = preset("default")
    acc = evaluate_policy(generator, tok, episodes, cfg, EVAL_CONDITIONS)
    print(markdown_table({str(policy_dir): {"conditions": acc, "lic_drop": lic_drop(acc)}}))
    mem = evaluate_policy(generator, tok, episodes, cfg, ("memory",), samples=samples)["memory"]
    print(f"memory condition: greedy {mem['accuracy']:.3f} (facts kept {mem['facts_kept']:.3f}), sampled x{samples} "
          f"{mem['sampled_accuracy']:.3f} (facts kept {mem['sampled_facts_kept']:.3f})")
    answer, acc_const = synthetic.best_constant_accuracy(episodes)
    print(f"best constant answer: {answer} scores {acc_const:.3f} on these {n} problems")


if __name__ == "__main__":
    main()
