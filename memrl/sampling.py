"""Per-row sampling from logits: temperature, top-k, top-p, greedy, seeded, with the sampled token's log-prob.

One step for m rows:  logits [m, V] -> token [m] (long), logp [m] (fp32)

The distribution a row samples from (its log-prob is what we return, so the trainer can score the same thing):
  1. ids >= vocab_size are removed (Qwen pads its embedding above the tokenizer's real size);
  2. z = logits / temperature, in fp32;
  3. top-k: keep the k largest z (k = 0: all);
  4. top-p: over softmax of what is left, keep the smallest prefix (largest first) whose mass reaches p, i.e. keep
     token r (in descending order) iff the mass strictly before it is < p — the order transformers and vLLM use;
  5. sample from softmax(z) over the kept ids;  logp = z[token] - logsumexp(z[kept]).
Greedy rows (greedy=True or temperature 0) take argmax(logits) (first index on ties, as torch and transformers do)
and report the log-prob under the untempered, untruncated softmax (a point mass would report 0, which no one
can use; this is what a teacher-forced forward at temperature 1 gives).

Randomness is counter-based: the Gumbel noise for (row key, step, token id) is a fixed hash, so a row's tokens
depend only on its own key and logits — not on which other rows share the batch, how rows are packed or compacted,
or on any global RNG state. token = argmax(z + Gumbel) is an exact sample of softmax(z) (the Gumbel-max trick), and
lets the GPU sample in one pass over the logits without sorting (`sample_fused`, a Triton kernel beside its
reference `sample_torch`; both use the same hash, so they pick the same token up to float rounding of the logs).
The hash is murmur3's 32-bit finaliser (fmix32), applied three times; a uniform has 24 random bits.

Seeds (STYLE 10): every random stream of a run is named by derive_seed(train.seed, what, ...): a rollout request's
(step, episode, turn, sample), the data order's epoch, the mini-batch split's step, evaluation's sampled score. So
nothing depends on global RNG state, and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kernels.backend import tl, triton

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # 2^32 / phi: spreads consecutive token ids / steps over the 32-bit range before mixing


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes and Python versions (no hash():
    blake2b of the parts joined by "/")."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    greedy: bool = False  # also implied by temperature == 0
    stop_ids: frozenset[int] = frozenset()  # e.g. tokenizer.stop_ids; the stop token is kept in the output
    n: int = 1  # samples per prompt: one prefill, the KV cache forked to n rows
    seed: int | None = None  # None: drawn from torch's global RNG (so torch.manual_seed makes a run repeatable)

    def __post_init__(self):
        self.stop_ids = frozenset(int(t) for t in self.stop_ids)
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(t < 0 for t in self.stop_ids):
            raise ValueError(f"stop ids must be >= 0, got {sorted(self.stop_ids)}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether top-k / top-p change the distribution (such rows need a sort; the rest take the fused path)."""
        return not self.is_greedy and (self.top_k > 0 or self.top_p < 1.0)


