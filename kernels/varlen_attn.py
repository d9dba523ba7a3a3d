"""Causal attention over packed variable-length sequences (cu_seqlens), forward and backward, in Triton.

    varlen_attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [S+1] int32, scale=None, tiles=None)
        -> out [T, Hq, D]                                         differentiable w.r.t. q, k, v

The T rows hold S sequences back to back: sequence s is rows cu_seqlens[s] .. cu_seqlens[s+1]-1, and row i of a
sequence attends to rows 0..i of the same sequence only (causal, restarting at each sequence). Hq = g * Hkv (GQA:
query head h reads kv head h // g, as Hugging Face's repeat_interleave). Any head size D (64 and 128 are the tuned
ones; others are padded to a power of two inside the kernel). bf16 / fp16 / fp32 inputs, fp32 accumulation.

Why a kernel: a training micro-batch packs tens of sequences of 10-1,200 tokens into one 16k-token row. One SDPA
call per sequence is tens of launches per layer (CPU-bound), a block-diagonal mask costs T^2, and right-padding
wastes what the longest sequence imposes on all others. Here every layer is 1 launch forward and 2 backward,
whatever the spread of lengths, and the work is sum_s L_s^2 / 2 (the causal FLOP floor) up to tile rounding.

Design: per-sequence tiles (FlashAttention-2, Dao 2023).
  - The grid is (tile, head). A *tile* is TILE consecutive rows of ONE sequence: sequence s owns ceil(L_s / TILE)
    tiles, listed in order in a small map (tile -> (sequence, first row)) built ON THE DEVICE from cu_seqlens
    (`varlen_tiles`: a few tiny torch ops, no host sync; the model builds it once per forward and shares it across
    layers). The grid size is the bound cdiv(T, TILE) + S (T and S are shapes, known on the host); the programs past
    the real tile count return at once. Tiles never straddle two sequences, so a tile's key range is one contiguous
    run [0, row] of its own sequence and no work is spent on keys of another sequence.
    (Alternative considered: q-blocks of the packed row with a seq-id mask; a block straddling k sequences scans the
    union of their key ranges, wasted work that grows with the number of short sequences.)
  - Forward, program (tile, q head): online softmax over the key blocks 0 .. the tile's last row of its sequence,
    causal mask on every block. Writes out and the log-sum-exp (fp32, base-2 units of the scaled scores).
  - Backward = 2 launches, no atomics. With P = softmax(scale * Q K^T) (causal), dP = dO V^T, Delta = rowsum(O * dO):
        dV = P^T dO,   dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q        (FA-2, Alg. 2)
    P is recomputed from Q, K and the saved log-sum-exp; nothing of size T^2 is stored.
      1. `_bwd_preprocess`: Delta_i = sum_d out_id * dout_id (fp32), per row and q head.
      2. `_bwd_kernel`, grid (tile, Hkv + Hq). Programs (tile, j < Hkv): dK, dV of the tile's rows as KEYS of kv
         head j, accumulated in registers over the g query heads of the group and every query block from the tile
         on (so GQA needs no reduction over heads afterwards). Programs (tile, Hkv + h): dQ of the tile's rows as
         QUERIES of head h, over the key blocks up to the tile. Each output element has exactly one owner summing in
         a fixed order: bitwise deterministic, no fp32 dQ buffer in memory. The heavy dK/dV programs come first in
         launch order (grid dim 1 is the slower one), so the short dQ ones fill in behind them.
  - Registers (checked offline: Triton 3.9 for sm_90a, `ptxas -v` on the generated PTX): every offset is int32
    from per-sequence base pointers (the launcher checks they fit), and each program runs ONE loop over blocks
    (nested only in the dK/dV programs' loop over the g heads). Each of 64-bit offset tiles, a separate unmasked
    loop for the blocks below the diagonal, and dQ looping over the g heads inside the dK/dV program made the
    kernels spill. As configured in `_GPU`: 90-255 registers per thread, no spills (bf16/fp16/fp32, D 24-128).

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

# Tile settings per device kind. TILE rows of one sequence per program (forward: the query tile; backward: the key
# tile for dK/dV and the query tile for dQ); STEP rows per inner step (TILE % STEP == 0). Changing them changes low
# bits, never the determinism. GPU, keyed by (head dim <= 64 or <= 128, fp32 inputs): for bf16/fp16 the FA-2 tile
# shapes (128 x 64 forward; the backward holds dK and dV [TILE, D] fp32 in registers, hence 64), for fp32 (exact
# products without tensor cores, twice the bytes per tile) smaller ones: in each case the largest that compile
# without register spills for sm_90 (module docstring). Not yet timed: tune with benchmarks/bench_attention.py.
_GPU = {  # (head dim class, fp32) -> (forward, backward)
    (64, False): (dict(TILE=128, STEP=64, num_warps=8, num_stages=3),
                  dict(TILE=64, STEP=64, num_warps=4, num_stages=2)),
    (128, False): (dict(TILE=128, STEP=64, num_warps=8, num_stages=3),
                   dict(TILE=64, STEP=32, num_warps=8, num_stages=2)),
    (64, True): (dict(TILE=32, STEP=32, num_warps=4, num_stages=2),
                 dict(TILE=32, STEP=32, num_warps=8, num_stages=2)),
    (128, True): (dict(TILE=32, STEP=16, num_warps=8, num_stages=2),
                  dict(TILE=32, STEP=32, num_warps=8, num_stages=2)),
}
# Triton's interpreter (CPU tests): its cost is per operation, not per element, so tiles as large as the tests'
# sequences allow; a 500-token test sequence still spans 8 tiles, and TILE != STEP runs the multi-step diagonal.
_CPU_FWD = dict(TILE=64, STEP=32)
_CPU_BWD = dict(TILE=64, STEP=32)
_PRE_BLOCK = 64  # rows per program of the delta preprocess

LAUNCHES: Counter = Counter()  # kernel name -> launches since the last clear(); read by tests and the benchmark


def _configs(on_cuda: bool, head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    if not on_cuda:
        return dict(_CPU_FWD), dict(_CPU_BWD)
    fwd, bwd = _GPU[(64 if head_dim <= 64 else 128, dtype == torch.float32)]
    return dict(fwd), dict(bwd)


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


@triton.jit
def _rows_mask(ok, d_ok, EVEN_D: tl.constexpr):
    """[N, BLOCK_D] load/store mask from a row mask: rows only when BLOCK_D == HEAD_DIM (keeps 16-byte vector
    accesses), else rows and the padded head dims."""
    if EVEN_D:
        return tl.broadcast_to(ok[:, None], (ok.shape[0], d_ok.shape[0]))
    return ok[:, None] & d_ok[None, :]


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
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    hk = h // GROUP
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    # int32 offsets from per-sequence base pointers (the launcher checks they fit): 64-bit offset tiles cost the
    # registers that made the first version spill
    q_base = Q + start * sq_t + h * sq_h
    k_base = K + start * sk_t + hk * sk_h
    v_base = V + start * sv_t + hk * sv_h

    rows = m0 + tl.arange(0, TILE)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_base + rows[:, None] * sq_t + d[None, :], mask=_rows_mask(row_ok, d_ok, EVEN_D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.zeros([TILE], dtype=tl.float32) - float("inf")  # running max (base-2 units)
    l_i = tl.zeros([TILE], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    # keys 0 .. the tile's last row; the causal mask on every block (only the diagonal ones need it, but one loop
    # holds fewer registers than two). Key 0 <= every row keeps every row's max finite.
    for n0 in range(0, tl.minimum(m0 + TILE, L), STEP):
        cols = n0 + tl.arange(0, STEP)
        col_ok = cols < L
        kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [TILE, STEP]
        s = tl.where((cols[None, :] <= rows[:, None]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + start * so_t + h * so_h + rows[:, None] * so_t + d[None, :], out.to(O.dtype.element_ty),
             mask=_rows_mask(row_ok, d_ok, EVEN_D))
    tl.store(LSE + h * sl_h + start + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["T", "sl_h"])
def _bwd_preprocess(O, DO, DELTA, T, so_t, so_h, sdo_t, sdo_h, sl_h,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, i] = sum_d O[i, h, d] * dO[i, h, d] in fp32 (FA-2's D_i)."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(O + h * so_h + rows[:, None] * so_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + h * sdo_h + rows[:, None] * sdo_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * sl_h + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit(do_not_specialize=["n_seqs", "n_tiles", "sl_h"])
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU, TILES, n_seqs, n_tiles, n_kv,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sl_h,
                sdq_t, sdq_h, sdk_t, sdk_h, sdv_t, sdv_h,
                scale, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                TILE: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)  # 0 .. Hkv-1: dK, dV of kv head `head`; Hkv .. Hkv+Hq-1: dQ of q head `head - Hkv`
    seq = tl.load(TILES + tile)
    if seq >= n_seqs:
        return
    r0 = tl.load(TILES + n_tiles + tile)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rr = r0 + tl.arange(0, TILE)  # the tile's rows, within the sequence
    rr_ok = rr < L
    rr_mask = _rows_mask(rr_ok, d_ok, EVEN_D)
    q_seq = Q + start * sq_t  # per-sequence base pointers, int32 offsets (as in the forward)
    do_seq = DO + start * sdo_t
    lse_seq = LSE + start
    delta_seq = DELTA + start
    if head < n_kv:
        # dK, dV of the tile's rows as keys, summed over the g query heads of this kv head and over the queries
        # that see them (the tile's first row to the end of the sequence)
        hk = head
        k = tl.load(K + start * sk_t + hk * sk_h + rr[:, None] * sk_t + d[None, :], mask=rr_mask, other=0.0)
        v = tl.load(V + start * sv_t + hk * sv_h + rr[:, None] * sv_t + d[None, :], mask=rr_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        dk = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            for m_start in range(r0, L, STEP):
                qr = m_start + tl.arange(0, STEP)
                qr_ok = qr < L
                q_mask = _rows_mask(qr_ok, d_ok, EVEN_D)
                q = tl.load(q_seq + h * sq_h + qr[:, None] * sq_t + d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_seq + h * sdo_h + qr[:, None] * sdo_t + d[None, :], mask=q_mask, other=0.0)
                if UPCAST:
                    q, do = q.to(tl.float32), do.to(tl.float32)
                # +inf lse on rows past the end: their p is exp2(-inf) = 0
                lse = tl.load(lse_seq + h * sl_h + qr, mask=qr_ok, other=float("inf"))
                delta = tl.load(delta_seq + h * sl_h + qr, mask=qr_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [TILE keys, STEP queries]
                p_t = tl.where(rr[:, None] <= qr[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        tl.store(DK + start * sdk_t + hk * sdk_h + rr[:, None] * sdk_t + d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=rr_mask)
        tl.store(DV + start * sdv_t + hk * sdv_h + rr[:, None] * sdv_t + d[None, :], dv.to(DV.dtype.element_ty),
                 mask=rr_mask)
    else:
        # dQ of the tile's rows as queries, for one query head, over keys 0 .. the tile's last row
        h = head - n_kv
        hk = h // GROUP
        k_base = K + start * sk_t + hk * sk_h
        v_base = V + start * sv_t + hk * sv_h
        q = tl.load(q_seq + h * sq_h + rr[:, None] * sq_t + d[None, :], mask=rr_mask, other=0.0)
        do = tl.load(do_seq + h * sdo_h + rr[:, None] * sdo_t + d[None, :], mask=rr_mask, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(lse_seq + h * sl_h + rr, mask=rr_ok, other=float("inf"))
        delta = tl.load(delta_seq + h * sl_h + rr, mask=rr_ok, other=0.0)
        dq = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, tl.minimum(r0 + TILE, L), STEP):
            cols = n0 + tl.arange(0, STEP)
            col_ok = cols < L
            kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
            kc = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)
            vc = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                kc, vc = kc.to(tl.float32), vc.to(tl.float32)
            s = tl.dot(q, tl.trans(kc), input_precision=DOT_PREC) * qk_scale  # [TILE queries, STEP keys]
            p = tl.where((cols[None, :] <= rr[:, None]) & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vc), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kc.dtype), kc, input_precision=DOT_PREC)
        tl.store(DQ + start * sdq_t + h * sdq_h + rr[:, None] * sdq_t + d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=rr_mask)


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


def _check_int32_offsets(*tensors: torch.Tensor) -> None:
    """The kernels address [T, H, D] tensors with int32 offsets (fewer registers than int64: no spills)."""
    for x in tensors:
        last = sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
        if last >= 2**31:
            raise ValueError(f"varlen_attention: a [T, H, D] = {tuple(x.shape)} tensor with strides {x.stride()} "
                             f"spans {last + 1} elements, past the kernels' int32 offsets; split the micro-batch")


def _forward(q, k, v, cu, tiles, scale, cfg):
    T, Hq, D = q.shape
    out = torch.empty(T, Hq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    _check_int32_offsets(q, k, v, out, lse)
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
        _check_int32_offsets(dout, dq, dk, dv)
        _bwd_kernel[(n_tiles, Hkv + Hq)](  # (tile, j): j < Hkv dK/dV of kv head j, else dQ of q head j - Hkv
            q, k, v, dout, lse, delta, dq, dk, dv, cu, tiles, cu.numel() - 1, n_tiles, Hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0),
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            ctx.scale, ctx.scale * LOG2E,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, **_dot_args(q), **ctx.bwd_cfg)
        return dq, dk, dv, None, None, None, None, None, None


class VarlenTiles:
    """The tile maps of one packed row (T tokens) for the forward and backward tile sizes of this device, head size
    and dtype; build once per micro-batch, share across layers."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, head_dim: int, dtype: torch.dtype):
        fwd, bwd = _configs(cu_seqlens.is_cuda, head_dim, dtype)
        self.fwd_cfg, self.bwd_cfg, self.key = fwd, bwd, (head_dim, dtype)
        self.fwd = varlen_tiles(cu_seqlens, total, fwd["TILE"])
        self.bwd = self.fwd if bwd["TILE"] == fwd["TILE"] else varlen_tiles(cu_seqlens, total, bwd["TILE"])


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float | None = None, tiles: VarlenTiles | None = None) -> torch.Tensor:
    """The Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1). `tiles`: VarlenTiles(cu_seqlens, T, D,
    dtype), built here when not given."""
    _check(q, k, v, cu_seqlens)
    assert q.dtype != torch.float64, "the Triton path takes bf16 / fp16 / fp32; float64 is the reference's"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    cu = cu_seqlens.to(torch.int32)
    if tiles is None:
        tiles = VarlenTiles(cu, q.shape[0], q.shape[-1], q.dtype)
    assert tiles.key == (q.shape[-1], q.dtype) and tiles.fwd.device == q.device, \
        f"tiles built for {tiles.key} on {tiles.fwd.device}, not {(q.shape[-1], q.dtype)} on {q.device}"
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
