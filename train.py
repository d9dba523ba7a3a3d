"""Memory RL: train a policy to keep a bounded memory while a problem arrives in shards (DESIGN §3, the paper §3.2).

    python train.py                                        # built-in synthetic task + tiny policy, CPU, minutes
    python train.py --preset=paper-1.5b --data.train_path=gsm8k_train.episodes.jsonl
    python train.py --train.max_steps=20 --rollout.group_size=4   # any --section.key=value of memrl/config.py
    python train.py --resume                               # continue train.run_dir from its newest checkpoint
    python train.py --help                                 # every config key with its current value
    torchrun --nproc_per_node 8 train.py --preset=paper-1.5b ...   # FSDP2 over 8 GPUs (README: multi-node too)

One step: rollout (B problems x G trajectories, turn by turn) -> reward (verifier on the final answer) ->
advantage (DrGRPO, per trajectory, broadcast to every generated token of every turn) -> [dynamic sampling] ->
[old / reference log-probs] -> loss (dual-clip PPO + KL, one token-mean over the global batch, micro-batched) ->
AdamW step -> log -> [eval] -> [checkpoint]. Each stage is one section below.
Determinism: one seed (train.seed); rollout seeds derive from (seed, step, problem, turn, sample), the data order
from (seed, epoch). On CPU, --resume reproduces an uninterrupted run bit for bit (fp32, or bf16 compute over fp32
masters: the checkpoint keeps the masters, memrl/checkpoint.py).
Precision: model.dtype is the compute dtype. bfloat16 trains fp32 master weights (FSDP2 mixed precision, on one
process too) and rolls out on a bf16 copy; float32 on one process is plain PyTorch, no process group.
Several processes (torchrun, memrl/distributed.py): the weights are FSDP2-sharded; every rank rolls out its own
slice of each step's problems (all G samples of a problem on one rank, so group advantages stay local) with the
weights gathered once per step, trains on its slice, and the token-mean, the gradient norm and every logged number
are global (summed / maxed over ranks). Rank 0 alone writes metrics, config and checkpoints.
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

from evaluate import episode_score, eval_episodes, evaluate_policy, resolve_policy
from memrl import synthetic
from memrl.algo import (DynamicSampler, TurnRecord, count_response_tokens, group_advantages, overlong_penalty,
                        pack_turns, policy_loss, response_logprobs)
from memrl.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from memrl.config import RUN_CONFIG_NAME, ConfigError, describe, parse_cli, save_config
from memrl.distributed import (all_reduce_max, all_reduce_sum, broadcast_object, clip_grad_norm, gathered_for_rollout,
                               init_distributed, is_sharded, max_over_ranks, print0, rollout_view, shard_model,
                               shutdown, sum_over_ranks)
from memrl.episodes import Episode, load_episodes
from memrl.generate import Generator
from memrl.hf_io import load_model, resolve_checkpoint
from memrl.rollout import Sampling, concat, derive_seed, rollout
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer
from memrl.trackers import make_tracker

SYNTHETIC_TRAIN_SIZE = 2048  # distinct coin-sum training problems; the default run sees a few hundred

# ----------------------------------------------------------------------------- config
argv = sys.argv[1:]
try:
    cfg = parse_cli([a for a in argv if a not in ("-h", "--help")])
except ConfigError as e:
    sys.exit(f"error: {e}")
if "-h" in argv or "--help" in argv:
    print(__doc__ + "\nConfig (preset " + cfg.preset + ", after overrides):\n" + describe(cfg))
    sys.exit(0)
dtype = getattr(torch, cfg.model.dtype)  # the COMPUTE dtype; the trained (master) weights are fp32 under FSDP
# FSDP2 whenever there are several processes or a low-precision compute dtype: its mixed precision keeps fp32 master
# weights (AdamW at lr 1e-6 would round nearly every bf16 update away) under a bf16 compute copy. One bf16 process
# gets a single-rank process group, so 1 and N GPUs run the same code. fp32 on one process: no group, no FSDP.
fsdp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or dtype != torch.float32
dist_info = init_distributed(cfg.train.device, single_rank_group=fsdp)  # rank / world size / device (torchrun's env)
rank, world = dist_info.rank, dist_info.world_size
if cfg.train.batch_size % world:
    sys.exit(f"error: train.batch_size={cfg.train.batch_size} is not divisible by the {world} processes: each rank "
             f"rolls out an equal slice of the step's problems")
per_rank = cfg.train.batch_size // world  # problems this rank rolls out and trains on per step
device = dist_info.device
run_dir = Path(cfg.train.run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
if dist_info.is_main:
    save_config(cfg, run_dir / RUN_CONFIG_NAME)
torch.manual_seed(cfg.train.seed)


def say(msg: str) -> None:
    if dist_info.is_main:
        tqdm.write(msg)


def sync() -> None:
    """Wait for queued GPU work: only where a wall-clock time is taken (the GPU otherwise runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# ----------------------------------------------------------------------------- model, reference, tokenizer
policy_path = resolve_checkpoint(resolve_policy(cfg.model.path))  # "" = assets/synthetic-policy
policy = load_model(policy_path, dtype=torch.float32 if fsdp else dtype, device=device)  # fp32 masters under FSDP
policy.gradient_checkpointing = cfg.model.gradient_checkpointing
tokenizer = Tokenizer.from_pretrained(policy_path)
ref = None
if cfg.algo.kl_coef > 0:  # the frozen reference: the starting weights unless model.ref_path says otherwise
    ref = load_model(resolve_policy(cfg.model.ref_path) if cfg.model.ref_path else policy_path, dtype=dtype,
                     device=device).eval().requires_grad_(False)
if fsdp:  # FSDP2 from outside the model: fp32 shards (masters), `dtype` compute copy, fp32 gradient reduction
    shard_model(policy, dtype if dtype != torch.float32 else None)
    if ref is not None:
        shard_model(ref, None)  # loaded in the compute dtype, no master (no optimizer, never a gradient)
# the policy itself without FSDP; else a hook-free view with persistent compute-dtype weights at fixed addresses,
# refreshed from the masters before each rollout (the generator's CUDA graphs stay valid: memrl/distributed.py)
rollout_model = rollout_view(policy)
with gathered_for_rollout(policy, rollout_model) as gen_model:
    generator = Generator(gen_model, tokenizer.vocab_size)  # generates with the live policy weights
templates = Templates.from_config(cfg.rollout)
sampling = Sampling.from_config(cfg.rollout)
print0(f"policy {policy_path} ({policy.num_params() / 1e6:.2f}M params, {cfg.model.dtype} compute, {device}"
       f"{f', FSDP2 over {world} process(es), fp32 masters' if fsdp else ''}); "
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
       f"{cfg.train.batch_size} problems x {cfg.rollout.group_size} samples, condition {cfg.rollout.condition}"
       f"{f' ({per_rank} problems per rank)' if world > 1 else ''}")


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
    """The verifier against every reference answer (QA: max F1 over them), exactly as evaluate.py scores."""
    return episode_score(traj.final_text, traj.episode, cfg.data.reward_kind)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one."""
    return bool(all_reduce_max(torch.tensor(int(flag), device=device)).item())


# ----------------------------------------------------------------------------- optimizer, schedule, resume
optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.adam_eps,
                              weight_decay=cfg.optim.weight_decay)
warmup = cfg.optim.warmup_steps  # linear warmup to lr, then constant (paper A.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
start_step, cursor = 0, 0
# rank 0 reads the checkpoint (the other nodes need no shared filesystem) and the state arrives by broadcast
resume_from = broadcast_object(resolve_resume(run_dir, cfg.train.resume) if dist_info.is_main else None)
if resume_from is not None:
    state = load_checkpoint(resume_from, policy, optimizer, scheduler)  # refuses another world size
    start_step, cursor = state["step"], state["data"]["cursor"]
    print0(f"resumed from {resume_from} at step {start_step}")
elif cfg.train.resume:
    print0(f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
metrics_path = run_dir / "metrics.jsonl"
if metrics_path.exists() and dist_info.is_main:  # keep the history up to the resumed step; a fresh run starts anew
    kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
    metrics_path.write_text("".join(ln + "\n" for ln in kept) if start_step else "")


tracker = make_tracker(cfg.train.tracker, run_dir, cfg.to_dict(), cfg.train.tracker_project,
                       resume=start_step > 0) if dist_info.is_main else None


def log(row: dict) -> None:
    if dist_info.is_main:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if tracker is not None:  # the same row, after metrics.jsonl has it (memrl/trackers.py)
            tracker.log(row)


def run_eval(step: int) -> dict:
    """Held-out accuracy of the trained condition: greedy, and sampled as training samples (rollout.eval_samples
    per problem, seeded) when asked; on the synthetic task also the share of asked facts the final memories keep.
    Every rank evaluates its slice (eval_set[rank::world]) with gathered weights; generation is no collective, so
    slices may differ in size; every rate is summed over ranks as (numerator, denominator)."""
    t0 = time.time()
    mine, c, k = eval_set[rank::world], cfg.rollout.condition, cfg.rollout.eval_samples
    policy.eval()
    with gathered_for_rollout(policy, rollout_model):
        res = evaluate_policy(generator, tokenizer, mine, cfg, conditions=(c,), samples=k)[c] if mine else {}
    policy.train()
    counts = {"n": res.get("n", 0), "asked": res.get("facts_asked", 0)}
    over = {"accuracy": "n", "sampled_accuracy": "n", "facts_kept": "asked", "sampled_facts_kept": "asked"}
    total = sum_over_ranks({**{name: res.get(name, 0.0) * counts[d] for name, d in over.items()}, **counts}, device)
    rates = {name: total[name] / total[d] for name, d in over.items()
             if total[d] and (k or not name.startswith("sampled"))}
    eval_s = max_over_ranks({"eval_s": time.time() - t0}, device)["eval_s"]
    row = {"step": step, "kind": "eval", **{f"{name}/{c}": v for name, v in rates.items()},
           "eval_s": round(eval_s, 3)}
    log(row)
    say(f"eval @ step {step} ({c}, n={int(total['n'])}): " + ", ".join(f"{name} {v:.3f}" for name, v in rates.items()))
    return row


# FSDP forward/backward passes are collectives: a rank with fewer micro-batches than another runs this one-token
# record with zero weight instead, so that every rank makes the same number of passes (see the loss section)
DUMMY = pack_turns([TurnRecord([0], [0], [0.0], trajectory_id=0, group_id=0, turn_index=0, kind="final")],
                   torch.zeros(1), 1)[0].to(device)


# ----------------------------------------------------------------------------- training loop
last_eval = run_eval(0) if start_step == 0 and cfg.train.eval_at_start else {}
pbar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="train",
            disable=not dist_info.is_main, dynamic_ncols=True)
for step in pbar:
    t_step = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gib is this step's peak

    # --- rollout: B problems x G trajectories, every turn of every live trajectory in one generate() call. Each rank
    #     takes its slice of the step's B problems; the weights are gathered once for the whole rollout
    # --- reward: the verifier on each trajectory's final answer
    # --- dynamic sampling (optional): keep only groups with mixed rewards, refill from more problems. Per rank: each
    #     fills its own slice; rounds continue while any rank needs more (all ranks draw the same problems, so the
    #     data cursor stays one number), and a rank already full skips its share of a round's problems
    sampler = DynamicSampler(per_rank, cfg.algo.max_sampling_rounds) if cfg.algo.dynamic_sampling else None
    parts, keeps, all_rewards = [], [], []
    with gathered_for_rollout(policy, rollout_model):
        while True:
            problems, cursor = next_problems(cursor, cfg.train.batch_size)
            if sampler is None or sampler.need_more():
                result = rollout(generator, tokenizer, problems[rank * per_rank: (rank + 1) * per_rank],
                                 cfg.rollout.condition, cfg.rollout.group_size, templates, sampling,
                                 seed=cfg.train.seed, step=step)  # seeds from global episode ids: slicing-invariant
                rewards = torch.tensor([reward_of(t) for t in result.trajectories])
                all_rewards.append(rewards)
                parts.append(result)
                if sampler is None:
                    keeps.append([True] * len(rewards))
                    break
                keeps.append(sampler.add(rewards, torch.tensor([t.group_id for t in result.trajectories])).tolist())
            if not any_rank(sampler.need_more()):
                break
    if sampler is not None and sampler.exhausted():
        tqdm.write(f"step {step + 1}{f' (rank {rank})' if world > 1 else ''}: {sampler.message()}")
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
    n_real = len(micro_batches)  # this rank's; padded with zero-weight dummies up to the largest count of any rank
    micro_batches += [DUMMY] * (int(all_reduce_max(torch.tensor(n_real, device=device)).item()) - n_real)
    # the token-mean's denominator: every response token of the GLOBAL batch (summed over ranks), as a tensor
    num_tokens = all_reduce_sum(torch.tensor(float(count_response_tokens(batch.records)), device=device))

    # --- old / reference log-probs (no grad). On-policy (one update per rollout): old = None, i.e. ratio == 1
    t_score = time.time()
    with torch.no_grad():
        ref_logps = [response_logprobs(ref, mb, cfg.rollout.temperature, tokenizer.vocab_size)[0]
                     for mb in micro_batches] if ref is not None else None
        old_logps = [response_logprobs(policy, mb, cfg.rollout.temperature, tokenizer.vocab_size)[0]
                     for mb in micro_batches] if cfg.algo.updates_per_rollout > 1 else None
    for model in (policy, ref):  # FSDP: the root stays gathered after a forward (see shard_model); free it
        if model is not None and is_sharded(model):
            model.reshard()
    scoring_models = (ref is not None) + (cfg.algo.updates_per_rollout > 1)
    sync()
    t_score = time.time() - t_score

    # --- loss: dual-clip PPO + beta * KL, summed over micro-batches = one token-mean over the global batch
    # --- step: AdamW after global grad-norm clipping; a non-finite loss or gradient skips the update (on all ranks:
    #     the loss sum is all-reduced and the norm is global, so every rank takes the same decision)
    t_update = time.time()
    skipped = 0
    for update in range(cfg.algo.updates_per_rollout if micro_batches else 0):
        optimizer.zero_grad(set_to_none=True)
        sums = defaultdict(float)
        for i, mb in enumerate(micro_batches):
            weight = 1.0 if i < n_real else 0.0  # a dummy pass: same collectives, zero gradient, not in any metric
            logp, entropy = response_logprobs(policy, mb, cfg.rollout.temperature, tokenizer.vocab_size,
                                              with_entropy=True)  # (N,) fp32 each
            loss, m = policy_loss(logp, mb.advantages, num_tokens,
                                  old_logp=old_logps[i] if old_logps is not None else None,
                                  ref_logp=ref_logps[i] if ref_logps is not None else None, entropy=entropy,
                                  eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high, clip_c=cfg.algo.clip_c,
                                  kl_coef=cfg.algo.kl_coef, kl_type=cfg.algo.kl_type)
            (loss if weight else loss * 0.0).backward()
            sums["loss"] += weight * loss.item()
            for k, v in m.items():
                sums[k] += weight * v.item()
            # trainer vs sampler log-prob of the same tokens: ~0 unless the two numerics (or top-p/k) disagree
            sums["logp_gap"] += weight * ((logp.detach() - mb.rollout_logprobs).abs().sum() / num_tokens).item()
        # this rank's sums of (token sum / N_global) -> summed over ranks: the global token-means
        sums = defaultdict(float, sum_over_ranks(sums, device))
        grad_norm = clip_grad_norm(policy, cfg.optim.grad_clip)  # the global norm, the same on every rank
        if math.isfinite(sums["loss"]) and math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            say(f"step {step + 1}: non-finite {'loss' if not math.isfinite(sums['loss']) else 'gradient'} "
                f"(loss {sums['loss']}, grad norm {grad_norm}): update skipped")
    if not micro_batches:
        sums, grad_norm = defaultdict(float), 0.0
        say(f"step {step + 1}: no trajectory left after dynamic sampling: update skipped")
    scheduler.step()
    sync()
    t_update = time.time() - t_update

    # --- log: sums and counts over ranks, times and memory as the max over ranks
    memory_recs = [r for r in batch.records if r.kind == "memory"]
    final_recs = [r for r in batch.records if r.kind == "final"]
    real_tokens = sum(mb.num_tokens for mb in micro_batches[:n_real])  # prompt + response rows, dummies excluded
    g = sum_over_ranks({
        "reward": shaped.double().sum().item(), "kept": len(shaped),
        "accuracy": sum(r.sum().item() for r in all_rewards), "sampled": sum(len(r) for r in all_rewards),
        "memory_tokens": sum(len(r.response_ids) for r in memory_recs), "memory_turns": len(memory_recs),
        "memory_cut": sum(r.finish_reason == "length" for r in memory_recs),
        "answer_tokens": sum(len(r.response_ids) for r in final_recs), "answer_turns": len(final_recs),
        "train_tokens": real_tokens * cfg.algo.updates_per_rollout, "score_tokens": real_tokens * scoring_models,
        "rollout_new_tokens": sum(s.get("new_tokens", 0) for s in batch.generate_stats), "micro_batches": n_real,
    }, device)
    peak = max_over_ranks({
        "rollout_s": t_rollout, "score_s": t_score, "update_s": t_update, "step_s": time.time() - t_step,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
        "rollout_rounds": len(parts),
    }, device)
    step_s = peak["step_s"]
    row = {"step": step + 1, "kind": "train", "reward": g["reward"] / max(g["kept"], 1),
           "accuracy": g["accuracy"] / max(g["sampled"], 1),  # every sampled trajectory, before any filtering
           **{k: v for k, v in sums.items()}, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
           "memory_tokens": g["memory_tokens"] / max(g["memory_turns"], 1),
           "memory_cut": g["memory_cut"] / max(g["memory_turns"], 1),
           "answer_tokens": g["answer_tokens"] / max(g["answer_turns"], 1),
           "response_tokens": int(num_tokens.item()), "trajectories": int(g["kept"]),
           "rollout_rounds": int(peak["rollout_rounds"]), "skipped": skipped, "cursor": cursor,
           # timings (max over ranks) and global token counts; the step benchmark parses these names
           **{k: round(peak[k], 3) for k in ("rollout_s", "score_s", "update_s", "step_s", "peak_mem_gib")},
           "train_s": round(peak["score_s"] + peak["update_s"], 3),
           **{k: int(g[k]) for k in ("train_tokens", "score_tokens", "rollout_new_tokens", "micro_batches")},
           "dummy_micro_batches": world * len(micro_batches) - int(g["micro_batches"]), "world_size": world,
           "train_tokens_per_s": round((g["train_tokens"] + g["score_tokens"])
                                       / max(peak["score_s"] + peak["update_s"], 1e-9)),
           "rollout_new_tokens_per_s": round(g["rollout_new_tokens"] / max(peak["rollout_s"], 1e-9))}
    if (step + 1) % cfg.train.log_every == 0:
        log(row)

    # --- eval (held-out, greedy) and checkpoint (both collective: every rank takes part)
    done = step + 1 == max_steps
    if done or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0):
        last_eval = run_eval(step + 1)
    if done or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
        save_checkpoint(run_dir, step + 1, policy, optimizer, scheduler, data_state={"cursor": cursor}, config=cfg,
                        keep_last=cfg.train.keep_last, tokenizer_dir=policy_path, export_dtype=dtype)
    postfix = {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}",
               "kl": f"{row['kl']:.4f}" if "kl" in row and ref is not None else "n/a", "s/step": f"{step_s:.1f}"}
    postfix.update({k.replace("accuracy/", "eval_"): f"{v:.2f}" for k, v in last_eval.items()
                    if k.startswith("accuracy/")})
    pbar.set_postfix(postfix)
pbar.close()
if tracker is not None:
    tracker.close()
print0(f"done: {max_steps} steps; metrics in {metrics_path}; checkpoints in {run_dir / 'checkpoints'}")
shutdown()
