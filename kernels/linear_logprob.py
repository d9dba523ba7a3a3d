"""Kernel A': the lm_head fused with the log-prob / entropy of kernel A; the [N, V] logits never exist.

    linear_token_logprobs(hidden [N, H], weight [V, H], targets [N], temperature=1.0, with_entropy=False,
                          valid_vocab=None) -> (logp [N] fp32, entropy [N] fp32 | None)
    differentiable w.r.t. hidden and weight; logits = hidden @ weight.T, then exactly kernel A's math.

Design (Triton path). Compute-bound: the floor is the lm_head GEMMs (2·N·V·H flops each).
- Forward = one GEMM with a softmax epilogue. A program owns BLOCK_N rows and TILES consecutive
  BLOCK_V-wide vocab tiles (a "group"); per tile it forms the fp32 logits tile with tl.dot over H,
  folds it into running per-row (max m, Σ exp, Σ exp·shift) statistics exactly as kernel A does
  (online logsumexp, max kept in raw units so logits of size 1e4 lose nothing), and picks out the
  target logit if the target falls in the tile (one tile per row does: a plain store, no atomics;
  tiles holding none of their rows' targets skip that step).
  It writes its group's three partials per row; a tiny combine kernel merges the G groups of a
  row in a fixed order. Program order is grouped (GROUP_M row blocks at a time) so concurrent
  programs share hidden and weight tiles in L2.
- Backward, per vocab chunk of C columns (C chosen so the chunk buffer is ~512 MiB):
    1. a Triton GEMM recomputes the logits tile and writes dlogits = dz / T (kernel A's formula) into
       a [N, C] buffer in the input dtype;
    2. dH (fp32 [N, H], carried across chunks) += dlogits @ W[chunk] — a Triton GEMM that loads its
       fp32 output tile, continues the K loop and stores it: each tile has one owner, so no atomics;
    3. dW[chunk] = dlogits^T @ hidden — one cuBLAS GEMM over all N (fp32 accumulation inside).
  That is 3 GEMMs backward + 1 forward. 4 GEMMs is the floor for any method that returns logp and
  learns the loss gradient only afterwards within less memory than the logits: the backward needs
  every p_ij again (recompute = 1 GEMM) and dH, dW are one GEMM each.

Invariants
- fp32 accumulation: logits tiles, softmax statistics, dH across chunks; dW inside the GEMM.
- Memory: forward 3 fp32 partials per row and vocab group (58 MiB at N=16,384, V=151,936); backward
  one [N, C] dlogits chunk + fp32 dH [N, H], besides the dH and dW it returns.
- Deterministic: no atomics. Every tile shape is a constant per device kind, never a function of N,
  so a row's logp depends only on that row (bitwise equal for any N and with/without entropy or
  grad). dH is also independent of the chunk width C (chunks start at multiples of BLOCK_K and dH
  keeps accumulating in fp32 memory, so the sequence of fp32 adds is the same).
- Columns >= valid_vocab take no part; their rows of dW are zero.
- Targets must lie in [0, valid_vocab); a target outside gives logp = -inf (Triton path).
"""
import torch

from kernels.backend import tl, triton, use_triton

