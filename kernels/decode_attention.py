"""Decode attention over a slot KV cache: one new query token per row, each row reading only its own valid keys.

    decode_attention(q [B, Hq, D], k_cache [S, Hkv, T, D], v_cache [S, Hkv, T, D], lengths [B], scale,
                     k_new=None, v_new=None) -> [B, Hq, D]

Row b of the batch lives in cache slot b (the generator keeps live rows packed at the front of the cache, see
memrl/kv_cache.py) and attends to keys 0 .. lengths[b]-1 of that slot. Hq = g * Hkv (GQA). With k_new / v_new
[B, Hkv, D] (the step's new token), the kernel also *appends*: it stores them at position lengths[b]-1 and takes
that key from registers instead of memory — one kernel per layer instead of two cache writes plus attention.

Why a kernel: decode is memory-bound; the floor is one read of every row's *valid* K and V. SDPA would read all T
keys of every row (with a padded [B, 1, 1, T] mask), and repeat K/V per query head unless its GQA path is taken.

Design (flash-decoding / split-K, as in vLLM's, SGLang's and lightllm's Triton decode kernels):
  1. `_decode_attn_split`, grid (B, Hkv, splits): a program owns `split_size` consecutive keys of one (row, kv head)
     and serves all g query heads of that group from ONE read of each K/V tile: q is a [g padded to 16, D] tile, so
     scores and the output update are two tl.dot (tensor cores, fp32 accumulate), with an online softmax.
     A program whose chunk starts past its row's end loads nothing and stores nothing.
     A row whose keys fit in one chunk (cdiv(len, split_size) == 1) writes its output directly; longer rows write
     each chunk's normalised output and log-sum-exp (fp32) for step 2.
  2. `_decode_attn_combine`, grid (B, Hkv): out = sum_s exp(lse_s - lse) * out_s over the row's *valid* chunks only,
     all g heads of the group per program. Skipped entirely when the grid has one split.
Choosing the split (`plan_split`): one chunk per (row, kv head) — no split, no combine — unless the grid would
leave most of the GPU idle for a long time: fewer than half as many (row, kv head) pairs as SMs AND a slot of at
least 2 * MIN_SPLIT keys. Then about one program per SM, chunks of >= MIN_SPLIT keys. Measured on H100 (132 SMs,
Qwen2.5-1.5B heads: Hkv 2, g 6, D 128; one layer in a CUDA graph; us per call, 1 / 2 / 4 / 8 / 16 splits):
      rows x ctx (slot)    pairs    1       2       4       8       16
      64 x 640 (768)        128    19.9    22.4    25.1    25.6    28.7
      64 x 1280 (1536)      128    33.9    36.7    39.6    42.7    43.4
      256 x 640 (768)       512    65.2    70.7    73.6    77.2    89.5
      256 x 1280 (1536)     512   123.2   125.2   128.5   136.0   143.5
      512 x 640 (768)      1024   119.6   129.9   137.4   146.7   178.4
      512 x 1280 (1536)    1024   228.7   240.0   248.6   263.7   285.1
Every extra split was slower, even at 128 pairs (< 1 program per SM) and 1,536-key slots: each split adds its
partials' write, the combine launch and one more q load, and (our reading) one program per (row, head) already
keeps enough K/V tiles in flight at these sizes. Splitting should only pay when most SMs would idle through a long
scan — a thin tail of long rollouts, e.g. 8 rows x 2 heads = 16 programs on 132 SMs at 4k+ keys; the benchmark's
16 x 4096 shape measures that case.
The grid depends only on (B, T) — never on the lengths, which are read on the device — so a CUDA graph captured
once per batch bucket stays valid as rows grow.

Loads: a K or V tile is BLOCK_N rows of D contiguous elements, masked by row only, so each thread issues 16-byte
vector loads; Triton pipelines the loop (num_stages tiles in flight per program).

`decode_attention_torch` is the PyTorch reference (and the CPU path: a batched matmul over the packed slots, reading
keys up to the longest row, `max_len`). Both accumulate in fp32.
"""
from __future__ import annotations

import math

import torch

from kernels.backend import interpreter_on, tl, triton, use_triton

