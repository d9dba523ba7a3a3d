"""Decode attention over a slot KV cache: one new query token per row, each row reading only its own valid keys.

    decode_attention(q [B, Hq, D], k_cache [S, Hkv, T, D], v_cache [S, Hkv, T, D], lengths [B], scale) -> [B, Hq, D]

Row b of the batch lives in cache slot b (the generator keeps live rows packed at the front of the cache, see
memrl/kv_cache.py) and attends to keys 0 .. lengths[b]-1 of that slot. Hq = g * Hkv (GQA).

Why a kernel: SDPA would read all T keys of every row (or need a padded [B, 1, 1, T] mask plus a copy of the slots),
while decode is memory-bound and the floor is one read of each row's *valid* K and V. The Triton path is
flash-decoding (split-K):
  1. `_split_kernel`, grid (B, Hkv, splits): one program reads one contiguous chunk of keys of one kv head once and
     serves all g query heads of that group with one tl.dot (the g rows padded to 16), keeping an online softmax;
     it writes the chunk's normalised output and its log-sum-exp. Chunks past a row's length do no loads.
  2. `_combine_kernel`, grid (B, Hq): out = sum_s exp(lse_s - lse) * out_s.
Splitting the key axis keeps the GPU busy when B * Hkv is small (64 rows x 2 kv heads = 128 programs would leave
most of 132 SMs idle while a few programs walk long rows). With one split the first kernel writes the output itself.
The grid depends only on (B, T) — never on the lengths, which are read on the device — so a CUDA graph captured
once per batch bucket stays valid as rows grow.

`decode_attention_torch` is the PyTorch reference (and the CPU path: a batched matmul over the packed slots, reading
keys up to the longest row, `max_len`). Both accumulate in fp32.
"""
from __future__ import annotations

import math

import torch

from kernels.backend import interpreter_on, tl, triton, use_triton

BLOCK_N = 64  # keys per inner step: a 64 x 128 bf16 tile is 16 KB, so three pipeline stages fit twice per SM
NUM_WARPS = 4
NUM_STAGES = 3


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                           scale: float, max_len: int | None = None) -> torch.Tensor:
    """Reference: q [B, Hq, D], caches [S >= B, Hkv, T, D], lengths [B] (1 <= len <= T) -> [B, Hq, D] in q's dtype.

    max_len bounds the keys read (the longest row, when the caller knows it on the host); default T."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
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
def _split_kernel(Q, K, V, LENS, OUT, LSE, O,
                  stride_qb, stride_qh,
                  stride_ks, stride_kh, stride_kt,
                  stride_vs, stride_vh, stride_vt,
                  stride_pb, stride_ph, stride_ps,  # partial outputs (B, Hq, splits, D), fp32
                  stride_lb, stride_lh,  # partial lse (B, Hq, splits)
                  stride_ob, stride_oh,  # final output (B, Hq, D), used when DIRECT
                  scale, split_size,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(LENS + b).to(tl.int32)
    start = sp * split_size
    end = tl.minimum(start + split_size, length)

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
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_row + n[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 operands are exact there
            k = k.to(tl.float32)
        if IEEE:  # fp32 caches: keep fp32 products (tf32 would drift from the eager reference)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK)
        m_new = tl.maximum(m, tl.max(s, 1))
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

    has = l > 0  # an empty chunk (past the row's end) contributes weight exp(-inf) = 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=omask)
    else:
        tl.store(OUT + b * stride_pb + heads[:, None] * stride_ph + sp * stride_ps + d[None, :], out, mask=omask)
        tl.store(LSE + b * stride_lb + heads * stride_lh + sp, lse, mask=gmask)


@triton.jit
def _combine_kernel(OUT, LSE, O,
                    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                    num_splits,
                    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)  # finite: split 0 always holds the row's first key
    w = tl.where(smask, tl.exp(lse - top), 0.0)
    part = tl.load(OUT + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits_for(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Split the key axis until there are about 4 programs per SM (fewer when rows are short)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 8  # interpreter: any value exercises the same code
    blocks = triton.cdiv(max_len, BLOCK_N)
    want = triton.cdiv(4 * sms, batch * kv_heads)
    return max(1, min(want, blocks, 64))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            scale: float, num_splits: int | None = None, block_n: int = BLOCK_N,
                            num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Tile config defaults are module constants; benchmarks/bench_generate.py times alternatives."""
    B, Hq, D = q.shape
    S, Hkv, T, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and S >= B and Hq % Hkv == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q.contiguous()
    group = Hq // Hkv
    splits = num_splits or num_splits_for(B, Hkv, T, q.device)
    split_size = triton.cdiv(triton.cdiv(T, splits), block_n) * block_n
    splits = triton.cdiv(T, split_size)
    out = torch.empty_like(q)
    direct = splits == 1
    if direct:  # nothing to combine: the kernel writes the output (dummy partial buffers are never touched)
        part, lse = out, out
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        p_strides, l_strides = part.stride()[:3], lse.stride()[:2]
    _split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, lengths, part, lse, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *p_strides, *l_strides, out.stride(0), out.stride(1),
        scale, split_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK=block_n, IEEE=q.dtype == torch.float32, DIRECT=direct,
        UPCAST=interpreter_on() and q.dtype != torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _combine_kernel[(B, Hq)](
            part, lse, out, *part.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1), splits,
            SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
            num_warps=4,
        )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, max_len: int | None = None) -> torch.Tensor:
    """Triton on CUDA (or under TRITON_INTERPRET), else the reference; `kernels.set_backend` forces either."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if use_triton(q, k_cache, v_cache):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale, max_len=max_len)
