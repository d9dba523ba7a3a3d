"""The RL algorithm between the rewards and the optimizer step (DESIGN.md §3 steps 4-8, §5, §3.6).

    rewards [n_traj] --group_advantages--> A [n_traj]
    records --split_by_problem--> mini-batches --pack_turns (A broadcast)--> PackedBatch micro-batches
    PackedBatch --response_logprobs(model)--> logp [N] --(rollout_correction)--> --policy_loss--> loss, metrics

Invariants:
- The advantage of trajectory i is computed once per trajectory, then put on every response token of every turn of
  i (memory turns and the final turn alike); prompt tokens carry nothing (they are not even scored).
- A record is one training sequence. Memory / single-turn records hold one reply (response_ids). A conversation row
  (memrl.conversation) holds a whole chat in one sequence: its response_spans mark every assistant reply inside
  response_ids, and only those tokens are scored and trained (the user messages between them are masked).
- Mini-batches (algo.mini_batches optimizer steps per RL step; MemAgent: 16) are split by problem: all G samples and
  all turns of a problem together, so a group's advantages are trained together; problems are permuted by a seed
  derived from (seed, step), and a problem's mini-batch depends only on its GLOBAL index in the step's batch, so N
  ranks split as one process would and a resumed run as the original. Old log-probs come from one no-grad scoring
  pass before the first update: the first mini-batch trains at ratio 1, later ones see the policy move.
- The loss is Σ m·(pg + β·kl) / N, N the mini-batch's global response-token count, so summing policy_loss over
  micro-batches (and ranks) gives exactly one token-mean per optimizer step, whatever the packing.
- pack_turns is deterministic: the same records and budget give the same micro-batches, so a scoring pass and a
  training pass see identical shapes (and, with deterministic kernels, bitwise equal log-probs).
- Rollout correction (off by default; its mismatch metrics are logged either way): the sampler's and the trainer's
  log-probs of the same tokens differ (bf16 generator kernels vs the training forward: mean |Δ| 0.013 per token on a
  real 0.5B model, H200), so samples are slightly off-policy. With d_t = log π_train(y_t) − log π_rollout(y_t):
      token-level truncated IS   w_t = min(exp(d_t), C), on the policy-gradient term only (kernels/ppo_loss.py)
      geometric sequence mask    ρ_geo = exp(mean_t d_t); a sequence outside [lo, hi] leaves the loss AND its count
  TIS: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (C = 2 there). The
  mask: the "geometric" rejection sampling of Liu, Li et al. 2025, "When Speed Kills Stability" (verl
  docs/algo/rollout_corr_math.md §3.3.3, §3.4: bounds 1 ± 1e-3); masked tokens leave the token-mean's denominator,
  as verl does since 10/2025. A "sequence" is one training record.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memrl.config import AlgoCfg
from memrl.sampling import derive_seed

TURN_KINDS = ("memory", "final", "conversation")  # conversation: a whole chat as one training row


@dataclass
class TurnRecord:
    """One training sequence: a generated turn of one trajectory as the rollout produces it, or (response_spans set)
    a whole conversation merged into one row by memrl.conversation.conversation_row."""

    prompt_ids: list[int]  # the full prompt of this turn (template + question + memory/shard), never trained on
    response_ids: list[int]  # generated tokens, the stop token included (training sees the end of turn)
    logprobs: list[float]  # the sampler's fp32 log-prob of each reply token (len == num_response_tokens)
    trajectory_id: int  # dense index 0..n_traj-1 of the trajectory within the batch: indexes the advantages
    group_id: int  # the problem: the G trajectories of one problem share it
    turn_index: int  # 0..T-1 memory turns, then the final turn
    kind: str  # "memory" | "final" | "conversation"
    finish_reason: str = "stop"  # "length" when the generation hit its token limit (a cut memory / answer)
    # None: all of response_ids is one reply. A conversation row: response_ids is everything after the first prompt
    # (reply 0, user message 1, reply 1, ..., the last reply) and these [start, end) offsets into it mark the
    # replies, in order; logprobs follow the replies' tokens in that order
    response_spans: list[tuple[int, int]] | None = None

    def __post_init__(self):
        assert self.kind in TURN_KINDS, f"kind must be one of {TURN_KINDS}, got {self.kind!r}"
        assert len(self.prompt_ids) >= 1, "a turn needs a prompt (its last token predicts the first response token)"
        if self.response_spans is not None:
            self.response_spans = [(int(a), int(b)) for a, b in self.response_spans]
            ends = [0] + [x for span in self.response_spans for x in span]
            assert self.response_spans and all(a <= b for a, b in zip(ends, ends[1:])) and all(
                a < b for a, b in self.response_spans) and ends[-1] <= len(self.response_ids), (
                f"response_spans must be non-empty, ordered, disjoint spans inside the {len(self.response_ids)} "
                f"completion tokens: {self.response_spans}")
        assert len(self.logprobs) == self.num_response_tokens, (
            f"{len(self.logprobs)} logprobs for {self.num_response_tokens} response tokens")
        assert self.trajectory_id >= 0, self.trajectory_id

    @property
    def num_response_tokens(self) -> int:
        """Tokens the model generated in this sequence: the ones scored, trained and counted in N_tokens."""
        if self.response_spans is None:
            return len(self.response_ids)
        return sum(b - a for a, b in self.response_spans)

    def reply_mask(self) -> list[bool]:
        """Over response_ids: True on the model's own tokens (every one, unless response_spans says otherwise)."""
        if self.response_spans is None:
            return [True] * len(self.response_ids)
        mask = [False] * len(self.response_ids)
        for a, b in self.response_spans:
            mask[a:b] = [True] * (b - a)
        return mask


