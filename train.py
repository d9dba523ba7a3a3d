"""Memory RL: train a policy to keep a bounded memory while a problem arrives in shards
(DESIGN.md §3; paper §3.2).

    python train.py                              # the built-in synthetic task and policy, CPU
    python train.py --preset=paper-1.5b --data.train_path=train.jsonl --data.eval_path=test.jsonl
    python train.py --train.max_steps=20 --rollout.group_size=4   # any --section.key=value
    python train.py --resume                     # continue train.run_dir from its newest checkpoint
    python train.py --help                       # every config key (memrl/config.py), its value
    torchrun --nproc_per_node 8 train.py --preset=paper-1.5b ...  # FSDP2 on 8 GPUs (README)

One step, each stage a helper defined above the loop (README, "One RL step, file by file"):
rollout (B problems x G trajectories, turn by turn) -> reward (verifier on the final answer) ->
[dynamic sampling] -> advantage (DrGRPO, per trajectory, broadcast to every generated token of every
turn) -> mini-batches (by problem, shuffled) -> [old / reference log-probs: one scoring pass] ->
[rollout correction] -> per mini-batch: loss (dual-clip PPO + KL, one token-mean over its global
tokens, micro-batched) -> AdamW step -> log -> [eval] -> [checkpoint].
Determinism: one seed (train.seed); rollout seeds derive from (seed, step, problem, turn, sample),
the data order from (seed, epoch). On CPU, --resume reproduces an uninterrupted run bit for bit
(fp32, or bf16 compute over fp32 masters: the checkpoint keeps the masters, memrl/checkpoint.py).
Precision: model.dtype is the compute dtype. bfloat16 trains fp32 master weights (FSDP2 mixed
precision, on one process too) and rolls out on a bf16 copy; float32 on one process is plain
PyTorch, no process group.
Several processes (torchrun, memrl/distributed.py): the weights are FSDP2-sharded; every rank rolls
out its own slice of each step's problems (all G samples of a problem on one rank, so group
advantages stay local) with the weights gathered once per step, trains on its slice, and the
token-mean, the gradient norm and every logged number are global (summed / maxed over ranks). Rank 0
alone writes metrics, config and checkpoints.
Bad input: every error the user can fix (config, paths, data, model, checkpoint) is one `error: `
line naming the place (memrl/errors.py; --debug or MEMRL_DEBUG=1 for the traceback). The config, the
paths, the episode files and the run directory are checked before the model loads: a typo costs a
second, not a model load. A run directory is never silently restarted or continued with another
experiment's config (memrl/run_dir.py); a step is never applied with non-finite values
(memrl/step_guard.py).
"""
# ----------------------------------------------------------------------------- config and inputs
import os
import sys

from memrl import run_dir as runs
from memrl.config import (NO_EVAL, RUN_CONFIG_NAME, check_for_training, describe, parse_cli,
                          save_config)
from memrl.episodes import is_raw_documents, load_episodes
from memrl.errors import install_error_handler
from memrl.paths import check_input_paths

argv = install_error_handler(sys.argv[1:])  # known errors -> one line; strips --debug
cfg = parse_cli([a for a in argv if a not in ("-h", "--help")])
if "-h" in argv or "--help" in argv:
    print(__doc__ + "\nConfig (preset " + cfg.preset + ", after overrides):\n" + describe(cfg))
    sys.exit(0)
check_for_training(cfg)  # e.g. an eval set of the same task as the training data
check_input_paths(cfg)  # every path exists; a local path is never taken for a hub id (paths.py)
for data_path in (cfg.data.train_path, cfg.data.eval_path):
    if data_path and data_path != NO_EVAL and not is_raw_documents(data_path):
        load_episodes(data_path)  # the file's structure now; token limits once the tokenizer loads
is_main_process = int(os.environ.get("RANK", "0")) == 0  # rank 0 alone owns the run directory
resume_candidates = runs.plan_start(cfg) if is_main_process else []  # newest first
allowed_changes: list[str] = []  # config changes --resume accepts (run length, cadences, ...)
if resume_candidates:  # only what does not change the experiment may change (memrl/run_dir.py)
    saved, source = runs.saved_config(resume_candidates[0])
    if saved is not None:
        allowed_changes = runs.check_resume_config(saved, cfg, source)
    else:
        print(f"warning: {resume_candidates[0]} has no run_config.json: the config cannot be "
              f"checked against it")

