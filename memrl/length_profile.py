"""Realistic generation lengths for benchmarks on random weights (`rollout.length_profile`, with `ignore_eos`).

Random weights never sample an end token, so a benchmark that runs them either generates every turn to its full
budget (uniform lengths: the packed sequences of a micro-batch are all about as long) or, with a length profile,
stops each request at a limit drawn from the distribution a real model produced. The second is what training
meets: memory turns of 10-256 tokens beside answers of 100-512, hence very uneven packed sequences.

A profile is one capped lognormal per turn kind. A turn's length is min(X, cap) with X ~ LogNormal(mu, sigma); the
two parameters are solved from two measured numbers: the mean of min(X, cap) and the share of turns cut at the cap,
P(X >= cap). Closed form of the capped mean (Phi = the standard normal CDF, z = (ln cap - mu) / sigma):
    E[min(X, c)] = exp(mu + sigma^2 / 2) * Phi(z - sigma) + c * (1 - Phi(z))
and P(X >= c) = 1 - Phi(z), so mu = ln c - sigma * Phi^-1(1 - cut) and sigma follows by bisection on the mean.

Profiles:
  qwen2.5-0.5b-gsm8k  Qwen2.5-Coder-0.5B-Instruct (../shared/REAL_MODEL.md) on rule-sharded GSM8K, memory condition,
                      sampled at temperature 1 (train.py, 2026-11-30): memory turns mean ~55 tokens with ~3% cut at
                      the 256 cap; answers mean ~150 with a tail to the 512 cap (the cut share, 2%, is our reading of
                      "a tail to 512": it was not logged). Fitted: memory sigma 1.08 (median 33 tokens), answers
                      sigma 0.71 (median 119 tokens).

Invariants
  - A draw depends only on (profile, kind, seed): the rollout passes a seed derived from the request's own seed, so
    a run's lengths are as reproducible as its tokens. The uniform number comes from a hash (no RNG state), its
    normal quantile from statistics.NormalDist: the same on every platform and Python version.
  - Lengths are absolute token counts measured under the caps above: a smaller token budget cuts them (the limit
    is min(draw, budget)), a larger one does not stretch them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from statistics import NormalDist

_NORMAL = NormalDist()


@dataclass(frozen=True)
class CappedLognormal:
    """min(X, cap), X lognormal, fitted to a capped mean and a cut share (see the module docstring)."""

    mean: float  # E[min(X, cap)] in tokens
    cut: float  # P(X >= cap): the share of turns that run into the cap
    cap: int  # the token budget the lengths were measured under
    mu: float = field(init=False)
    sigma: float = field(init=False)

    def __post_init__(self):
        assert 0 < self.cut < 0.5 and 1 <= self.mean < self.cap, f"unreachable profile {self}"
        z_cut = _NORMAL.inv_cdf(1 - self.cut)
        lo, hi = 1e-3, 10.0  # the capped mean falls as sigma grows (the median ln cap - sigma z_cut drops)
        for _ in range(200):
            sigma = (lo + hi) / 2
            if capped_mean(math.log(self.cap) - sigma * z_cut, sigma, self.cap) > self.mean:
                lo = sigma
            else:
                hi = sigma
        sigma = (lo + hi) / 2
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "mu", math.log(self.cap) - sigma * z_cut)

    def draw(self, seed: int) -> int:
        """One length in [1, cap] for this seed: round(X) by the inverse CDF of a hashed uniform in (0, 1)."""
        digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
        u = ((int.from_bytes(digest, "little") >> 11) + 0.5) / 2**53  # 53 random bits, never 0 or 1
        x = math.exp(self.mu + self.sigma * _NORMAL.inv_cdf(u))
        return max(1, min(self.cap, round(x)))


def capped_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma) (closed form, module docstring)."""
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma * sigma / 2) * _NORMAL.cdf(z - sigma) + cap * (1 - _NORMAL.cdf(z))


# name -> {turn kind ("memory" | "final", as memrl.rollout names them): its length distribution}
PROFILES: dict[str, dict[str, CappedLognormal]] = {
    "qwen2.5-0.5b-gsm8k": {"memory": CappedLognormal(mean=55.0, cut=0.03, cap=256),
                           "final": CappedLognormal(mean=150.0, cut=0.02, cap=512)},
}


def length_limit(profile: str, kind: str, seed: int, budget: int) -> int:
    """max_new_tokens of one request: the profile's draw for this turn kind, never above the run's budget."""
    if profile not in PROFILES:
        raise ValueError(f"unknown length profile {profile!r}; known: {sorted(PROFILES)}")
    return min(budget, PROFILES[profile][kind].draw(seed))