# ----------------------------------------------------------------------------- advantages

def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = r_i − mean_{j in group(i)} r_j  (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-like
    training", §3.2: no division by the group std, whose 1/std up-weights too-easy and too-hard questions).
    std_normalize=True gives GRPO's (r_i − mean) / (std + eps) (Shao et al. 2024, DeepSeekMath §4.1.2; unbiased std
    as in verl's compute_grpo_outcome_advantage). A group of one trajectory gets advantage 0 (r − mean = 0; verl
    instead gives it A = r, which is no group-relative baseline at all).

    rewards [n] float, group_ids [n] int (any values) -> advantages [n] fp32.
    """
    assert rewards.ndim == 1 and rewards.shape == group_ids.shape, (rewards.shape, group_ids.shape)
    r = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r)
    mean = (sums / counts)[inverse]
    adv = r - mean
    if std_normalize:
        sq = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, adv * adv)
        std = torch.sqrt(sq / (counts - 1).clamp(min=1))[inverse]  # unbiased (n − 1), like torch.std
        adv = adv / (std + eps)
    return adv.float()


def broadcast_advantages(
    traj_advantages: torch.Tensor, trajectory_ids: Sequence[int], response_lengths: Sequence[int]
) -> torch.Tensor:
    """Per-token advantages of packed response tokens: turn k contributes response_lengths[k] copies of
    traj_advantages[trajectory_ids[k]] (the paper §3.2: the advantage is propagated uniformly to all turns).

    -> [sum(response_lengths)] fp32, in turn order.
    """
    assert len(trajectory_ids) == len(response_lengths)
    idx = torch.as_tensor(list(trajectory_ids), dtype=torch.long)
    lengths = torch.as_tensor(list(response_lengths), dtype=torch.long)
    return traj_advantages.float()[idx].repeat_interleave(lengths)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, cache_tokens: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, §3.4 "Overlong Reward Shaping"), added to the reward:
    0 for |y| ≤ L_max − L_cache, ((L_max − L_cache) − |y|) / L_cache in the last L_cache tokens, −1 from L_max on.
    lengths [n] -> penalty [n] fp32 (≤ 0). The trainer applies it to the final answer turn's length."""
    assert 0 < cache_tokens <= max_tokens, (cache_tokens, max_tokens)
    free = max_tokens - cache_tokens
    pen = (free - lengths.float()) / cache_tokens
    return pen.clamp(min=-1.0, max=0.0)