BLOCK_N = 64  # keys per inner step: a 64 x 128 bf16 tile is 16 KB; 3 stages of K and V = 96 KB, two programs/SM
NUM_WARPS = 4
NUM_STAGES = 3
MIN_SPLIT = 1024  # keys per chunk at least when splitting: 1-split beat 2 splits at 1,536-key slots (docstring)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                           scale: float, max_len: int | None = None, k_new: torch.Tensor | None = None,
                           v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: q [B, Hq, D], caches [S >= B, Hkv, T, D], lengths [B] (1 <= len <= T) -> [B, Hq, D] in q's dtype.

    max_len bounds the keys read (the longest row, when the caller knows it on the host); default T.
    k_new / v_new [B, Hkv, D]: first written into the caches at position lengths-1 of slots 0..B-1."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if k_new is not None:
        rows = torch.arange(B, device=q.device)
        k_cache[rows, :, lengths - 1] = k_new.to(k_cache.dtype)  # (B, Hkv, D) at (slot b, position len_b - 1)
        v_cache[rows, :, lengths - 1] = v_new.to(v_cache.dtype)
    L = k_cache.shape[2] if max_len is None else max_len
    k = k_cache[:B, :, :L]  # (B, Hkv, L, D): a view, the rows are the first B slots
    v = v_cache[:B, :, :L]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)  # each kv head serves g consecutive query heads (HF's repeat_interleave)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, g, L)
    valid = torch.arange(L, device=q.device)[None, :] < lengths[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D).to(q.dtype)