# ----------------------------------------------------------------------------------------------------------
# keys and counter-based noise


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_keys(seed: int, stream: int, sample_index: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, stream, sample) row: its noise stream, whatever else is in the batch."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ (stream & 0xFFFFFFFFFFFFFFFF))
                    ^ sample_index)
    return x & _M32, x >> 32


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding uint32 values, without overflowing int64."""
    return ((a & 0xFFFF) * c + ((((a >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise_torch(key0: torch.Tensor, key1: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [m, vocab] fp32 for rows with keys [m] at step `counter` [m] (all int64)."""
    step_key = _fmix32_torch((key1 & _M32) ^ _mul32(counter & _M32, _GOLDEN))  # (m,)
    ids = torch.arange(vocab, device=key0.device, dtype=torch.int64)
    h = _fmix32_torch((_mul32(ids, _GOLDEN)[None, :] + (key0 & _M32)[:, None]) & _M32)  # (m, V)
    h = _fmix32_torch(h ^ step_key[:, None])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits -> (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------------------------
# reference sampler (CPU path, and the GPU path for rows that truncate)


def truncate_top_k_top_p(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """z [m, V] fp32 (tempered logits) -> z with the ids outside top-k, then top-p, set to -inf."""
    V = z.shape[-1]
    sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=z.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    sorted_z = sorted_z.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(sorted_z, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = keep & (mass_before < top_p[:, None])  # rank 0 always stays (0 < p)
    return torch.full_like(z, float("-inf")).scatter(1, order, sorted_z.masked_fill(~keep, float("-inf")))


def sample_torch(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor, counter: torch.Tensor,
                 truncate_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [m, >= vocab_size]; per-row temperature (0 = greedy), top_k, top_p, keys, counter [m].

    truncate_rows: indices of the rows whose top-k/top-p is active (None: none) — only those are sorted."""
    x = logits[:, :vocab_size].float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    z = x / t[:, None]
    if truncate_rows is not None and truncate_rows.numel() > 0:
        z[truncate_rows] = truncate_top_k_top_p(z[truncate_rows], top_k[truncate_rows], top_p[truncate_rows])
    lse = torch.logsumexp(z, dim=-1)
    noisy = z + gumbel_noise_torch(key0, key1, counter, vocab_size)
    token = torch.where(greedy, x.argmax(dim=-1), noisy.argmax(dim=-1))
    logp = z.gather(1, token[:, None])[:, 0] - lse
    return token, logp


# ----------------------------------------------------------------------------------------------------------
# fused sampler (GPU, rows without top-k/top-p): one read of the logits, no sort, no fp32 copy


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= tl.full((), 0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h *= tl.full((), 0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    return h


@triton.jit
def _sample_kernel(LOGITS, stride_row, vocab, TEMP, KEY0, KEY1, COUNTER, TOKEN, LOGP, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(TEMP + row)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)
    key0 = tl.load(KEY0 + row).to(tl.uint32)
    golden = tl.full((), 0x9E3779B1, tl.uint32)
    step_key = _fmix32(tl.load(KEY1 + row).to(tl.uint32) ^ (tl.load(COUNTER + row).to(tl.uint32) * golden))

    m = tl.zeros((), dtype=tl.float32) - float("inf")  # running max of z
    s = tl.zeros((), dtype=tl.float32)  # running sum of exp(z - m)
    best = tl.zeros((), dtype=tl.float32) - float("inf")  # best score so far (z + noise, or z when greedy)
    best_id = tl.zeros((), dtype=tl.int32)
    best_z = tl.zeros((), dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        z = tl.load(LOGITS + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / t
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        h = _fmix32(offs.to(tl.uint32) * golden + key0)
        h = _fmix32(h ^ step_key)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(greedy, z, z - tl.log(-tl.log(u)))
        score = tl.where(mask, score, float("-inf"))
        block_best = tl.max(score, 0)
        block_id = tl.argmax(score, 0)  # first index of the maximum
        block_z = tl.sum(tl.where(offs == start + block_id, z, 0.0), 0)
        better = block_best > best  # strict: ties keep the earlier block, i.e. the first index overall
        best_id = tl.where(better, start + block_id, best_id)
        best_z = tl.where(better, block_z, best_z)
        best = tl.where(better, block_best, best)
    tl.store(TOKEN + row, best_id.to(tl.int64))
    tl.store(LOGP + row, best_z - (m + tl.log(s)))


def sample_fused(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, key0: torch.Tensor,
                 key1: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as sample_torch for rows without top-k/top-p, in one kernel (graph-capturable: no host sync)."""
    m = logits.shape[0]
    assert logits.stride(-1) == 1
    token = torch.empty(m, dtype=torch.int64, device=logits.device)
    logp = torch.empty(m, dtype=torch.float32, device=logits.device)
    _sample_kernel[(m,)](logits, logits.stride(0), vocab_size, temperature, key0, key1, counter, token, logp,
                         BLOCK=min(4096, triton.next_power_of_2(vocab_size)), num_warps=8)
    return token, logp