# ----------------------------------------------------------------------------- mini-batches (DESIGN §3.6)

def problem_positions(batch_size: int, seed: int, step: int) -> list[int]:
    """position[p]: where global problem p of this step sits in the step's shuffled order."""
    order = list(range(batch_size))
    random.Random(derive_seed(seed, "mini-batches", step)).shuffle(order)
    position = [0] * batch_size
    for pos, p in enumerate(order):
        position[p] = pos
    return position


def split_by_problem(records: Sequence[TurnRecord], global_problem: Sequence[int], batch_size: int,
                     mini_batches: int, seed: int, step: int) -> list[list[TurnRecord]]:
    """records (this rank's) -> `mini_batches` lists; global_problem[i] in [0, batch_size) is record i's problem.
    Mini-batch k holds the problems at shuffled positions [k·B/M, (k+1)·B/M): B/M problems each over all ranks."""
    assert 1 <= mini_batches <= batch_size, (mini_batches, batch_size)
    assert len(records) == len(global_problem)
    position = problem_positions(batch_size, seed, step)
    out: list[list[TurnRecord]] = [[] for _ in range(mini_batches)]
    order = sorted(range(len(records)), key=lambda i: (position[global_problem[i]], records[i].trajectory_id,
                                                       records[i].turn_index))
    for i in order:
        out[position[global_problem[i]] * mini_batches // batch_size].append(records[i])
    return out


# ----------------------------------------------------------------------------- packing

@dataclass
class PackedBatch:
    """Several turn records packed into one row, for Transformer.forward(input_ids, positions, seq_ids).

    Each record contributes prompt + response minus its last token (T_k = P + R − 1 rows): row t predicts token t+1,
    so the R response tokens are the targets of the record's last R rows and every row has a valid target.
    Vectors of length N (= number of response tokens) are aligned with `response_rows`.
    """

    input_ids: torch.Tensor  # [1, T] long
    positions: torch.Tensor  # [1, T] long, restarting at 0 for each record
    seq_ids: torch.Tensor  # [1, T] long, 0..k-1: tokens attend only within their record (causal)
    seq_lengths: list[int]  # [k] rows of each record, on the host: the attention layout without a device sync
    targets: torch.Tensor  # [T] long: the next token of every row
    response_mask: torch.Tensor  # [T] bool: True on rows whose target is a response token
    response_rows: torch.Tensor  # [N] long: nonzero(response_mask), the rows that enter the lm_head
    advantages: torch.Tensor  # [N] fp32: A of the record's trajectory on each of its response tokens
    rollout_logprobs: torch.Tensor  # [N] fp32: the sampler's log-probs (DESIGN §3.6: on-policy π_old = logp.detach())
    record_indices: list[int]  # which records, in packing order
    turn_kinds: list[str]  # kind of each packed record

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def response_record(self) -> torch.Tensor:
        """[N] long: the position (in record_indices) of the record each response token belongs to."""
        return self.seq_ids[0].index_select(0, self.response_rows)

    @property
    def num_response_tokens(self) -> int:
        return self.response_rows.shape[0]

    def to(self, device) -> "PackedBatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def pack_turns(records: Sequence[TurnRecord], traj_advantages: torch.Tensor, max_tokens: int,
               by_length: bool = False) -> list[PackedBatch]:
    """Greedy packing into micro-batches of at most max_tokens rows. A record longer than the budget gets a
    micro-batch of its own (never split: attention needs the whole sequence).

    Order: record order by default. by_length=True first sorts the records by length, longest first (ties by
    index: deterministic), so each micro-batch holds a run of similar lengths: near-uniform, what right-padded
    attention wants (memrl/attention.py "padded": one call when S * L <= 2T). Not first-fit decreasing, which fills
    the gaps left by long records with the shortest ones: fewer micro-batches, but mixed lengths again. The loss
    stays the same token-mean (each term is divided by the global count, whatever the grouping)."""
    assert max_tokens > 0
    order = range(len(records))
    if by_length:
        order = sorted(order, key=lambda k: (-(len(records[k].prompt_ids) + len(records[k].response_ids)), k))
    groups: list[list[int]] = []
    used = max_tokens + 1  # forces a new micro-batch for the first record
    for k in order:
        rec = records[k]
        n = len(rec.prompt_ids) + len(rec.response_ids) - 1
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += n
    return [_pack([records[k] for k in idx], idx, traj_advantages) for idx in groups]