# ----------------------------------------------------------------------------- the heavy imports
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_tools.chunk_docs import chunk_raw_documents
from memrl import synthetic
from memrl.algo import (METRIC_SUMS, PackedBatch, TurnRecord, count_response_tokens,
                        group_advantages, mismatch_metrics, overlong_penalty, pack_turns,
                        policy_loss, response_logprobs, rollout_correction, split_by_problem)
from memrl.atomic import atomic_path
from memrl.checkpoint import load_first_intact, save_checkpoint
from memrl.compile import COMPILE_STATS, compile_blocks
from memrl.distributed import (all_reduce_max, all_reduce_sum, broadcast_object, clip_grad_norm,
                               gathered_for_rollout, init_distributed, is_sharded, max_over_ranks,
                               print0, rollout_view, set_cpu_threads, shard_model, shutdown,
                               sum_over_ranks)
from memrl.episodes import Episode
from memrl.errors import CheckpointError, ConfigError
from memrl.evaluation import eval_episodes, evaluate_policy
from memrl.generate import Generator
from memrl.hf_io import load_model, resolve_checkpoint
from memrl.noise import load_passages, noisy_episodes
from memrl.paths import resolve_policy
from memrl.reward import episode_score
from memrl.rollout import DynamicSampler, RolloutResult, concat, rollout
from memrl.sampling import derive_seed
from memrl.step_guard import StepGuard
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer
from memrl.trackers import make_tracker

SYNTHETIC_TRAIN_SIZE = 2048  # distinct coin-sum training problems; the default run sees hundreds
# per step, token-means
LOSS_METRICS = ("loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl", "entropy")
MISMATCH_KEYS = {name: f"mismatch_sum/{name}" for name in METRIC_SUMS}  # rollout vs trainer sums

# ----------------------------------------------------------------------------- processes, devices
dtype = getattr(torch, cfg.model.dtype)  # the COMPUTE dtype; the masters are fp32 under FSDP
# FSDP2 whenever there are several processes or a low-precision compute dtype: its mixed precision
# keeps fp32 master weights (AdamW at lr 1e-6 would round nearly every bf16 update away) under a
# bf16 compute copy. One bf16 process gets a single-rank process group, so 1 and N GPUs run the same
# code. fp32 on one process: no group, no FSDP.
fsdp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or dtype != torch.float32
dist_info = init_distributed(cfg.train.device, single_rank_group=fsdp)  # torchrun's env
rank, world = dist_info.rank, dist_info.world_size
if cfg.train.batch_size % world:
    raise ConfigError(f"--train.batch_size: {cfg.train.batch_size} is not divisible by the {world} "
                      f"processes: each rank rolls out an equal slice of the step's problems")
