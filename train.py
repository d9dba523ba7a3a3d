"""Memory RL: train a policy to keep a bounded memory while a problem arrives in shards (DESIGN §3, the paper §3.2).

    python train.py                                        # built-in synthetic task + tiny policy, CPU, minutes
    python train.py --preset=paper-1.5b --data.train_path=gsm8k_train.episodes.jsonl
    python train.py --train.max_steps=20 --rollout.group_size=4   # any --section.key=value of memrl/config.py
    python train.py --resume                               # continue train.run_dir from its newest checkpoint
    python train.py --help                                 # every config key with its current value

One step: rollout (B problems x G trajectories, turn by turn) -> reward (verifier on the final answer) ->
advantage (DrGRPO, per trajectory, broadcast to every generated token of every turn) -> [dynamic sampling] ->
[old / reference log-probs] -> loss (dual-clip PPO + KL, one token-mean over the global batch, micro-batched) ->
AdamW step -> log -> [eval] -> [checkpoint]. Each stage is one section below.
Determinism: one seed (train.seed); rollout seeds derive from (seed, step, problem, turn, sample), the data order
from (seed, epoch). With fp32 weights on CPU, --resume reproduces an uninterrupted run bit for bit.
"""
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from evaluate import eval_episodes, evaluate_policy, resolve_policy
from memrl import synthetic
from memrl.algo import (DynamicSampler, count_response_tokens, group_advantages, overlong_penalty, pack_turns,
                        policy_loss, response_logprobs)
from memrl.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from memrl.config import RUN_CONFIG_NAME, ConfigError, describe, parse_cli, save_config
from memrl.distributed import all_reduce_sum, init_distributed, print0
from memrl.episodes import Episode, load_episodes
from memrl.generate import Generator
from memrl.hf_io import load_model, resolve_checkpoint
from memrl.reward import score
from memrl.rollout import Sampling, concat, derive_seed, rollout
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer

SYNTHETIC_TRAIN_SIZE = 2048  # distinct coin-tally training problems (of ~3,500); the default run sees a few hundred

# ----------------------------------------------------------------------------- config
argv = sys.argv[1:]
try:
    cfg = parse_cli([a for a in argv if a not in ("-h", "--help")])
except ConfigError as e:
    sys.exit(f"error: {e}")
if "-h" in argv or "--help" in argv:
    print(__doc__ + "\nConfig (preset " + cfg.preset + ", after overrides):\n" + describe(cfg))
    sys.exit(0)