def _pack(recs: list[TurnRecord], idx: list[int], traj_advantages: torch.Tensor) -> PackedBatch:
    ids, pos, seq, tgt, mask = [], [], [], [], []
    for s, rec in enumerate(recs):
        full = rec.prompt_ids + rec.response_ids
        n_in = len(full) - 1
        ids += full[:-1]
        tgt += full[1:]
        pos += range(n_in)
        seq += [s] * n_in
        # rows P-1 .. P+R-2 predict the R completion tokens; of those, the replies' tokens are trained
        mask += [False] * (len(rec.prompt_ids) - 1) + rec.reply_mask()
    response_mask = torch.tensor(mask, dtype=torch.bool)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long)[None],
        positions=torch.tensor(pos, dtype=torch.long)[None],
        seq_ids=torch.tensor(seq, dtype=torch.long)[None],
        seq_lengths=[len(r.prompt_ids) + len(r.response_ids) - 1 for r in recs],
        targets=torch.tensor(tgt, dtype=torch.long),
        response_mask=response_mask,
        response_rows=response_mask.nonzero().squeeze(1),
        advantages=broadcast_advantages(traj_advantages, [r.trajectory_id for r in recs],
                                        [r.num_response_tokens for r in recs]),
        rollout_logprobs=torch.tensor([lp for r in recs for lp in r.logprobs], dtype=torch.float32),
        record_indices=list(idx),
        turn_kinds=[r.kind for r in recs],
    )


def count_response_tokens(records: Sequence[TurnRecord]) -> int:
    """This rank's share of N_tokens; all-reduce (sum) it over ranks before the loss."""
    return sum(r.num_response_tokens for r in records)


# ----------------------------------------------------------------------------- log-probs and loss