per_rank = cfg.train.batch_size // world  # problems this rank rolls out and trains on per step
device = dist_info.device
threads = set_cpu_threads(cfg.train.cpu_threads) if device.type == "cpu" else None  # README: why
run_dir = Path(cfg.train.run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(cfg.train.seed)


def say(msg: str) -> None:
    if dist_info.is_main:
        tqdm.write(msg)


def sync() -> None:
    """Wait for queued GPU work: only where a wall-clock time is taken (the GPU runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one."""
    return bool(all_reduce_max(torch.tensor(int(flag), device=device)).item())


# ----------------------------------------------------------------------------- model, reference
policy_path = resolve_checkpoint(resolve_policy(cfg.model.path))  # "" = assets/synthetic-policy
policy = load_model(policy_path, dtype=torch.float32 if fsdp else dtype, device=device)  # masters
policy.gradient_checkpointing = cfg.model.gradient_checkpointing
policy.attention = cfg.model.attention  # how packed micro-batches attend (memrl/attention.py)
tokenizer = Tokenizer.from_pretrained(policy_path)
ref = None
if cfg.algo.kl_coef > 0:  # the frozen reference: the starting weights unless model.ref_path
    ref_path = resolve_policy(cfg.model.ref_path) if cfg.model.ref_path else policy_path
    ref = load_model(ref_path, dtype=dtype, device=device).eval().requires_grad_(False)
    ref.attention = cfg.model.attention
if fsdp:  # FSDP2 from outside the model: fp32 shards (masters), `dtype` compute, fp32 grad sums
    shard_model(policy, dtype if dtype != torch.float32 else None)
    if ref is not None:
        shard_model(ref, None)  # loaded in the compute dtype, no master (no optimizer, no gradient)
if cfg.model.compile_train:  # fused norms and SwiGLU for scoring and the update (memrl/compile.py)
    for m in (policy, ref):
        if m is not None:
            compile_blocks(m)
t_model_ready = time.time()  # the first step's row reports the time from here (issue 11)
# the policy itself without FSDP; else a hook-free view with persistent compute-dtype weights at
# fixed addresses, refreshed from the masters before each rollout (the generator's CUDA graphs stay
# valid: memrl/distributed.py)
rollout_model = rollout_view(policy)
with gathered_for_rollout(policy, rollout_model) as gen_model:  # the live policy weights
    generator = Generator(gen_model, tokenizer.vocab_size, **cfg.rollout.generator_options())
templates = Templates.from_config(cfg.rollout)
if tokenizer.vocab_size > policy.config.vocab_size:  # an id past the embedding would index out
    raise CheckpointError(f"{policy_path}: the tokenizer has {tokenizer.vocab_size} tokens, the "
                          f"model's embedding only {policy.config.vocab_size} rows: they do not "
                          f"belong together")
print0(f"policy {policy_path} ({policy.num_params() / 1e6:.2f}M params, {cfg.model.dtype} compute, "
       f"{device}{f', FSDP2 over {world} process(es), fp32 masters' if fsdp else ''}"
       f"{f', {threads} CPU thread(s)' if threads else ''}); "
       f"reference: {'yes' if ref is not None else 'none (kl_coef = 0)'}")

# ----------------------------------------------------------------------------- data
if cfg.data.train_path:
    train_set = load_episodes(cfg.data.train_path, max_shards=cfg.data.max_shards,
                              max_shard_tokens=cfg.data.max_shard_tokens,
                              count_tokens=lambda s: len(tokenizer.encode(s)))
else:
    train_set = synthetic.make_episodes(SYNTHETIC_TRAIN_SIZE, "train", seed=synthetic.TRAIN_SEED)
if cfg.data.noise_variant != "sharded":  # paper §3.1 training variants, placed on the fly
    train_set = noisy_episodes(train_set, load_passages(cfg.data.noise_path),
                               cfg.data.noise_variant, seed=cfg.train.seed)
eval_set = [] if cfg.data.eval_path == NO_EVAL else eval_episodes(
    cfg, tokenizer, chunk_documents=chunk_raw_documents)  # a raw LongBench file: chunked here
eval_name = cfg.data.eval_path or f"{synthetic.SOURCE}/eval"
steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
print0(f"data: {len(train_set)} training problems, {len(eval_set)} held-out; {max_steps} steps of "
       f"{cfg.train.batch_size} problems x {cfg.rollout.group_size} samples, condition "
       f"{cfg.rollout.condition}{f' ({per_rank} problems per rank)' if world > 1 else ''}")


def next_problems(cursor: int, n: int) -> tuple[list[Episode], int]:
    """n problems from position `cursor` of the endless stream (shuffled per epoch); new cursor."""
    def epoch_order(epoch: int) -> list[int]:
        order = list(range(len(train_set)))
        if cfg.data.shuffle:
            random.Random(derive_seed(cfg.train.seed, "data-order", epoch)).shuffle(order)
        return order

    out = []
    for c in range(cursor, cursor + n):
        out.append(train_set[epoch_order(c // len(train_set))[c % len(train_set)]])
    return out, cursor + n


# ----------------------------------------------------------------------------- optimizer, resume
optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                              eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay)
warmup = cfg.optim.warmup_steps  # linear warmup to lr, then constant (paper A.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
start_step, cursor = 0, 0
# rank 0 reads the checkpoint (the other nodes need no shared filesystem), the state arrives by
# broadcast; the newest checkpoint that reads back intact wins, each corrupt one is reported and
# skipped (memrl/checkpoint.py)
resume_candidates = broadcast_object(resume_candidates)
metrics_path = run_dir / runs.METRICS_FILE
if resume_candidates:
    resume_from, state = load_first_intact(resume_candidates, policy, optimizer, scheduler,
                                           report=say)
    if resume_from != resume_candidates[0] and state.get("config") is not None:  # a fallback's
        allowed_changes = runs.check_resume_config(state["config"], cfg,
                                                   resume_from / RUN_CONFIG_NAME)
    start_step, cursor = state["step"], state["data"]["cursor"]
    print0(f"resumed from {resume_from} at step {start_step}"
           + "".join(f"\n  changed: {c}" for c in allowed_changes))
    if dist_info.is_main and runs.keep_metrics_up_to(metrics_path, start_step):  # its history
        print0(f"{metrics_path}: dropped a torn last line (the previous run was killed while "
               f"writing it)")
elif cfg.train.resume:
    print0(f"--resume: {run_dir} holds no run yet: starting at step 0")
if dist_info.is_main:  # written once the checks passed: a refused command leaves the directory be
    save_config(cfg, run_dir / RUN_CONFIG_NAME)
guard = StepGuard(policy, optimizer, cfg.optim, cfg.train.max_skipped_steps)  # step_guard.py
tracker = make_tracker(cfg.train.tracker, run_dir, cfg.to_dict(), cfg.train.tracker_project,
                       resume=start_step > 0) if dist_info.is_main else None


# ----------------------------------------------------------------------------- log and eval
def log(row: dict) -> None:
    if dist_info.is_main:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if tracker is not None:  # the same row, after metrics.jsonl has it (memrl/trackers.py)
            tracker.log(row)


def run_eval(step: int) -> dict:
    """Held-out accuracy of the trained condition: greedy, and sampled as training samples
    (rollout.eval_samples per problem, seeded) when asked; on the synthetic task also the share of
    asked facts the final memories keep. Every rank evaluates its slice (eval_set[rank::world])
    with gathered weights; generation is no collective, so slices may differ in size; every rate
    is summed over ranks as (numerator, denominator)."""
    if not eval_set:  # data.eval_path=none
        return {}
    t0 = time.time()
    mine, c, k = eval_set[rank::world], cfg.rollout.condition, cfg.rollout.eval_samples
    policy.eval()
    with gathered_for_rollout(policy, rollout_model):
        res = evaluate_policy(generator, tokenizer, mine, cfg, conditions=(c,), samples=k,
                              desc=f"eval @ step {step}: {eval_name}",
                              progress=dist_info.is_main)[c] if mine else {}
    policy.train()
    counts = {"n": res.get("n", 0), "asked": res.get("facts_asked", 0)}
    over = {"accuracy": "n", "sampled_accuracy": "n", "facts_kept": "asked",
            "sampled_facts_kept": "asked"}
    total = sum_over_ranks({**{name: res.get(name, 0.0) * counts[d] for name, d in over.items()},
                            **counts}, device)
    rates = {name: total[name] / total[d] for name, d in over.items()
             if total[d] and (k or not name.startswith("sampled"))}
    eval_s = max_over_ranks({"eval_s": time.time() - t0}, device)["eval_s"]
    row = {"step": step, "kind": "eval", **{f"{name}/{c}": v for name, v in rates.items()},
           "eval_s": round(eval_s, 3)}
    log(row)
    say(f"eval @ step {step} ({c}, n={int(total['n'])}): "
        + ", ".join(f"{name} {v:.3f}" for name, v in rates.items()))
    return row


# ----------------------------------------------------------------------------- the step's stages
def rollout_and_reward(step: int, cursor: int):
    """rollout: this rank's slice of the step's B problems x G trajectories, every turn of every
    live trajectory in one generate() call, the weights gathered once. reward: the verifier on each
    final answer (memrl/reward.py). Dynamic sampling (optional): keep only groups with mixed
    rewards and refill from more problems; each rank fills its own slice, rounds go on while any
    rank needs more (all draw the same problems, so the data cursor stays one number), and a rank
    already full skips its share of a round. -> (batch, kept rewards, every round's rewards, cursor)
    """
    sampler = (DynamicSampler(per_rank, cfg.algo.max_sampling_rounds)
               if cfg.algo.dynamic_sampling else None)
    parts, keeps, sampled = [], [], []
    with gathered_for_rollout(policy, rollout_model):
        while True:
            problems, cursor = next_problems(cursor, cfg.train.batch_size)
            if sampler is None or sampler.need_more():
                mine = problems[rank * per_rank: (rank + 1) * per_rank]
                # seeds from global episode ids: the same samples however the ranks slice
                result = rollout(generator, tokenizer, mine, cfg.rollout.condition,
                                 cfg.rollout.group_size, templates, cfg.rollout,
                                 seed=cfg.train.seed, step=step)
                rewards = torch.tensor([episode_score(t.final_text, t.episode, cfg.data.reward_kind)
                                        for t in result.trajectories])
                sampled.append(rewards)
                parts.append(result)
                if sampler is None:
                    keeps.append([True] * len(rewards))
                    break
                group_ids = torch.tensor([t.group_id for t in result.trajectories])
                keeps.append(sampler.add(rewards, group_ids).tolist())
            if not any_rank(sampler.need_more()):
                break
    if sampler is not None and sampler.exhausted():
        tqdm.write(f"step {step + 1}{f' (rank {rank})' if world > 1 else ''}: {sampler.message()}")
    rewards = torch.cat([r[torch.tensor(k, dtype=torch.bool)] for r, k in zip(sampled, keeps)])
    return concat(parts, keeps), rewards, sampled, cursor


def advantages_of(batch: RolloutResult, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = r_i - mean of its group (DrGRPO), per trajectory; pack_turns broadcasts it to every
    token. -> (advantages, the rewards after the optional DAPO overlong shaping)"""
    shaped = rewards.clone()
    if cfg.algo.overlong_shaping:  # DAPO soft overlong penalty on the final answer's length
        final_len = torch.zeros(len(batch.trajectories))
        for rec in batch.records:
            if rec.kind == "final":
                final_len[rec.trajectory_id] = len(rec.response_ids)
        shaped += overlong_penalty(final_len, cfg.rollout.response_max_tokens,
                                   cfg.algo.overlong_cache_tokens)
    group_ids = torch.tensor([t.group_id for t in batch.trajectories], dtype=torch.long)
    return group_advantages(shaped, group_ids, std_normalize=cfg.algo.advantage == "grpo"), shaped


# FSDP forward/backward passes are collectives: a rank with fewer micro-batches than another runs
# this one-token record with zero weight instead, so every rank makes the same number of passes
DUMMY = pack_turns([TurnRecord([0], [0], [0.0], trajectory_id=0, group_id=0, turn_index=0,
                               kind="final")], torch.zeros(1), 1)[0].to(device)


def mini_batches(rows: list[TurnRecord], advantages: torch.Tensor, step: int):
    """The batch split by problem (all G samples and all turns of a problem together) in an order
    shuffled by (seed, step), one optimizer step each; each packed into micro-batches (a
    conversation is one row, its loss on every assistant reply: memrl/conversation.py).
    -> (micro-batches per mini-batch, padded with DUMMY to the most of any rank; the real ones)"""
    split = split_by_problem(rows, [rank * per_rank + r.group_id for r in rows],
                             cfg.train.batch_size, cfg.algo.mini_batches, cfg.train.seed, step)
    mini = [[mb.to(device) for mb in pack_turns(part, advantages, cfg.train.micro_batch_tokens,
                                                by_length=cfg.train.pack_by_length)]
            for part in split]
    n_real = [len(m) for m in mini]  # this rank's
    n_pass = [int(n) for n in all_reduce_max(torch.tensor(n_real, device=device)).tolist()]
    return [m + [DUMMY] * (n - len(m)) for m, n in zip(mini, n_pass)], n_real


@torch.no_grad()
def score(mini: list[list[PackedBatch]], n_real: list[int]) -> dict:
    """Old and reference log-probs in ONE scoring pass before the first update, over the very
    micro-batches the updates train on (same packing, same kernels: bitwise equal to the training
    pass's log-probs at equal weights). One mini-batch without rollout correction is on-policy:
    old = None, ratio == 1 exactly. Rollout correction (off by default): truncated IS weights and
    the sequence mask, from old vs the sampler's log-probs (memrl/algo.py)."""
    score_old = len(mini) > 1 or cfg.algo.rollout_correction

    def logps(model):
        return [[response_logprobs(model, mb, cfg.rollout.temperature, tokenizer.vocab_size)[0]
                 for mb in m] for m in mini]

    ref_logps = logps(ref) if ref is not None else None
    old_logps = logps(policy) if score_old else None
    for model in (policy, ref):  # FSDP: the root stays gathered after a forward; free it
        if model is not None and is_sharded(model):
            model.reshard()
    corrections = None if old_logps is None else [
        [correct(old, mb) for old, mb in zip(o[:n], m)] for o, m, n in zip(old_logps, mini, n_real)]
    # the token-mean's denominator, per mini-batch: its response tokens over ranks (masked out)
    counts = [sum(c.num_tokens for c in corrections[k]) if corrections is not None
              else sum(mb.num_response_tokens for mb in mini[k][:n_real[k]])
              for k in range(len(mini))]
    return {"old": old_logps, "ref": ref_logps, "corrections": corrections,
            "num_tokens": all_reduce_sum(torch.tensor(counts, dtype=torch.float32, device=device)),
            "models": (ref is not None) + score_old}


def correct(train_logp: torch.Tensor, mb: PackedBatch):
    return rollout_correction(train_logp, mb.rollout_logprobs, mb.response_record,
                              len(mb.record_indices), tis_cap=cfg.algo.tis_cap,
                              seq_mask=cfg.algo.seq_mask, seq_low=cfg.algo.seq_mask_low,
                              seq_high=cfg.algo.seq_mask_high)


def train_on(mini: list[list[PackedBatch]], n_real: list[int], scores: dict, step: int) -> dict:
    """loss: dual-clip PPO + beta * KL, summed over a mini-batch's micro-batches = one token-mean
    over its tokens. step: AdamW after global grad-norm clipping, once per mini-batch; a non-finite
    loss or gradient skips the update (on all ranks: the loss sum is all-reduced and the norm is
    global, so every rank decides the same). -> the step's loss metrics, grad norms, skips."""
    num_tokens, old_logps, ref_logps = scores["num_tokens"], scores["old"], scores["ref"]
    corrections = scores["corrections"]
    skipped, grad_norms, dumped = 0, [], []
    names = LOSS_METRICS + tuple(MISMATCH_KEYS.values())  # same names, same order on every rank
    sums = dict.fromkeys(names, 0.0)  # token sums over the step (metric x N_k)
    for k, micro in enumerate(mini):
        if not micro:  # no rank holds a problem of this mini-batch (dynamic sampling kept too few)
            continue
        optimizer.zero_grad(set_to_none=True)
        local = dict.fromkeys(names, 0.0)
        for i, mb in enumerate(micro):
            real = i < n_real[k]  # a dummy pass: same collectives, zero gradient, in no metric
            corr = corrections[k][i] if corrections is not None and real else None
            old = old_logps[k][i] if old_logps is not None else None
            ref_logp = ref_logps[k][i] if ref_logps is not None else None
            logp, entropy = response_logprobs(policy, mb, cfg.rollout.temperature,
                                              tokenizer.vocab_size, with_entropy=True)  # (N,) fp32
            mask = corr.keep if corr is not None and cfg.algo.seq_mask else None
            loss, m = policy_loss(logp, mb.advantages, num_tokens[k], cfg.algo, old_logp=old,
                                  ref_logp=ref_logp, entropy=entropy, mask=mask,
                                  pg_weight=corr.pg_weight if corr is not None else None)
            (loss if real else loss * 0.0).backward()
            if not real:
                continue
            local["loss"] += loss.item()
            for name, v in m.items():
                local[name] += v.item()
            if corr is None:  # on-policy: this pass's log-probs are the trainer's, rollout weights
                corr = correct(logp.detach(), mb)
            for name, v in corr.sums.items():
                local[MISMATCH_KEYS[name]] += v.item()
            if cfg.train.dump_loss_inputs:  # tests and debugging: the loss's inputs and outputs
                tensors = (("logp", logp), ("advantages", mb.advantages),
                           ("rollout_logp", mb.rollout_logprobs), ("record", mb.response_record),
                           ("old_logp", old), ("ref_logp", ref_logp), ("keep", corr.keep),
                           ("pg_weight", corr.pg_weight))
                dumped.append({"mini_batch": k, "num_tokens": float(num_tokens[k]),
                               "loss": loss.item(), "kinds": list(mb.turn_kinds),
                               **{name: v.item() for name, v in m.items()},
                               **{name: t.detach().cpu() for name, t in tensors if t is not None}})
        local = sum_over_ranks(local, device)  # this rank's (token sum / N_k) -> the token-means
        grad_norm = clip_grad_norm(policy, cfg.optim.grad_clip)  # global: the same on every rank
        finite = math.isfinite(local["loss"]) and math.isfinite(grad_norm)
        if num_tokens[k] > 0 or not finite:  # else all masked: nothing to learn, no decay either
            problem = guard.step(local["loss"], grad_norm)  # AdamW, unless non-finite (no change)
            if problem is None:
                grad_norms.append(grad_norm)
            else:
                skipped += 1
                say(f"step {step + 1}, mini-batch {k}: {problem}: update skipped")
        for name in LOSS_METRICS:
            sums[name] += local[name] * float(num_tokens[k])
        for name in MISMATCH_KEYS.values():
            sums[name] += local[name]
    if not any(mini):
        say(f"step {step + 1}: no trajectory left after dynamic sampling: update skipped")
    else:
        guard.end_of_step(step + 1)  # TrainingError after train.max_skipped_steps in a row
    if dumped:
        name = f"step_{step + 1:08d}_rank{rank}.pt"
        with atomic_path(Path(cfg.train.dump_loss_inputs) / name) as tmp:
            torch.save(dumped, tmp)
    trained = float(num_tokens.sum())
    metrics = {name: sums[name] / max(trained, 1.0) for name in LOSS_METRICS}  # step token-means
    metrics |= mismatch_metrics({name: sums[key] for name, key in MISMATCH_KEYS.items()},
                                cfg.algo.tis_cap > 0)
    return {"metrics": metrics, "grad_norms": grad_norms, "skipped": skipped,
            "trained_tokens": trained}


def train_row(step: int, batch: RolloutResult, shaped: torch.Tensor, sampled: list[torch.Tensor],
              rows: list[TurnRecord], mini: list[list[PackedBatch]], n_real: list[int],
              scores: dict, update: dict, seconds: dict, t_step: float, cursor: int) -> dict:
    """The step's metrics.jsonl row: sums and counts over ranks, times and memory as the max over
    ranks (the step benchmark parses these names). seconds: the stages' times; t_step: when the
    step began; cursor: the data position after it."""
    memory_recs = [r for r in batch.records if r.kind == "memory"]
    final_recs = [r for r in batch.records if r.kind == "final"]
    real_tokens = sum(mb.num_tokens for m, n in zip(mini, n_real) for mb in m[:n])  # real passes
    stats = batch.generate_stats
    g = sum_over_ranks({
        "reward": shaped.double().sum().item(), "kept": len(shaped),
        "accuracy": sum(r.sum().item() for r in sampled), "sampled": sum(len(r) for r in sampled),
        "memory_tokens": sum(len(r.response_ids) for r in memory_recs),
        "memory_turns": len(memory_recs),
        "memory_cut": sum(r.finish_reason == "length" for r in memory_recs),
        "memory_full": sum(len(r.response_ids) >= cfg.rollout.memory_cap_tokens
                           for r in memory_recs),
        "answer_tokens": sum(len(r.response_ids) for r in final_recs),
        "answer_turns": len(final_recs),
        "train_tokens": real_tokens, "score_tokens": real_tokens * scores["models"],
        "rollout_new_tokens": sum(s.get("new_tokens", 0) for s in stats),
        "micro_batches": sum(n_real), "response_tokens": count_response_tokens(rows),
        "attn_len_sq": sum((len(r.prompt_ids) + len(r.response_ids) - 1) ** 2 for r in rows),
    }, device)
    peak = max_over_ranks({
        **seconds, "step_s": time.time() - t_step,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else 0.0,
        "rollout_rounds": len(sampled),
        **{f"gen_{k}": sum(s.get(k, 0) for s in stats)
           for k in ("compile_s", "capture_s", "compiles", "captures")},
        "train_compile_s": COMPILE_STATS["compile_s"],
        "since_model_ready_s": time.time() - t_model_ready,
    }, device)
    grad_norms, turns = update["grad_norms"], max(g["memory_turns"], 1)
    row = {"step": step + 1, "kind": "train", "reward": g["reward"] / max(g["kept"], 1),
           "accuracy": g["accuracy"] / max(g["sampled"], 1),  # every sampled trajectory
           **update["metrics"], "lr": scheduler.get_last_lr()[0],
           # optimizer steps taken (one per mini-batch unless skipped), grad norms before clipping
           "optimizer_steps": len(grad_norms),
           "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
           "grad_norm_max": max(grad_norms, default=0.0),
           "memory_tokens": g["memory_tokens"] / turns, "memory_cut": g["memory_cut"] / turns,
           "memory_full": g["memory_full"] / turns,  # used the whole cap (cut, or stopped there)
           "answer_tokens": g["answer_tokens"] / max(g["answer_turns"], 1),
           "response_tokens": int(g["response_tokens"]),
           "trained_tokens": int(update["trained_tokens"]), "trajectories": int(g["kept"]),
           "rollout_rounds": int(peak["rollout_rounds"]), "skipped": update["skipped"],
           "cursor": cursor,
           # timings (max over ranks) and global token counts
           **{k: round(peak[k], 3) for k in ("rollout_s", "score_s", "update_s", "step_s",
                                              "peak_mem_gib")},
           "train_s": round(peak["score_s"] + peak["update_s"], 3),
           **{k: int(g[k]) for k in ("train_tokens", "score_tokens", "rollout_new_tokens",
                                     "micro_batches")},
           "dummy_micro_batches": world * sum(len(m) for m in mini) - int(g["micro_batches"]),
           "world_size": world,
           "train_tokens_per_s": round((g["train_tokens"] + g["score_tokens"])
                                       / max(peak["score_s"] + peak["update_s"], 1e-9)),
           "rollout_new_tokens_per_s": round(g["rollout_new_tokens"]
                                             / max(peak["rollout_s"], 1e-9)),
           "attn_len_sq": int(g["attn_len_sq"]), "gen_compile_s": round(peak["gen_compile_s"], 3),
           "gen_capture_s": round(peak["gen_capture_s"], 3)}
    if step == start_step:  # where the first step's time goes: compilation and capture are one-off
        row["first_step_s"] = {k: round(peak[k], 3) for k in (
            "since_model_ready_s", "step_s", "rollout_s", "gen_compile_s", "gen_capture_s",
            "gen_compiles", "gen_captures", "score_s", "update_s", "train_compile_s")}
    return row


# ----------------------------------------------------------------------------- training loop
last_eval = run_eval(0) if start_step == 0 and cfg.train.eval_at_start else {}
pbar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="train",
            disable=not dist_info.is_main, dynamic_ncols=True)
for step in pbar:
    t_step = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gib is this step's peak

    # --- rollout -> reward (-> dynamic sampling): this rank's slice of B problems x G trajectories
    batch, rewards, sampled, cursor = rollout_and_reward(step, cursor)
    t_rollout = time.time() - t_step

    # --- advantage: DrGRPO per trajectory, broadcast to every response token when packed
    advantages, shaped = advantages_of(batch, rewards)

    # --- mini-batches by problem; old / reference log-probs in one scoring pass
    rows = batch.training_records()
    mini, n_real = mini_batches(rows, advantages, step)
    t_score = time.time()
    scores = score(mini, n_real)
    sync()
    t_score = time.time() - t_score

    # --- loss -> step, per mini-batch (a non-finite one is skipped); then the lr schedule
    t_update = time.time()
    update = train_on(mini, n_real, scores, step)
    scheduler.step()
    sync()
    t_update = time.time() - t_update

    # --- log
    seconds = {"rollout_s": t_rollout, "score_s": t_score, "update_s": t_update}
    row = train_row(step, batch, shaped, sampled, rows, mini, n_real, scores, update, seconds,
                    t_step, cursor)
    if (step + 1) % cfg.train.log_every == 0:
        log(row)

    # --- eval (held-out, greedy) and checkpoint: both collective, every rank takes part
    done = step + 1 == max_steps
    if done or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0):
        last_eval = run_eval(step + 1)
    if done or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
        save_checkpoint(run_dir, step + 1, policy, optimizer, scheduler,
                        data_state={"cursor": cursor}, config=cfg, keep_last=cfg.train.keep_last,
                        tokenizer_dir=policy_path, export_dtype=dtype)
    postfix = {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}",
               "kl": f"{row['kl']:.4f}" if "kl" in row and ref is not None else "n/a",
               "s/step": f"{row['step_s']:.1f}"}
    postfix |= {k.replace("accuracy/", "eval_"): f"{v:.2f}" for k, v in last_eval.items()
                if k.startswith("accuracy/")}
    pbar.set_postfix(postfix)
pbar.close()
if tracker is not None:
    tracker.close()
print0(f"done: {max_steps} steps; metrics in {metrics_path}; checkpoints in "
       f"{run_dir / 'checkpoints'}")
shutdown()