@triton.jit
def _decode_attn_split(Q, K, V, KNEW, VNEW, LENS, PART, LSE, O,
                  stride_qb, stride_qh,
                  stride_ks, stride_kh, stride_kt,
                  stride_vs, stride_vh, stride_vt,
                  stride_nb, stride_nh,  # k_new / v_new (B, Hkv, D), used when APPEND
                  stride_pb, stride_ph, stride_ps,  # partial outputs (B, Hq, splits, D), fp32
                  stride_lb, stride_lh,  # partial lse (B, Hq, splits)
                  stride_ob, stride_oh,  # final output (B, Hq, D)
                  scale, split_size,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, APPEND: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64: slot offsets of a large cache overflow int32
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(LENS + b).to(tl.int32)
    start = sp * split_size
    end = tl.minimum(start + split_size, length)
    chunks = tl.cdiv(length, split_size)  # this row's valid chunks; 1 = write the output directly
    active = start < length

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = hk * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    k_row = K + b * stride_ks + hk * stride_kh
    v_row = V + b * stride_vs + hk * stride_vh
    owns_new = active & (end == length)  # this chunk holds position length-1
    scan_end = end
    if APPEND:  # the new key is not in the cache yet: it comes from KNEW below
        scan_end = tl.where(owns_new, end - 1, end)
    for n0 in range(start, scan_end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        nmask = n < scan_end
        if BLOCK_D == HEAD_DIM:  # row mask only: constant along D, so loads stay 16-byte vectors
            kv_mask = nmask[:, None]
        else:
            kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_row + n[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 operands are exact there
            k = k.to(tl.float32)
        if IEEE:  # fp32 caches: keep fp32 products (tf32 would drift from the eager reference)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK)
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one valid key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_row + n[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    if APPEND:  # the new token: one more key from registers (fp32 products), then stored into the cache
        kn = tl.load(KNEW + b * stride_nb + hk * stride_nh + d, mask=dmask, other=0.0)
        vn = tl.load(VNEW + b * stride_nb + hk * stride_nh + d, mask=dmask, other=0.0)
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale  # (GROUP_PAD,)
        s_new = tl.where(owns_new, s_new, float("-inf"))
        m_new = tl.maximum(m, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # chunk with no key at all: no NaN from -inf - -inf
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s_new - m_safe)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
        m = m_new
        last = (length - 1).to(tl.int64)
        # masks fold the scalar condition into a bound (the interpreter rejects block & scalar masks)
        new_mask = d < tl.where(owns_new, HEAD_DIM, 0)
        tl.store(k_row + last * stride_kt + d, kn.to(K.dtype.element_ty), mask=new_mask)
        tl.store(v_row + last * stride_vt + d, vn.to(V.dtype.element_ty), mask=new_mask)

    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    direct_g = g < tl.where(active & (chunks == 1), GROUP, 0)  # heads to store: all or none
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=direct_g[:, None] & dmask[None, :])
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    split_g = g < tl.where(active & (chunks > 1), GROUP, 0)
    tl.store(PART + b * stride_pb + heads[:, None] * stride_ph + sp * stride_ps + d[None, :], out,
             mask=split_g[:, None] & dmask[None, :])
    tl.store(LSE + b * stride_lb + heads * stride_lh + sp, lse, mask=split_g)


@triton.jit
def _decode_attn_combine(PART, LSE, O, LENS,
                    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                    split_size,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    length = tl.load(LENS + b).to(tl.int32)
    chunks = tl.cdiv(length, split_size)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    omask = gmask[:, None] & (d[None, :] < HEAD_DIM)
    heads = hk * GROUP + g
    n_read = tl.where(chunks > 1, chunks, 0)  # one chunk: the split kernel already wrote the output
    m = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    w_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_read):  # valid chunks only: each holds >= 1 key, so its lse is finite
        lse = tl.load(LSE + b * stride_lb + heads * stride_lh + s, mask=gmask, other=0.0)
        part = tl.load(PART + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + d[None, :],
                       mask=omask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        w_sum = w_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * part
        m = m_new
    out = acc / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
    store_g = g < tl.where(chunks > 1, GROUP, 0)
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=store_g[:, None] & (d[None, :] < HEAD_DIM))


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: any value exercises the same code
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def plan_split(batch: int, kv_heads: int, slot_len: int, device: torch.device, block_n: int = BLOCK_N,
               num_splits: int | None = None) -> int:
    """Keys per program (a multiple of block_n). One chunk per (row, kv head), unless there are fewer pairs than
    half the SMs and the slot has >= 2 * MIN_SPLIT keys: then ~one program per SM, chunks >= MIN_SPLIT keys.
    num_splits forces the number of chunks of a full-length row instead."""
    if num_splits is None:
        pairs, sms = batch * kv_heads, _sm_count(device)
        num_splits = 1
        if 2 * pairs < sms:
            num_splits = max(1, min(triton.cdiv(sms, pairs), slot_len // MIN_SPLIT, 64))
    return triton.cdiv(triton.cdiv(slot_len, num_splits), block_n) * block_n


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            scale: float, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                            num_splits: int | None = None, split_size: int | None = None, block_n: int = BLOCK_N,
                            num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Tile config defaults are module constants; benchmarks/bench_generate.py times alternatives.
    split_size (keys per program, a multiple of block_n) or num_splits override `plan_split`."""
    B, Hq, D = q.shape
    S, Hkv, T, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and S >= B and Hq % Hkv == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert lengths.shape == (B,)
    q = q.contiguous()
    append = k_new is not None
    if append:
        assert k_new.shape == v_new.shape == (B, Hkv, D)
        if k_new.stride(-1) != 1 or v_new.stride() != k_new.stride():  # one set of strides serves both
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        new_strides = (k_new.stride(0), k_new.stride(1))
    else:
        k_new = v_new = q  # never read
        new_strides = (0, 0)
    group = Hq // Hkv
    split_size = split_size or plan_split(B, Hkv, T, q.device, block_n, num_splits)
    assert split_size % block_n == 0
    splits = triton.cdiv(T, split_size)
    out = torch.empty_like(q)
    if splits == 1:  # every row writes its output directly: no partial buffers (the dummies are never touched)
        part, lse = out, out
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        p_strides, l_strides = part.stride()[:3], lse.stride()[:2]
    meta = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
                BLOCK_D=max(16, triton.next_power_of_2(D)))
    _decode_attn_split[(B, Hkv, splits)](
        q, k_cache, v_cache, k_new, v_new, lengths, part, lse, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *new_strides, *p_strides, *l_strides, out.stride(0), out.stride(1),
        scale, split_size,
        BLOCK=block_n, IEEE=q.dtype == torch.float32, UPCAST=interpreter_on() and q.dtype != torch.float32,
        APPEND=append, num_warps=num_warps, num_stages=num_stages, **meta,
    )
    if splits > 1:
        _decode_attn_combine[(B, Hkv)](
            part, lse, out, lengths, *p_strides, *l_strides, out.stride(0), out.stride(1), split_size,
            num_warps=4, **meta,
        )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, max_len: int | None = None, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Triton on CUDA (or under TRITON_INTERPRET), else the reference; `kernels.set_backend` forces either."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if use_triton(q, k_cache, v_cache):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale, k_new, v_new)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale, max_len, k_new, v_new)
