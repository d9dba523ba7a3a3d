"""Causal attention over packed variable-length sequences (cu_seqlens), forward and backward, in Triton.

    varlen_attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [S+1] int32, scale=None, tiles=None)
        -> out [T, Hq, D]                                         differentiable w.r.t. q, k, v

The T rows hold S sequences back to back: sequence s is rows cu_seqlens[s] .. cu_seqlens[s+1]-1, and row i of a
sequence attends to rows 0..i of the same sequence only (causal, restarting at each sequence). Hq = g * Hkv (GQA:
query head h reads kv head h // g, as Hugging Face's repeat_interleave). D is any even size (64 and 128 are the
fast ones; others are padded to a power of two inside the kernel). bf16 / fp16 / fp32 inputs, fp32 accumulation.

Why a kernel: a training micro-batch packs ~100 sequences of 10-1,000 tokens into one 16k-token row. One SDPA call
per sequence is ~100 launches per layer (CPU-bound), a block-diagonal mask costs T^2, and right-padding wastes what
the longest sequence imposes on all others. Here every layer is 1 launch forward and 2 backward, whatever the
spread of lengths, and the work is sum_s L_s^2 / 2 (the causal FLOP floor) up to tile rounding.

Design: per-sequence tiles (FlashAttention-2, Dao 2023, with the Triton tutorial's fused backward).
  - The grid is (tile, head). A *tile* is TILE consecutive rows of ONE sequence: sequence s owns ceil(L_s / TILE)
    tiles, listed in order in a small map (tile -> (sequence, first row)) built ON THE DEVICE from cu_seqlens
    (`varlen_tiles`: a few tiny torch ops, no host sync; the model builds it once per forward and shares it across
    layers). The grid size is the bound cdiv(T, TILE) + S (T and S are shapes, known on the host); the programs past
    the real tile count return at once. Tiles never straddle two sequences, so a tile's key range is one contiguous
    run [0, row] of its own sequence and no work is spent on keys of another sequence.
    (Alternative considered: q-blocks of the packed row with a seq-id mask; a block straddling k sequences scans the
    union of their key ranges, wasted work that grows with the number of short sequences.)
  - Forward, program (tile, q head): online softmax over the key blocks of its sequence, in two loops: the blocks
    strictly below the tile's first row (no mask at all), then the diagonal blocks (causal mask). Writes out and
    the log-sum-exp (fp32, base-2 units of the scaled scores) for the backward.
  - Backward = 2 launches, no atomics:
      1. `_bwd_preprocess`: delta_i = sum_d out_id * dout_id (fp32), per row and q head.
      2. `_bwd_kernel`, program (tile, KV head): first dK, dV for the tile's rows as KEYS, accumulated in registers
         over the g query heads of the group and every query block at or after the tile (so GQA needs no
         reduction over heads afterwards); then dQ for the tile's rows as QUERIES, for each of the g heads, over
         the key blocks up to the tile. Each output element has exactly one owner that sums in a fixed order:
         bitwise deterministic, and dQ needs no fp32 accumulator in memory. Inside a sequence a tile's dK/dV work
         shrinks as its dQ work grows (n_tiles - i versus i + 1 key blocks), so programs are evenly loaded.
    With P = softmax(scale * Q K^T) (causal), dP = dO V^T, Delta = rowsum(O * dO):
        dV = P^T dO,   dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q        (FA-2, Alg. 2)
    P is recomputed from Q, K and the saved log-sum-exp; nothing of size T^2 is stored.

Floor: 4 * sum_s L_s^2 / 2 * D * Hq FLOPs forward (two matmuls over the causal half), 2.5x that backward (five
matmuls, one of them the recomputed QK^T). benchmarks/bench_attention.py prints it and the % reached.

Invariants
  - Deterministic: no atomics, fixed loop orders, tile sizes are constants per device kind (never a function of T):
    two calls give bitwise-equal outputs and gradients, with or without grad enabled (scoring == training forward).
  - A sequence of length 1 attends to itself; rows of different sequences never mix (tested against float64).
  - `LAUNCHES` counts every kernel launch of this module (tests assert 1 forward + 2 backward per call).

`varlen_attention_torch` is the reference with the same signature: a loop over the sequences, causal attention in
fp32 (float64 inputs stay float64: the tests' exact path). `set_backend("torch")` / MEMRL_KERNELS=torch force it.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from kernels.backend import tl, triton, use_triton

LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) so the kernels use exp2 (one instruction)

# Tile settings per device kind. TILE rows of one sequence per program (forward: BLOCK_M; backward: the key tile for
# dK/dV and the query tile for dQ); STEP rows per inner step (TILE % STEP == 0). Changing them changes low bits, never
# the determinism. GPU values follow the FA-2 Triton tutorial's head-dim 64/128 settings; the backward holds dK and dV
# [TILE, D] in fp32 registers, hence the smaller tile than the forward. Tune with benchmarks/bench_attention.py.
_GPU_FWD = {64: dict(TILE=128, STEP=64, num_warps=4, num_stages=3),
            128: dict(TILE=128, STEP=64, num_warps=8, num_stages=3)}
_GPU_BWD = {64: dict(TILE=64, STEP=32, num_warps=4, num_stages=2),
            128: dict(TILE=64, STEP=32, num_warps=8, num_stages=2)}
# Triton's interpreter (CPU tests): its cost is per operation, not per element, so tiles as large as the tests'
# sequences allow; a 500-token test sequence still spans 8 tiles, and TILE != STEP runs the multi-step diagonal.
_CPU_FWD = dict(TILE=64, STEP=32)
_CPU_BWD = dict(TILE=64, STEP=32)
_PRE_BLOCK = 64  # rows per program of the delta preprocess

LAUNCHES: Counter = Counter()  # kernel name -> launches since the last clear(); read by tests and the benchmark


def _configs(on_cuda: bool, head_dim: int) -> tuple[dict, dict]:
    if not on_cuda:
        return dict(_CPU_FWD), dict(_CPU_BWD)
    d = 64 if head_dim <= 64 else 128
    return dict(_GPU_FWD[d]), dict(_GPU_BWD[d])


def _dot_args(x: torch.Tensor) -> dict:
    # fp32 inputs: exact fp32 products ("ieee", not TF32), so fp32 results match float64 closely. On CPU the kernels
    # run in Triton's interpreter, whose bf16 tl.dot is broken: upcast the tiles there (exact).
    return dict(UPCAST=(not x.is_cuda) and x.dtype != torch.float32,
                DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")


# ----------------------------------------------------------------------------------------------------------
# the tile map


def varlen_tiles(cu_seqlens: torch.Tensor, total: int, tile: int) -> torch.Tensor:
    """tile -> (sequence, first row within the sequence): int32 [2, cdiv(total, tile) + S], on cu_seqlens' device.

    Sequence s owns ceil(L_s / tile) consecutive tiles. The map has a static size (an upper bound on the tile count:
    sum_s ceil(L_s / tile) <= total / tile + S), so it is built without reading the lengths on the host; entries
    past the real count hold (S, 0), which the kernels treat as "no work"."""
    S = cu_seqlens.numel() - 1
    n = triton.cdiv(total, tile) + S
    cu = cu_seqlens.long()
    counts = (cu[1:] - cu[:-1] + tile - 1) // tile  # [S] tiles per sequence
    ends = torch.cumsum(counts, 0)  # [S] one past each sequence's last tile
    ids = torch.arange(n, device=cu.device)
    seq = torch.searchsorted(ends, ids, right=True)  # [n] in 0..S (S = past the end)
    first = (ends - counts)[seq.clamp(max=max(S - 1, 0))]
    row = torch.where(seq < S, (ids - first) * tile, 0)
    return torch.stack((seq, row)).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Arguments that change with every micro-batch (sequence and tile counts, T) are not specialised
# (Triton would otherwise compile one variant per value of "divisible by 16").


@triton.jit(do_not_specialize=["n_seqs", "n_tiles", "sl_h"])
def _fwd_kernel(Q, K, V, O, LSE, CU, TILES, n_seqs, n_tiles,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sl_h,
                qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                TILE: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(TILES + tile)
    if seq >= n_seqs:  # past the real tile count (the grid is an upper bound)
        return
    m0 = tl.load(TILES + n_tiles + tile)  # first row of the tile, within its sequence
    start = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - tl.load(CU + seq)
    hk = h // GROUP

    rows = m0 + tl.arange(0, TILE)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (start + rows)[:, None] * sq_t + h * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + start * sk_t + hk * sk_h
    v_base = V + start * sv_t + hk * sv_h

    m_i = tl.zeros([TILE], dtype=tl.float32) - float("inf")  # running max (base-2 units)
    l_i = tl.zeros([TILE], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    # loop 1: key blocks entirely before the tile's first row: every (query, key) pair is causal-valid, no mask
    for n0 in range(0, m0, STEP):
        cols = n0 + tl.arange(0, STEP)
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [TILE, STEP]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # loop 2: the diagonal blocks, key j <= query i; the first key (j = m0 <= i) keeps every row finite
    for n0 in range(m0, tl.minimum(m0 + TILE, L), STEP):
        cols = n0 + tl.arange(0, STEP)
        col_ok = cols < L
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where((cols[None, :] <= rows[:, None]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + (start + rows)[:, None] * so_t + h * so_h + d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * sl_h + start + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["T", "sl_h"])
def _bwd_preprocess(O, DO, DELTA, T, so_t, so_h, sdo_t, sdo_h, sl_h,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, i] = sum_d O[i, h, d] * dO[i, h, d] in fp32 (FA-2's D_i)."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * so_t + h * so_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows64[:, None] * sdo_t + h * sdo_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * sl_h + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit(do_not_specialize=["n_seqs", "n_tiles", "sl_h"])
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU, TILES, n_seqs, n_tiles,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sl_h,
                sdq_t, sdq_h, sdk_t, sdk_h, sdv_t, sdv_h,
                scale, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                TILE: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    seq = tl.load(TILES + tile)
    if seq >= n_seqs:
        return
    r0 = tl.load(TILES + n_tiles + tile)
    start = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - tl.load(CU + seq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    diag_end = tl.minimum(r0 + TILE, L)

    # ---- part 1: dK, dV of the tile's rows as keys, summed over the g query heads of this kv head
    kr = r0 + tl.arange(0, TILE)
    kr_ok = kr < L
    kv_mask = kr_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (start + kr)[:, None] * sk_t + hk * sk_h + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (start + kr)[:, None] * sv_t + hk * sv_h + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        # queries from the tile's first row to the end of the sequence; only the first TILE rows need the causal mask
        for m_start in range(r0, L, STEP):
            qr = m_start + tl.arange(0, STEP)
            qr_ok = qr < L
            q_mask = qr_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + (start + qr)[:, None] * sq_t + h * sq_h + d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + (start + qr)[:, None] * sdo_t + h * sdo_h + d[None, :], mask=q_mask, other=0.0)
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            # +inf lse on rows past the end: their p is exp2(-inf) = 0
            lse = tl.load(LSE + h * sl_h + start + qr, mask=qr_ok, other=float("inf"))
            delta = tl.load(DELTA + h * sl_h + start + qr, mask=qr_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [TILE keys, STEP queries]
            p_t = tl.exp2(s_t - lse[None, :])
            if m_start < diag_end:
                p_t = tl.where(kr[:, None] <= qr[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(DK + (start + kr)[:, None] * sdk_t + hk * sdk_h + d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + (start + kr)[:, None] * sdv_t + hk * sdv_h + d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)

    # ---- part 2: dQ of the tile's rows as queries, for each of the g query heads
    qr = r0 + tl.arange(0, TILE)
    qr_ok = qr < L
    q_mask = qr_ok[:, None] & d_ok[None, :]
    k_base = K + start * sk_t + hk * sk_h
    v_base = V + start * sv_t + hk * sv_h
    for g in range(GROUP):
        h = hk * GROUP + g
        q = tl.load(Q + (start + qr)[:, None] * sq_t + h * sq_h + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (start + qr)[:, None] * sdo_t + h * sdo_h + d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE + h * sl_h + start + qr, mask=qr_ok, other=float("inf"))
        delta = tl.load(DELTA + h * sl_h + start + qr, mask=qr_ok, other=0.0)
        dq = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, diag_end, STEP):  # keys before the tile need no mask; the diagonal ones do
            cols = n0 + tl.arange(0, STEP)
            col_ok = cols < L
            kc = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            vc = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                kc, vc = kc.to(tl.float32), vc.to(tl.float32)
            s = tl.dot(q, tl.trans(kc), input_precision=DOT_PREC) * qk_scale  # [TILE queries, STEP keys]
            p = tl.exp2(s - lse[:, None])
            if n0 >= r0:
                p = tl.where((cols[None, :] <= qr[:, None]) & col_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(vc), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kc.dtype), kc, input_precision=DOT_PREC)
        tl.store(DQ + (start + qr)[:, None] * sdq_t + h * sdq_h + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=q_mask)


# ----------------------------------------------------------------------------------------------------------
# launchers and the autograd Function


def _check(q, k, v, cu_seqlens):
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape, \
        f"q [T, Hq, D], k and v [T, Hkv, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    assert q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], "q, k, v must share T and head_dim"
    assert q.shape[1] % k.shape[1] == 0, f"GQA needs Hq ({q.shape[1]}) divisible by Hkv ({k.shape[1]})"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64), \
        f"q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    assert cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and not cu_seqlens.is_floating_point(), \
        "cu_seqlens must be an integer vector [S + 1] (0, L_0, L_0 + L_1, ..., T)"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, cu, tiles, scale, cfg):
    T, Hq, D = q.shape
    out = torch.empty(T, Hq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    n_tiles = tiles.shape[1]
    LAUNCHES["varlen_fwd"] += 1
    _fwd_kernel[(n_tiles, Hq)](
        q, k, v, out, lse, cu, tiles, cu.numel() - 1, n_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), scale * LOG2E,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), **_dot_args(q), **cfg)
    return out, lse


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, fwd_tiles, bwd_tiles, scale, fwd_cfg, bwd_cfg):
        out, lse = _forward(q, k, v, cu, fwd_tiles, scale, fwd_cfg)
        ctx.save_for_backward(q, k, v, out, lse, cu, bwd_tiles)
        ctx.scale, ctx.bwd_cfg = scale, bwd_cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, tiles = ctx.saved_tensors
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        dout = _last_dim_contiguous(dout)
        block_d = max(16, triton.next_power_of_2(D))
        delta = torch.empty_like(lse)
        LAUNCHES["varlen_bwd_preprocess"] += 1
        _bwd_preprocess[(triton.cdiv(T, _PRE_BLOCK), Hq)](
            out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK=_PRE_BLOCK)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n_tiles = tiles.shape[1]
        LAUNCHES["varlen_bwd"] += 1
        _bwd_kernel[(n_tiles, Hkv)](
            q, k, v, dout, lse, delta, dq, dk, dv, cu, tiles, cu.numel() - 1, n_tiles,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0),
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            ctx.scale, ctx.scale * LOG2E,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, **_dot_args(q), **ctx.bwd_cfg)
        return dq, dk, dv, None, None, None, None, None, None


class VarlenTiles:
    """The tile maps of one packed row (T tokens) for the forward and backward tile sizes of this device and head
    size; build once per micro-batch, share across layers."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, head_dim: int):
        fwd, bwd = _configs(cu_seqlens.is_cuda, head_dim)
        self.fwd_cfg, self.bwd_cfg, self.head_dim = fwd, bwd, head_dim
        self.fwd = varlen_tiles(cu_seqlens, total, fwd["TILE"])
        self.bwd = self.fwd if bwd["TILE"] == fwd["TILE"] else varlen_tiles(cu_seqlens, total, bwd["TILE"])


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float | None = None, tiles: VarlenTiles | None = None) -> torch.Tensor:
    """The Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1). `tiles`: VarlenTiles(cu_seqlens, T, D),
    built here when not given."""
    _check(q, k, v, cu_seqlens)
    assert q.dtype != torch.float64, "the Triton path takes bf16 / fp16 / fp32; float64 is the reference's"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    cu = cu_seqlens.to(torch.int32)
    if tiles is None:
        tiles = VarlenTiles(cu, q.shape[0], q.shape[-1])
    assert tiles.head_dim == q.shape[-1] and tiles.fwd.device == q.device, "tiles built for another head size/device"
    return _VarlenAttention.apply(q, k, v, cu, tiles.fwd, tiles.bwd, scale, tiles.fwd_cfg, tiles.bwd_cfg)


def varlen_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float | None = None, tiles: VarlenTiles | None = None) -> torch.Tensor:
    """Reference: per-sequence causal attention, softmax in fp32 (float64 inputs: float64 throughout), plain autograd.
    `tiles` is ignored (same signature as the kernel). Reads cu_seqlens on the host."""
    _check(q, k, v, cu_seqlens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    group = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs = q[a:b].transpose(0, 1).to(acc)  # (Hq, L, D)
        ks = k[a:b].transpose(0, 1).to(acc).repeat_interleave(group, 0)  # (Hq, L, D): kv head h // g
        vs = v[a:b].transpose(0, 1).to(acc).repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale  # (Hq, L, L)
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append((probs @ vs).transpose(0, 1))  # (L, Hq, D)
    return torch.cat(outs).to(q.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float | None = None, tiles: VarlenTiles | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [S+1] -> [T, Hq, D].
    Triton on CUDA (or under TRITON_INTERPRET), else the reference; `kernels.set_backend` forces either."""
    if q.dtype != torch.float64 and use_triton(q, k, v):
        return varlen_attention_triton(q, k, v, cu_seqlens, scale, tiles)
    return varlen_attention_torch(q, k, v, cu_seqlens, scale, tiles)