# Tile settings per device kind (constants: never derived from N, see the determinism invariant).
# GPU values are the usual Hopper/Ampere bf16 GEMM tile (128x128x64, 8 warps); the epilogue keeps the
# 128x128 fp32 accumulator plus a few temporaries in registers, which is why BLOCK_V is not 256.
_GPU_FWD = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, TILES=4, GROUP_M=8, num_warps=8, num_stages=3)
_GPU_DLOGITS = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_GPU_MATMUL = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# Under TRITON_INTERPRET (CPU) the cost is per operation (about a millisecond per op on a [16, 1024] tile,
# more per reduction or nested jit call), hardly per element: few wide vocab tiles keep the tests fast, and a
# vocabulary of a few thousand still spans several tiles and groups.
_CPU_FWD = dict(BLOCK_N=16, BLOCK_V=1024, BLOCK_K=64, TILES=2, GROUP_M=2)
_CPU_DLOGITS = dict(BLOCK_N=16, BLOCK_V=1024, BLOCK_K=64, GROUP_M=2)
_CPU_MATMUL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=1024, GROUP_M=2)
# Backward dlogits chunk: about this many bytes; its width is a multiple of _CHUNK_ALIGN columns.
_CHUNK_BYTES = 512 * 2**20
_CHUNK_ALIGN = 1024  # a multiple of every BLOCK_V and BLOCK_K above
# The PyTorch reference computes its logits in vocab chunks of this many columns (bounds its fp32 temporaries).
_TORCH_CHUNK = 4096


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Programs that run at the same time share GROUP_M row blocks and many column blocks, so their
    # operand tiles come from L2 rather than HBM (Triton matmul tutorial, "L2 cache optimizations").
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, K, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """fp32 acc[r, c] = Σ_k h[rows[r], k] · w[cols[c], k]; rows and cols must be in range (callers wrap them)."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BLOCK_K, BLOCK_V] = W^T tile
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(h_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong; bf16 -> fp32 is exact, products stay exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, pm_ptr, ps_ptr, pu_ptr, xt_ptr,
                N, K, VV, num_groups, stride_h, stride_w, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                WITH_ENTROPY: tl.constexpr):
    pid_m, pid_g = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_groups, GROUP_M)
    rows = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows % N  # wrapped rows compute duplicates that are never stored; loads need no row mask
    tgt = tl.load(tgt_ptr + rows)
    # Per-row running statistics in kernel A's form (see kernels/logprob.py): m = max logit (raw units),
    # s = Σ exp((x - m)/T), u = Σ exp((x - m)/T)·(x - m)/T; m starts at a finite sentinel.
    m = tl.full((BLOCK_N,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    for t in range(TILES):
        # A tile of the last group may lie wholly past valid_vocab: all -inf, it changes nothing (and
        # costs < 1 tile per row block, cheaper than a branch around the pipelined K loop).
        v0 = (pid_g * TILES + t) * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < VV
        acc = _logits_tile(h_ptr, w_ptr, rows, cols % VV, K, stride_h, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
        x = tl.where(col_ok[None, :], acc, float("-inf"))  # [BLOCK_N, BLOCK_V] raw logits
        # The one tile that holds a row's target stores that logit (no other program writes it). Most tiles
        # hold none of the block's targets (~BLOCK_N / #tiles do), so the branch skips this epilogue work.
        in_tile = row_ok & (tgt >= v0) & (tgt < v0 + BLOCK_V)
        if tl.max(in_tile.to(tl.int32), axis=0) > 0:
            x_t = tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
            tl.store(xt_ptr + rows, x_t, mask=in_tile)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp((m - m_new) * inv_temp)
        d = (x - m_new[:, None]) * inv_temp
        e = tl.exp(d)  # 0 on masked columns
        if WITH_ENTROPY:
            # rebase u from m to m_new (each old term gains (m - m_new)/T), then add this tile
            u = alpha * (u + (m - m_new) * inv_temp * s) + tl.sum(e * tl.where(col_ok[None, :], d, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = rows.to(tl.int64) * num_groups + pid_g  # partials are [N, G] row-major
    tl.store(pm_ptr + out, m, mask=row_ok)
    tl.store(ps_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(pu_ptr + out, u, mask=row_ok)


@triton.jit
def _combine_kernel(pm_ptr, ps_ptr, pu_ptr, xt_ptr, logp_ptr, ent_ptr, m_ptr, logs_ptr, G, inv_temp,
                    BLOCK_G: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # Merge a row's G group partials (fixed order, one block) with the same rebasing as the online update:
    #   m = max m_g,  a_g = exp((m_g - m)/T),  s = Σ a_g s_g,  u = Σ a_g (u_g + (m_g - m)/T · s_g).
    row = tl.program_id(0)
    grp = tl.arange(0, BLOCK_G)
    ok = grp < G
    base = row.to(tl.int64) * G
    m_g = tl.load(pm_ptr + base + grp, mask=ok, other=float("-inf"))
    s_g = tl.load(ps_ptr + base + grp, mask=ok, other=0.0)
    m = tl.max(m_g, axis=0)
    a_g = tl.exp((m_g - m) * inv_temp)  # 0 on masked lanes
    s = tl.sum(a_g * s_g, axis=0)
    log_s = tl.log(s)
    x_t = tl.load(xt_ptr + row)
    tl.store(logp_ptr + row, (x_t - m) * inv_temp - log_s)
    tl.store(m_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    if WITH_ENTROPY:
        u_g = tl.load(pu_ptr + base + grp, mask=ok, other=0.0)
        shift = tl.where(ok, (m_g - m) * inv_temp, 0.0)
        u = tl.sum(a_g * (u_g + shift * s_g), axis=0)
        tl.store(ent_ptr + row, log_s - u / s)  # H = log s - u/s (kernel A's docstring)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, logs_ptr, ent_ptr, g_ptr, gent_ptr, d_ptr,
                    N, K, VV, v_start, width, stride_h, stride_w, stride_d, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr):
    # d[:, j - v_start] = dz_j / T for vocab columns j in [v_start, v_start + width), with kernel A's
    #   dz_j = g (1[j = t] - p_j) - g_H p_j (log p_j + H)   (derivation in kernels/logprob.py)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(width, BLOCK_V), GROUP_M)
    rows = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows % N
    cols = v_start + pid_n * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_start + width  # chunks never extend past valid_vocab
    acc = _logits_tile(h_ptr, w_ptr, rows, tl.where(col_ok, cols, v_start), K, stride_h, stride_w,
                       BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
    m = tl.load(m_ptr + rows)
    log_s = tl.load(logs_ptr + rows)
    g = tl.load(g_ptr + rows)
    tgt = tl.load(tgt_ptr + rows)
    log_p = (acc - m[:, None]) * inv_temp - log_s[:, None]  # shifted form: exact difference first
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        g_ent = tl.load(gent_ptr + rows)
        ent = tl.load(ent_ptr + rows)
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])
    d_ptrs = d_ptr + rows.to(tl.int64)[:, None] * stride_d + (cols - v_start)[None, :]
    tl.store(d_ptrs, (dz * inv_temp).to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _matmul_acc_kernel(a_ptr, b_ptr, c_ptr, M, Nc, K, stride_a, stride_b, stride_c,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # c[M, Nc] (fp32, in place) += a[M, K] @ b[K, Nc]. The K loop continues from the stored fp32 values,
    # so splitting K into calls at multiples of BLOCK_K gives bitwise the same c as one call.
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Nc, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_c + rn[None, :]
    c_mask = (rm < M)[:, None] & (rn < Nc)[None, :]
    acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_b + (rn % Nc)[None, :]
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    tl.store(c_ptrs, acc, mask=c_mask)


def _dot_args(x: torch.Tensor) -> dict:
    # fp32 inputs: exact fp32 products ("ieee", not TF32) so fp32 results match an fp64 reference closely.
    # On CPU the kernels run in Triton's interpreter, whose bf16 tl.dot is broken: upcast there (exact).
    return dict(UPCAST=(not x.is_cuda) and x.dtype != torch.float32,
                DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")


def _check(hidden, weight, targets, temperature, valid_vocab) -> int:
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], \
        f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
    assert hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"hidden and weight must share a float dtype, got {hidden.dtype} and {weight.dtype}"
    assert targets.shape == hidden.shape[:1], f"targets {tuple(targets.shape)} vs hidden {tuple(hidden.shape)}"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    V = weight.shape[0]
    valid_vocab = V if valid_vocab is None else int(valid_vocab)
    assert 1 <= valid_vocab <= V, f"valid_vocab must be in [1, {V}], got {valid_vocab}"
    return valid_vocab


def _chunk_width(N: int, valid_vocab: int, elem_bytes: int) -> int:
    """Backward vocab chunk: the [N, C] dlogits buffer stays near _CHUNK_BYTES (C a multiple of _CHUNK_ALIGN)."""
    c = max(_CHUNK_ALIGN, _CHUNK_BYTES // max(1, N * elem_bytes) // _CHUNK_ALIGN * _CHUNK_ALIGN)
    return min(c, triton.cdiv(valid_vocab, _CHUNK_ALIGN) * _CHUNK_ALIGN)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, valid_vocab):
        hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
        weight = weight if weight.stride(1) == 1 else weight.contiguous()
        targets = targets.contiguous()
        N, K = hidden.shape
        inv_temp = 1.0 / temperature
        f32 = dict(device=hidden.device, dtype=torch.float32)
        logp, m, log_s = (torch.empty(N, **f32) for _ in range(3))
        ent = torch.empty(N, **f32) if with_entropy else logp  # dummy pointer when unused
        if N > 0:
            cfg = dict(_GPU_FWD if hidden.is_cuda else _CPU_FWD)
            G = triton.cdiv(valid_vocab, cfg["BLOCK_V"] * cfg["TILES"])  # vocab groups, one program each per row block
            pm, ps = torch.empty(N, G, **f32), torch.empty(N, G, **f32)
            pu = torch.empty(N, G, **f32) if with_entropy else pm
            x_t = torch.full((N,), float("-inf"), **f32)  # stays -inf for a target outside [0, valid_vocab)
            grid = (triton.cdiv(N, cfg["BLOCK_N"]) * G,)
            _fwd_kernel[grid](hidden, weight, targets, pm, ps, pu, x_t, N, K, valid_vocab, G,
                              hidden.stride(0), weight.stride(0), inv_temp,
                              EVEN_K=K % cfg["BLOCK_K"] == 0, WITH_ENTROPY=with_entropy, **_dot_args(hidden), **cfg)
            _combine_kernel[(N,)](pm, ps, pu, x_t, logp, ent, m, log_s, G, inv_temp,
                                  BLOCK_G=max(16, triton.next_power_of_2(G)), WITH_ENTROPY=with_entropy)
        ctx.save_for_backward(hidden, weight, targets, m, log_s, *([ent] if with_entropy else []))
        ctx.inv_temp, ctx.with_entropy, ctx.valid_vocab = inv_temp, with_entropy, valid_vocab
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, m, log_s, *rest = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, K = hidden.shape
        VV = ctx.valid_vocab
        dh32 = torch.zeros(N, K, device=hidden.device, dtype=torch.float32) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None  # rows >= valid_vocab stay zero
        if N > 0 and (need_dh or need_dw):
            g_logp = g_logp.float().contiguous()
            if ctx.with_entropy:
                ent, g_ent = rest[0], g_ent.float().contiguous()
            else:
                ent = g_ent = g_logp  # dummies, not read
            on_gpu = hidden.is_cuda
            dcfg = dict(_GPU_DLOGITS if on_gpu else _CPU_DLOGITS)
            mcfg = dict(_GPU_MATMUL if on_gpu else _CPU_MATMUL)
            dot = _dot_args(hidden)
            # Triton's CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): there the
            # chunk is written in fp32 and rounded by torch, so CPU tests see the GPU's numerics.
            round_on_host = not on_gpu and hidden.dtype != torch.float32
            C = _chunk_width(N, VV, hidden.element_size())
            chunk = torch.empty(N, C, device=hidden.device, dtype=torch.float32 if round_on_host else hidden.dtype)
            for v0 in range(0, VV, C):
                c = min(C, VV - v0)
                grid = (triton.cdiv(N, dcfg["BLOCK_N"]) * triton.cdiv(c, dcfg["BLOCK_V"]),)
                _dlogits_kernel[grid](hidden, weight, targets, m, log_s, ent, g_logp, g_ent, chunk,
                                      N, K, VV, v0, c, hidden.stride(0), weight.stride(0), chunk.stride(0),
                                      ctx.inv_temp, EVEN_K=K % dcfg["BLOCK_K"] == 0,
                                      WITH_ENTROPY=ctx.with_entropy, **dot, **dcfg)
                d = (chunk.to(hidden.dtype) if round_on_host else chunk)[:, :c]  # dlogits [N, c]
                w_c = weight[v0:v0 + c]  # [c, H]
                if need_dh:  # dH += d @ W[chunk], fp32 accumulator carried across chunks
                    grid = (triton.cdiv(N, mcfg["BLOCK_M"]) * triton.cdiv(K, mcfg["BLOCK_N"]),)
                    _matmul_acc_kernel[grid](d, w_c, dh32, N, K, c, d.stride(0), w_c.stride(0), dh32.stride(0),
                                             EVEN_K=c % mcfg["BLOCK_K"] == 0, **dot, **mcfg)
                if need_dw:  # dW[chunk] = d^T @ hidden: one GEMM over all N, fp32 accumulation inside
                    torch.mm(d.t(), hidden, out=dw[v0:v0 + c])
        dh = dh32.to(hidden.dtype) if need_dh else None
        return dh, dw, None, None, None, None


class _LinearTokenLogprobsTorch(torch.autograd.Function):
    """The same algorithm in plain PyTorch, fp32, vocab-chunked (never all logits at once)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, valid_vocab):
        h = hidden.float()
        lse_c, negent_c = [], []  # per chunk: logsumexp, and Σ q (z - lse_c) with q the chunk's softmax
        for v0 in range(0, valid_vocab, _TORCH_CHUNK):
            z = h @ weight[v0:min(v0 + _TORCH_CHUNK, valid_vocab)].float().T / temperature  # [N, chunk]
            lse = torch.logsumexp(z, dim=-1)
            lse_c.append(lse)
            if with_entropy:
                log_q = z - lse[:, None]
                negent_c.append((log_q.exp() * log_q).sum(-1))
        lse_c = torch.stack(lse_c, dim=1)  # [N, chunks]
        lse = torch.logsumexp(lse_c, dim=1)
        z_t = (h * weight[targets].float()).sum(-1) / temperature
        logp = z_t - lse
        ent = None
        if with_entropy:
            # p_j = w_c q_j with w_c = exp(lse_c - lse):  H = -Σ_c w_c (Σ_j q_j (z_j - lse_c) + lse_c - lse)
            w = (lse_c - lse[:, None]).exp()
            ent = -(w * (torch.stack(negent_c, dim=1) + lse_c - lse[:, None])).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse, *([ent] if with_entropy else []))
        ctx.temperature, ctx.with_entropy, ctx.valid_vocab = temperature, with_entropy, valid_vocab
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        T, VV = ctx.temperature, ctx.valid_vocab
        h = hidden.float()
        dh = torch.zeros_like(h)
        dw = torch.zeros_like(weight)
        rows = torch.arange(h.shape[0], device=h.device)
        for v0 in range(0, VV, _TORCH_CHUNK):
            w_c = weight[v0:min(v0 + _TORCH_CHUNK, VV)].float()
            log_p = h @ w_c.T / T - lse[:, None]  # [N, chunk]
            p = log_p.exp()
            dz = -g_logp[:, None] * p  # kernel A's formula, see kernels/logprob.py
            here = (targets >= v0) & (targets < v0 + w_c.shape[0])
            dz[rows[here], targets[here] - v0] += g_logp[here]
            if ctx.with_entropy:
                dz -= g_ent[:, None] * p * (log_p + rest[0][:, None])
            dz /= T
            dh += dz @ w_c
            dw[v0:v0 + w_c.shape[0]] = (dz.T @ h).to(weight.dtype)
        return dh.to(hidden.dtype), dw, None, None, None, None