def response_logprobs(model, batch: PackedBatch, temperature: float = 1.0, valid_vocab: int | None = None,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(response token) [N] fp32 (+ entropy [N]) for one packed micro-batch. The lm_head runs on response rows
    only, fused with the log-softmax (kernels A'): prompt rows never produce logits."""
    from kernels import linear_token_logprobs

    hidden = model(batch.input_ids, positions=batch.positions, seq_ids=batch.seq_ids, seq_lengths=batch.seq_lengths,
                   return_hidden=True)  # [1, T, H]
    h = hidden[0].index_select(0, batch.response_rows)  # [N, H]
    targets = batch.targets.index_select(0, batch.response_rows)  # [N]
    return linear_token_logprobs(h, model.output_weight(), targets, temperature=temperature,
                                 with_entropy=with_entropy, valid_vocab=valid_vocab)


# ----------------------------------------------------------------------------- rollout correction

# per-record sums, aggregated over micro-batches and ranks, then divided by their counts (mismatch_metrics)
METRIC_SUMS = ("abs_diff", "k3", "tokens", "seq_ratio", "seqs", "seqs_masked", "tis_clipped", "tis_weight")


@dataclass
class Correction:
    pg_weight: torch.Tensor | None  # [N] fp32: min(exp(d), C), or None (TIS off)
    keep: torch.Tensor  # [N] bool: False on tokens of masked sequences
    sums: dict[str, torch.Tensor]  # METRIC_SUMS, each a 0-dim tensor

    @property
    def num_tokens(self) -> int:
        return int(self.keep.sum())


def rollout_correction(train_logp: torch.Tensor, rollout_logp: torch.Tensor, record: torch.Tensor, n_records: int,
                       tis_cap: float = 0.0, seq_mask: bool = False, seq_low: float = 0.0,
                       seq_high: float = float("inf")) -> Correction:
    """train_logp, rollout_logp [N] fp32 (detached), record [N] long: which of the n_records sequences each token
    belongs to (PackedBatch.response_record). tis_cap 0 = no IS weight; seq_mask False = keep every sequence."""
    d = (train_logp.detach().float() - rollout_logp.float()).clamp(-20.0, 20.0)  # as kernel B clamps its log-ratio
    ratio = torch.exp(d)
    counts = torch.zeros(n_records, device=d.device).index_add_(0, record, torch.ones_like(d))
    seq_ratio = torch.exp(torch.zeros(n_records, device=d.device).index_add_(0, record, d) / counts.clamp(min=1))
    present = counts > 0
    keep_seq = present
    if seq_mask:
        keep_seq = present & (seq_ratio >= seq_low) & (seq_ratio <= seq_high)
    weight = torch.clamp(ratio, max=tis_cap) if tis_cap > 0 else None
    sums = {
        "abs_diff": d.abs().sum(), "tokens": torch.tensor(float(d.numel()), device=d.device),
        "k3": (ratio - d - 1.0).sum(),  # KL(rollout || train) estimated under the sampler (Schulman's k3)
        "seq_ratio": seq_ratio[present].sum(), "seqs": present.sum().float(),
        "seqs_masked": (present & ~keep_seq).sum().float(),
        "tis_clipped": (ratio > tis_cap).sum().float() if tis_cap > 0 else torch.zeros((), device=d.device),
        "tis_weight": weight.sum() if weight is not None else torch.zeros((), device=d.device),
    }
    return Correction(weight, keep_seq[record], sums)


def mismatch_metrics(sums: dict[str, float], tis: bool) -> dict[str, float]:
    """Global sums (over micro-batches and ranks) -> the logged numbers; the TIS ones only when TIS is on."""
    tokens, seqs = max(sums["tokens"], 1.0), max(sums["seqs"], 1.0)
    out = {"logp_gap": sums["abs_diff"] / tokens,  # mean |log π_train − log π_rollout| per token
           "mismatch/k3": sums["k3"] / tokens,
           "mismatch/seq_ratio": sums["seq_ratio"] / seqs,  # mean geometric-mean ratio of a sequence
           "mismatch/seq_masked_frac": sums["seqs_masked"] / seqs}
    if tis:
        out |= {"mismatch/tis_clip_frac": sums["tis_clipped"] / tokens,
                "mismatch/tis_weight": sums["tis_weight"] / tokens}
    return out


# ----------------------------------------------------------------------------- the loss

def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    num_tokens: torch.Tensor,
    settings: AlgoCfg,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pg_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ m·(pg + β·kl) / N_global for one micro-batch (DESIGN §5), by the fused kernel B.

    settings: the config's algo section, the one source of ε_low, ε_high, c, β and the KL estimator.

    logp, advantages, old/ref logp, entropy, mask: [N] over this micro-batch's response tokens (mask defaults to all
    ones). num_tokens: 0-dim tensor on logp's device, the GLOBAL count of response tokens (all micro-batches, all
    ranks), so that summing the returned loss and metrics over micro-batches gives the global token-mean exactly.
    old_logp None: on-policy, ratio ≡ 1 (DESIGN §3.6). Every metric is a sum over this call divided by num_tokens.
    pg_weight: a per-token weight on the policy-gradient term only (rollout correction's truncated IS weight,
    rollout_correction above); None = 1.
    """
    from kernels import ppo_loss

    assert settings.kl_coef == 0.0 or ref_logp is not None, "kl_coef > 0 needs ref_logp (the frozen reference's)"
    assert torch.is_tensor(num_tokens) and num_tokens.ndim == 0, "num_tokens must be a 0-dim tensor (no host sync)"
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    loss, metrics = ppo_loss(logp, old_logp, ref_logp, advantages.float(), mask, num_tokens,
                             eps_low=settings.eps_low, eps_high=settings.eps_high, clip_c=settings.clip_c,
                             kl_coef=settings.kl_coef, kl_type=settings.kl_type, pg_weight=pg_weight)
    metrics = dict(metrics)
    if entropy is not None:  # logged only (DAPO: watch for entropy collapse); same sum / N_global convention
        metrics["entropy"] = (entropy.detach().float() * mask).sum() / num_tokens
    return loss, metrics
