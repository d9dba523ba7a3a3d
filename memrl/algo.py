"""The RL algorithm between rollout and optimizer step (DESIGN.md §3 steps 4-8, §5).

    rewards [n_traj] --group_advantages--> A [n_traj] --pack_turns (broadcast)--> PackedBatch micro-batches
    PackedBatch --response_logprobs(model)--> logp [N] --policy_loss (kernels.ppo_loss)--> loss, metrics

Invariants:
- The advantage of trajectory i is computed once per trajectory, then put on every response token of every turn of
  i (memory turns and the final turn alike); prompt tokens carry nothing (they are not even scored).
- A record is one training sequence. Memory / single-turn records hold one reply (response_ids). A conversation row
  (memrl.conversation) holds a whole chat in one sequence: its response_spans mark every assistant reply inside
  response_ids, and only those tokens are scored and trained (the user messages between them are masked, as the
  prompt is).
- The loss is Σ m·(pg + β·kl) / N_global, so summing policy_loss over micro-batches (and ranks) gives exactly one
  global token-mean, whatever the packing.
- pack_turns is deterministic: the same records and budget give the same micro-batches, so a scoring pass and a
  training pass see identical shapes (and, with deterministic kernels, bitwise equal log-probs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memrl.config import AlgoCfg

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


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)

def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Keep mask [n] bool: False for every trajectory of a group whose rewards are all equal (zero advantage, no
    gradient: DAPO §3.2 "Dynamic Sampling")."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    r = rewards.double()
    gmax = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amin")
    return (gmax > gmin)[inverse]


class DynamicSampler:
    """Collects groups with mixed rewards over generation rounds until `target_groups` are kept, for at most
    `max_rounds` rounds (verl's max_num_gen_batches). Usage:

        sampler = DynamicSampler(target_groups=B, max_rounds=cfg.max_sampling_rounds)
        while sampler.need_more():
            ...generate a round...; keep = sampler.add(rewards, group_ids)   # trims past the target
        if sampler.exhausted(): print(sampler.message())                     # too easy / too hard
    """

    def __init__(self, target_groups: int, max_rounds: int):
        assert target_groups > 0 and max_rounds > 0, (target_groups, max_rounds)
        self.target_groups, self.max_rounds = target_groups, max_rounds
        self.rounds = self.kept = self.seen = 0
        self.all_solved = self.all_failed = self.all_equal_other = 0

    def add(self, rewards: torch.Tensor, group_ids: torch.Tensor, max_reward: float = 1.0,
            min_reward: float = 0.0) -> torch.Tensor:
        """Keep mask [n] for this round: mixed-reward groups, in order of first appearance, up to the target."""
        self.rounds += 1
        keep = filter_groups(rewards, group_ids)
        uniq, first = [], {}
        for i, g in enumerate(group_ids.tolist()):
            if g not in first:
                first[g] = i
                uniq.append(g)
        for g in uniq:
            i = first[g]
            self.seen += 1
            if keep[i]:
                if self.kept < self.target_groups:
                    self.kept += 1
                else:  # past the target: drop the whole group
                    keep = keep & (group_ids != g)
            elif rewards[i] >= max_reward:
                self.all_solved += 1
            elif rewards[i] <= min_reward:
                self.all_failed += 1
            else:
                self.all_equal_other += 1
        return keep

    def done(self) -> bool:
        return self.kept >= self.target_groups

    def need_more(self) -> bool:
        return not self.done() and self.rounds < self.max_rounds

    def exhausted(self) -> bool:
        return not self.done() and self.rounds >= self.max_rounds

    def message(self) -> str:
        seen = max(self.seen, 1)
        solved, failed = self.all_solved / seen, self.all_failed / seen
        verdict = ("the data are too easy for this policy" if solved > failed
                   else "the data are too hard for this policy" if failed > solved
                   else "too many groups have equal rewards")
        return (f"dynamic sampling: after {self.rounds} round(s) only {self.kept}/{self.target_groups} groups have "
                f"mixed rewards ({self.all_solved}/{self.seen} groups all solved, {self.all_failed} all failed, "
                f"{self.all_equal_other} otherwise equal): {verdict}. Raise algo.max_sampling_rounds, turn "
                f"algo.dynamic_sampling off, or change the data/group size.")


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
    memrl/rollout_correction.py); None = 1.
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