def linear_token_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 temperature: float = 1.0, with_entropy: bool = False,
                                 valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of `linear_token_logprobs` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    valid_vocab = _check(hidden, weight, targets, temperature, valid_vocab)
    out = _LinearTokenLogprobs.apply(hidden, weight, targets, float(temperature), bool(with_entropy), valid_vocab)
    return out if with_entropy else (out, None)


def linear_token_logprobs_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                temperature: float = 1.0, with_entropy: bool = False,
                                valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch reference: fp32 matmuls per vocab chunk (slow on GPU: no bf16 tensor cores), same outputs."""
    valid_vocab = _check(hidden, weight, targets, temperature, valid_vocab)
    out = _LinearTokenLogprobsTorch.apply(hidden, weight, targets, float(temperature), bool(with_entropy),
                                          valid_vocab)
    return out if with_entropy else (out, None)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log p(target) (and entropy) of softmax(hidden @ weight.T / temperature) over the first valid_vocab
    vocabulary rows, without materialising the logits. hidden [N, H], weight [V, H] (same dtype), targets [N]
    -> (logp [N] fp32, entropy [N] fp32 or None); differentiable w.r.t. hidden and weight.
    Pass only the rows that need a log-prob (response tokens). Dispatches via kernels.backend."""
    if use_triton(hidden, weight):
        return linear_token_logprobs_triton(hidden, weight, targets, temperature, with_entropy, valid_vocab)
    return linear_token_logprobs_torch(hidden, weight, targets, temperature, with_entropy, valid_vocab)
