"""Rollout correction: the sampler's and the trainer's log-probs of the same tokens differ (bf16 generator kernels
vs the training forward: mean |Δ| 0.013 per token measured on a real 0.5B model on an H200), so the samples are
slightly off-policy. Off by default; the mismatch metrics are logged either way.

    d_t  = log π_train(y_t) − log π_rollout(y_t)        π_train: the trainer's log-prob at the rollout's weights
                                                        (the scoring pass's old log-prob), π_rollout: the sampler's
    token-level truncated IS:  w_t = min(exp(d_t), C)   on the policy-gradient term only (kernels/ppo_loss.py)
    sequence mask:             ρ_geo = exp(mean_t d_t) over a sequence; tokens of sequences with ρ_geo outside
                               [lo, hi] leave the loss AND its token count

Sources: truncated importance sampling (TIS) is Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training" (fengyao.notion.site/off-policy-rl): weight min(π_fsdp/π_vllm, C) on the PPO gradient,
C = 2 in their runs. The geometric-mean sequence mask is the "geometric" rejection sampling of Liu, Li et al. 2025,
"When Speed Kills Stability" (verl docs/algo/rollout_corr_math.md §3.3.3, §3.4: typical bounds 1 ± 1e-3, tight
because a per-token mean is ~|T| times smaller than the sequence log-ratio). Masked tokens are excluded from the
token-mean's denominator too, as verl does since 10/2025 (keeping them in the count scaled the gradient down).

A "sequence" is one training record: a memory / final turn, or a whole conversation row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# per-record sums, aggregated over micro-batches and ranks, then divided by their counts in train.py
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