dist_info = init_distributed(cfg.train.device)  # the FSDP seam: rank / world size / device, from torchrun's env
assert dist_info.world_size == 1, "multi-process training needs FSDP wrapping (memrl/distributed.py), not wired yet"
device = dist_info.device
dtype = getattr(torch, cfg.model.dtype)
run_dir = Path(cfg.train.run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
save_config(cfg, run_dir / RUN_CONFIG_NAME)
torch.manual_seed(cfg.train.seed)

# ----------------------------------------------------------------------------- model, reference, tokenizer
policy_path = resolve_checkpoint(resolve_policy(cfg.model.path))  # "" = assets/synthetic-policy
policy = load_model(policy_path, dtype=dtype, device=device)
policy.gradient_checkpointing = cfg.model.gradient_checkpointing
tokenizer = Tokenizer.from_pretrained(policy_path)
ref = None
if cfg.algo.kl_coef > 0:  # the frozen reference: the starting weights unless model.ref_path says otherwise
    ref = load_model(resolve_policy(cfg.model.ref_path) if cfg.model.ref_path else policy_path, dtype=dtype,
                     device=device).eval().requires_grad_(False)
generator = Generator(policy, tokenizer.vocab_size)  # generates with the live policy weights, no copy
templates = Templates.from_config(cfg.rollout)
sampling = Sampling.from_config(cfg.rollout)
print0(f"policy {policy_path} ({policy.num_params() / 1e6:.2f}M params, {cfg.model.dtype}, {device}); "
       f"reference: {'yes' if ref is not None else 'none (kl_coef = 0)'}")

# ----------------------------------------------------------------------------- data
if cfg.data.train_path:
    train_set = load_episodes(cfg.data.train_path, max_shards=cfg.data.max_shards,
                              max_shard_tokens=cfg.data.max_shard_tokens,
                              count_tokens=lambda s: len(tokenizer.encode(s)))
else:
    train_set = synthetic.make_episodes(SYNTHETIC_TRAIN_SIZE, "train", seed=synthetic.TRAIN_SEED)
if cfg.data.noise_variant != "sharded":  # paper §3.1 training variants, built on the fly like data_tools.noise
    from data_tools.noise import load_passages, make_variant

    passages = load_passages(cfg.data.noise_path)
    train_set = [Episode(**{k: v for k, v in make_variant(ep.to_json(), cfg.data.noise_variant, passages,
                                                          seed=cfg.train.seed).items()}) for ep in train_set]
eval_set = eval_episodes(cfg, tokenizer)
steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
print0(f"data: {len(train_set)} training problems, {len(eval_set)} held-out; {max_steps} steps of "
       f"{cfg.train.batch_size} problems x {cfg.rollout.group_size} samples, condition {cfg.rollout.condition}")


def epoch_order(epoch: int) -> list[int]:
    order = list(range(len(train_set)))
    if cfg.data.shuffle:
        random.Random(derive_seed(cfg.train.seed, "data-order", epoch)).shuffle(order)
    return order


def next_problems(cursor: int, n: int) -> tuple[list[Episode], int]:
    """n problems from the position `cursor` of the endless, per-epoch shuffled stream; the new cursor."""
    out = []
    for c in range(cursor, cursor + n):
        out.append(train_set[epoch_order(c // len(train_set))[c % len(train_set)]])
    return out, cursor + n


def reward_of(traj) -> float:
    return score(traj.final_text, traj.episode.answer, traj.episode.metadata.get("reward_kind", cfg.data.reward_kind))


# ----------------------------------------------------------------------------- optimizer, schedule, resume
optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.adam_eps,
                              weight_decay=cfg.optim.weight_decay)
warmup = cfg.optim.warmup_steps  # linear warmup to lr, then constant (paper A.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
start_step, cursor = 0, 0
resume_from = resolve_resume(run_dir, cfg.train.resume)
if resume_from is not None:
    state = load_checkpoint(resume_from, policy, optimizer, scheduler)
    start_step, cursor = state["step"], state["data"]["cursor"]
    print0(f"resumed from {resume_from} at step {start_step}")
elif cfg.train.resume:
    print0(f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
metrics_path = run_dir / "metrics.jsonl"
if metrics_path.exists():  # keep the history up to the resumed step; a fresh run starts a fresh file
    kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
    metrics_path.write_text("".join(ln + "\n" for ln in kept) if start_step else "")


def log(row: dict) -> None:
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_eval(step: int) -> dict:
    t0 = time.time()
    policy.eval()
    acc = evaluate_policy(generator, tokenizer, eval_set, cfg, conditions=(cfg.rollout.condition,))
    policy.train()
    row = {"step": step, "kind": "eval", **{f"accuracy/{c}": a["accuracy"] for c, a in acc.items()},
           "eval_s": round(time.time() - t0, 3)}
    log(row)
    tqdm.write(f"eval @ step {step}: " + ", ".join(f"{c} accuracy {a['accuracy']:.3f} (n={a['n']})"
                                                   for c, a in acc.items()))
    return row


# ----------------------------------------------------------------------------- training loop
last_eval = run_eval(0) if start_step == 0 else {}
pbar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="train",
            disable=not dist_info.is_main, dynamic_ncols=True)
for step in pbar:
    t_step = time.time()

    # --- rollout: B problems x G trajectories, every turn of every live trajectory in one generate() call
    # --- reward: the verifier on each trajectory's final answer
    # --- dynamic sampling (optional): keep only groups with mixed rewards, refill from more problems
    sampler = DynamicSampler(cfg.train.batch_size, cfg.algo.max_sampling_rounds) if cfg.algo.dynamic_sampling else None
    parts, keeps, all_rewards = [], [], []
    while True:
        problems, cursor = next_problems(cursor, cfg.train.batch_size)
        result = rollout(generator, tokenizer, problems, cfg.rollout.condition, cfg.rollout.group_size, templates,
                         sampling, seed=cfg.train.seed, step=step)
        rewards = torch.tensor([reward_of(t) for t in result.trajectories])
        all_rewards.append(rewards)
        parts.append(result)
        if sampler is None:
            keeps.append([True] * len(rewards))
            break
        keeps.append(sampler.add(rewards, torch.tensor([t.group_id for t in result.trajectories])).tolist())
        if not sampler.need_more():
            break
    if sampler is not None and sampler.exhausted():
        tqdm.write(f"step {step + 1}: {sampler.message()}")
    batch = concat(parts, keeps)
    rewards = torch.cat([r[torch.tensor(k, dtype=torch.bool)] for r, k in zip(all_rewards, keeps)])
    t_rollout = time.time() - t_step

    # --- advantage: A_i = r_i - mean of its group (DrGRPO), computed per trajectory, then broadcast by pack_turns
    shaped = rewards.clone()
    if cfg.algo.overlong_shaping:  # DAPO soft overlong penalty on the final answer's length
        final_len = torch.zeros(len(batch.trajectories))
        for rec in batch.records:
            if rec.kind == "final":
                final_len[rec.trajectory_id] = len(rec.response_ids)
        shaped += overlong_penalty(final_len, cfg.rollout.response_max_tokens, cfg.algo.overlong_cache_tokens)
    group_ids = torch.tensor([t.group_id for t in batch.trajectories], dtype=torch.long)
    advantages = group_advantages(shaped, group_ids, std_normalize=cfg.algo.advantage == "grpo")
    micro_batches = [mb.to(device) for mb in pack_turns(batch.records, advantages, cfg.train.micro_batch_tokens)]
    # the token-mean's denominator: every response token of the GLOBAL batch (summed over ranks), as a tensor
    num_tokens = all_reduce_sum(torch.tensor(float(count_response_tokens(batch.records)), device=device))

    # --- old / reference log-probs (no grad). On-policy (one update per rollout): old = None, i.e. ratio == 1
    with torch.no_grad():
        ref_logps = [response_logprobs(ref, mb, cfg.rollout.temperature, tokenizer.vocab_size)[0]
                     for mb in micro_batches] if ref is not None else None
        old_logps = [response_logprobs(policy, mb, cfg.rollout.temperature, tokenizer.vocab_size)[0]
                     for mb in micro_batches] if cfg.algo.updates_per_rollout > 1 else None

    # --- loss: dual-clip PPO + beta * KL, summed over micro-batches = one token-mean over the global batch
    # --- step: AdamW after grad-norm clipping; a non-finite loss or gradient skips the update
    t_train = time.time()
    skipped = 0
    for update in range(cfg.algo.updates_per_rollout if micro_batches else 0):
        optimizer.zero_grad(set_to_none=True)
        sums = defaultdict(float)
        for i, mb in enumerate(micro_batches):
            logp, entropy = response_logprobs(policy, mb, cfg.rollout.temperature, tokenizer.vocab_size,
                                              with_entropy=True)  # (N,) fp32 each
            loss, m = policy_loss(logp, mb.advantages, num_tokens,
                                  old_logp=old_logps[i] if old_logps is not None else None,
                                  ref_logp=ref_logps[i] if ref_logps is not None else None, entropy=entropy,
                                  eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high, clip_c=cfg.algo.clip_c,
                                  kl_coef=cfg.algo.kl_coef, kl_type=cfg.algo.kl_type)
            loss.backward()
            sums["loss"] += loss.item()
            for k, v in m.items():
                sums[k] += v.item()
            # trainer vs sampler log-prob of the same tokens: ~0 unless the two numerics (or top-p/k) disagree
            sums["logp_gap"] += ((logp.detach() - mb.rollout_logprobs).abs().sum() / num_tokens).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip).item()
        if math.isfinite(sums["loss"]) and math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"step {step + 1}: non-finite {'loss' if not math.isfinite(sums['loss']) else 'gradient'} "
                       f"(loss {sums['loss']}, grad norm {grad_norm}): update skipped")
    if not micro_batches:
        sums, grad_norm = defaultdict(float), 0.0
        tqdm.write(f"step {step + 1}: no trajectory left after dynamic sampling: update skipped")
    scheduler.step()
    t_train = time.time() - t_train

    # --- log
    memory_recs = [r for r in batch.records if r.kind == "memory"]
    final_recs = [r for r in batch.records if r.kind == "final"]
    step_s = time.time() - t_step
    row = {"step": step + 1, "kind": "train", "reward": shaped.mean().item() if len(shaped) else 0.0,
           "accuracy": torch.cat(all_rewards).mean().item(),  # every sampled trajectory, before any filtering
           **{k: v for k, v in sums.items()}, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
           "memory_tokens": sum(len(r.response_ids) for r in memory_recs) / max(len(memory_recs), 1),
           "memory_cut": sum(r.finish_reason == "length" for r in memory_recs) / max(len(memory_recs), 1),
           "answer_tokens": sum(len(r.response_ids) for r in final_recs) / max(len(final_recs), 1),
           "response_tokens": int(num_tokens.item()), "trajectories": len(batch.trajectories),
           "rollout_rounds": len(parts), "skipped": skipped, "cursor": cursor,
           "rollout_s": round(t_rollout, 3), "train_s": round(t_train, 3), "step_s": round(step_s, 3),
           "train_tokens_per_s": round(sum(mb.num_tokens for mb in micro_batches) * cfg.algo.updates_per_rollout
                                       * (2 if ref is not None else 1) / max(t_train, 1e-9)),
           "rollout_new_tokens_per_s": round(sum(s.get("new_tokens", 0) for s in batch.generate_stats)
                                             / max(t_rollout, 1e-9))}
    if (step + 1) % cfg.train.log_every == 0:
        log(row)

    # --- eval (held-out, greedy) and checkpoint
    done = step + 1 == max_steps
    if done or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0):
        last_eval = run_eval(step + 1)
    if done or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
        save_checkpoint(run_dir, step + 1, policy, optimizer, scheduler, data_state={"cursor": cursor}, config=cfg,
                        keep_last=cfg.train.keep_last, tokenizer_dir=policy_path)
    postfix = {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}",
               "kl": f"{row['kl']:.4f}" if "kl" in row and ref is not None else "n/a", "s/step": f"{step_s:.1f}"}
    postfix.update({k.replace("accuracy/", "eval_"): f"{v:.2f}" for k, v in last_eval.items()
                    if k.startswith("accuracy/")})
    pbar.set_postfix(postfix)
pbar.close()
print0(f"done: {max_steps} steps; metrics in {metrics_path}; checkpoints in {run_dir / 'checkpoints'}")
