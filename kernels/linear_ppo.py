"""A' + B fused: lm_head, log-prob (kernel A) and the PPO loss (kernel B) in one pass of 3 GEMMs.

BENCHMARK-ONLY: training does not call this module. memrl/algo.py runs A' (linear_token_logprobs, for
the training and the scoring log-probs) then B (ppo_loss): 4 lm_head GEMMs. This path is the measured
3-GEMM floor of that step (kernels/bench.py), tested against A' + B; it takes no pg_weight (rollout
correction's IS weight) and its logp differ from A''s by the bf16 rounding of the logits (below), so
using it in train.py would change the run's numbers. kernels/README.md says what wiring it in takes.

    linear_ppo_loss(hidden [N, H], weight [V, H], targets [N], advantages [N], mask [N], num_tokens,
                    old_logp=None, ref_logp=None, temperature=1.0, *, eps_low, eps_high, clip_c, kl_type,
                    kl_coef=0.0, valid_vocab=None, with_entropy=False)
        -> (loss 0-dim fp32, metrics {pg_clipfrac, pg_clipfrac_lower, ppo_kl, kl}, logp [N] fp32 detached,
            entropy [N] fp32 detached | None)
    loss is differentiable w.r.t. hidden and weight (only); it equals
        ppo_loss(token_logprobs(hidden @ weight.T, targets, temperature, valid_vocab=valid_vocab)[0], ...)
    with the logits rounded to the input dtype, as an unfused bf16 lm_head produces them.

Why a separate path. `linear_token_logprobs` (A') returns logp and learns dloss/dlogp only in its
backward, so it must see every logit twice: 4 lm_head GEMMs (forward logits; backward recompute, dH,
dW). But dloss/dlogp_t is an elementwise function of (logp_t, old_t, ref_t, A_t, m_t, num_tokens)
(DESIGN.md §5): it is known as soon as a row's logp is. So the gradient can be formed in the forward,
while the row's logits are still in memory, and the recompute GEMM disappears: 3 GEMMs, the floor.

Algorithm (Triton path), over row chunks of C rows (C from a byte budget, see _chunk_rows; a
constant for a given V and dtype, never a function of N):
    logits_c = hidden_c @ W[:VV]^T                      GEMM 1 (cuBLAS, input dtype out: the [C, VV] buffer)
    logp_c, entropy_c, m_c, log s_c = kernel A forward on logits_c          (kernels/logprob.py)
    g_c = dloss/dlogp_c for d(loss) = 1                 kernel B's backward kernel (kernels/ppo_loss.py)
    logits_c <- dlogits_c                               kernel A backward, IN PLACE over the buffer
    dH_c  = dlogits_c @ W[:VV]                          GEMM 2 (cuBLAS, into dH's rows)
    dW32 += dlogits_c^T @ hidden_c                      GEMM 3 (fp32 accumulator [VV, H], see _dw_accumulate)
then loss and metrics = kernel B's forward kernel on the whole [N] logp (one launch, fixed order: the
same numbers as ppo_loss on that logp), and dW = dW32 in the weight dtype. The autograd Function's
forward stashes dH and dW; its backward only multiplies them by grad_output (in place).

Memory at N=16,384, H=1,536, V=151,936, bf16 (estimate; the bench measures it): logits chunk
C=2,048 rows × V × 2 B = 594 MiB, fp32 dW 890 MiB, dH 48 MiB, [N] vectors < 1 MiB: peak ≈ 1.50 GiB
during the loop; at the end dW32 + the bf16 dW (445 MiB) + dH ≈ 1.35 GiB; held until backward: dW +
dH = 0.48 GiB (what any lm_head backward returns).

Invariants and caveats
- Only hidden and weight get gradients; old_logp, ref_logp, advantages, mask, num_tokens are constants.
- logp and entropy are returned DETACHED (for logging and for the next step's old_logp); the entropy is
  a metric here, it takes no part in the loss. Scoring (no-grad logp) with the same numerics is
  `linear_token_logprobs_scoring` below; training scores with A' (`linear_token_logprobs`).
- Numerics differ from A' in one way: A' keeps fp32 logits tiles, this path rounds the logits to the
  input dtype (bf16) once, as `hidden @ weight.T` in eager PyTorch does; so logp here matches
  `token_logprobs(hidden @ weight.T, ...)`, and differs from A' by the bf16 rounding of the logits
  (≈ 2^-9 |logit|). With old_logp from A' the on-policy ratio is therefore 1 only to that precision;
  pass old_logp=None for an exactly-1 on-policy ratio.
- Deterministic: no atomics; fixed C, fixed chunk order, one-program loss reduction, so two calls on the
  same inputs are bitwise equal. A row's logp may depend on which chunk shape cuBLAS saw (last chunk),
  so it is not promised bitwise independent of N (A and A' are).
- Summing loss (and dH, dW) over micro-batches that share the global num_tokens gives one call's result.
- Columns >= valid_vocab take no part; their rows of dW are zero.
"""
import importlib

import torch

from kernels.backend import tl, triton, use_triton
from kernels.linear_logprob import _check as _check_linear
from kernels.linear_logprob import linear_token_logprobs_torch

# The modules themselves (kernels/__init__.py re-exports a *function* named ppo_loss, which shadows the
# submodule attribute, so `import kernels.ppo_loss as m` would give the function).
_A = importlib.import_module("kernels.logprob")
_B = importlib.import_module("kernels.ppo_loss")

# Row-chunk byte budget for the [C, VV] logits buffer (rounded down to a multiple of _ROW_ALIGN rows).
# At V = 151,936 bf16: C = 2,048 rows, 594 MiB. Tests force a small C through _FORCE_CHUNK_ROWS.
_CHUNK_BYTES = 640 * 2**20
_ROW_ALIGN = 256
_FORCE_CHUNK_ROWS: int | None = None
# GEMM 3 (dW32 += dlogits^T @ hidden): "auto" = cuBLAS with an fp32 output (torch.addmm(..., out_dtype=fp32),
# probed once per device) when it works, else the Triton kernel below; "triton" / "cublas" force one.
_DW_IMPL = "auto"
_GPU_DW = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_CPU_DW = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2)
_CUBLAS_F32_OK: dict = {}


@triton.jit
def _dw_acc_kernel(d_ptr, h_ptr, c_ptr, M, Nc, K, stride_d, stride_h, stride_c,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # c[M, Nc] (fp32, in place) += d[K, M]^T @ h[K, Nc]   (d = dlogits chunk [rows, vocab], h = hidden chunk)
    # Each c tile has one owner and continues from its stored fp32 value: no atomics, fixed order.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(Nc, BLOCK_N)
    width = GROUP_M * num_n  # grouped order: concurrent programs share operand tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_c + rn[None, :]
    c_mask = (rm < M)[:, None] & (rn < Nc)[None, :]
    acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    d_ptrs = d_ptr + offs_k.to(tl.int64)[:, None] * stride_d + (rm % M)[None, :]  # [BLOCK_K, BLOCK_M]
    h_ptrs = h_ptr + offs_k.to(tl.int64)[:, None] * stride_h + (rn % Nc)[None, :]  # [BLOCK_K, BLOCK_N]
    for k in range(0, K, BLOCK_K):
        a = tl.load(d_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        b = tl.load(h_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong; bf16 -> fp32 is exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
        d_ptrs += BLOCK_K * stride_d
        h_ptrs += BLOCK_K * stride_h
    tl.store(c_ptrs, acc, mask=c_mask)


def _cublas_f32_ok(device: torch.device) -> bool:
    """Whether torch.addmm(c32, a_bf16, b_bf16, out_dtype=fp32, out=c32) works here (torch >= 2.8 on CUDA)."""
    key = str(device)
    if key not in _CUBLAS_F32_OK:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(96, 40, generator=g, device=device).to(torch.bfloat16)
            b = torch.randn(96, 24, generator=g, device=device).to(torch.bfloat16)
            c = torch.randn(40, 24, generator=g, device=device)
            want = c.double() + a.double().t() @ b.double()
            torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
            ok = c.dtype == torch.float32 and bool(((c.double() - want).abs() < 1e-3).all())
        except Exception:  # noqa: BLE001 - any failure means "use the Triton kernel"
            ok = False
        _CUBLAS_F32_OK[key] = ok
    return _CUBLAS_F32_OK[key]


def _dw_accumulate(dw32: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> None:
    """dw32 [VV, H] fp32 += d[c, VV]^T @ h[c, H], fp32 accumulation across calls."""
    if d.dtype == torch.float32:  # fp32 inputs: plain fp32 GEMM (exact fp32, as the rest of the fp32 path)
        dw32.addmm_(d.t(), h)
        return
    impl = _DW_IMPL
    if impl == "auto":
        impl = "cublas" if d.is_cuda and _cublas_f32_ok(d.device) else "triton"
    if impl == "cublas":
        if d.is_cuda:
            torch.addmm(dw32, d.t(), h, out_dtype=torch.float32, out=dw32)
        else:  # CPU stand-in with the same numerics: bf16 products are exact in fp32
            dw32.addmm_(d.t().float(), h.float())
        return
    cfg = dict(_GPU_DW if d.is_cuda else _CPU_DW)
    M, Nc, K = dw32.shape[0], dw32.shape[1], d.shape[0]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(Nc, cfg["BLOCK_N"]),)
    _dw_acc_kernel[grid](d, h, dw32, M, Nc, K, d.stride(0), h.stride(0), dw32.stride(0),
                         UPCAST=not d.is_cuda, DOT_PREC="tf32", **cfg)


def _chunk_rows(valid_vocab: int, elem_bytes: int) -> int:
    """Rows per chunk: the [C, valid_vocab] logits buffer within _CHUNK_BYTES (a function of V and dtype only)."""
    if _FORCE_CHUNK_ROWS is not None:
        return int(_FORCE_CHUNK_ROWS)
    rows = _CHUNK_BYTES // (valid_vocab * elem_bytes)
    return max(_ROW_ALIGN, rows // _ROW_ALIGN * _ROW_ALIGN)


def _chunk_logits(hidden: torch.Tensor, r0: int, r1: int, w: torch.Tensor, buf: torch.Tensor,
                  pad: torch.Tensor | None) -> torch.Tensor:
    """GEMM 1 for rows [r0, r1) into buf[:r1-r0]. On the GPU the GEMM always has M = C rows (a short last chunk
    is zero-padded) so that cuBLAS picks the same kernel for every chunk: a row's logits, and so its logp, are
    then bitwise the same whatever N is and wherever the row sits (determinism across batch shapes)."""
    c = r1 - r0
    if pad is None or c == buf.shape[0]:
        torch.mm(hidden[r0:r1], w.t(), out=buf[:c])
    else:
        pad[:c].copy_(hidden[r0:r1])
        pad[c:].zero_()
        torch.mm(pad, w.t(), out=buf)
    return buf[:c]


class _LinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, advantages, mask, num_tokens, old_logp, ref_logp,
                temperature, eps_low, eps_high, clip_c, kl_coef, kl_type, valid_vocab, with_entropy,
                need_dh, need_dw):
        N, H = hidden.shape
        VV = valid_vocab
        dev = hidden.device
        f32 = dict(device=dev, dtype=torch.float32)
        inv_temp = 1.0 / temperature
        logp = torch.empty(N, **f32)
        ent = torch.empty(N, **f32) if with_entropy else None
        m_row, logs_row = torch.empty(N, **f32), torch.empty(N, **f32)
        need_grad = need_dh or need_dw
        dh = torch.zeros_like(hidden) if need_dh else None
        dw32 = torch.zeros(VV, H, **f32) if need_dw else None
        flags = dict(HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None, KL_TYPE=_B.KL_TYPES[kl_type])
        old_arg = old_logp if old_logp is not None else logp  # never-read placeholders
        ref_arg = ref_logp if ref_logp is not None else logp
        loss_params = (float(eps_low), float(eps_high), float(clip_c), float(kl_coef))
        w = weight[:VV]  # a prefix of rows: still contiguous
        if N > 0:
            on_gpu = hidden.is_cuda
            # Triton's CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): there kernel A's
            # backward writes an fp32 scratch and torch rounds it into the buffer (what the GPU does in place).
            round_on_host = not on_gpu and hidden.dtype != torch.float32
            C = min(_chunk_rows(VV, hidden.element_size()), N)
            buf = torch.empty(C, VV, device=dev, dtype=hidden.dtype)  # logits, then dlogits, of one chunk
            scratch = torch.empty(C, VV, **f32) if (round_on_host and need_grad) else None
            pad = torch.empty(C, H, device=dev, dtype=hidden.dtype) if on_gpu and N > C else None
            g = torch.empty(N, **f32)
            one = torch.ones((), **f32)
            fwd_cfg = _A._launch_config(buf, _A._GPU_FWD)
            bwd_cfg = _A._launch_config(buf, _A._GPU_BWD)
            out = None
            for r0 in range(0, N, C):
                r1 = min(r0 + C, N)
                c = r1 - r0
                h_c = hidden[r0:r1]
                x = _chunk_logits(hidden, r0, r1, w, buf, pad)  # GEMM 1
                ent_c = ent[r0:r1] if with_entropy else logp[r0:r1]
                _A._logprob_fwd_kernel[(c,)](x, targets[r0:r1], logp[r0:r1], ent_c, m_row[r0:r1], logs_row[r0:r1],
                                             x.stride(0), VV, inv_temp, WITH_ENTROPY=with_entropy, **fwd_cfg)
                if not need_grad:
                    continue
                sl = slice(r0, r1)
                _B._ppo_loss_bwd_kernel[(triton.cdiv(c, _B._BWD_BLOCK),)](
                    logp[sl], old_arg[sl], ref_arg[sl], advantages[sl], mask[sl], num_tokens, one, g[sl], c,
                    *loss_params, logp, **flags, BLOCK=_B._BWD_BLOCK, num_warps=_B._BWD_WARPS)  # no pg weight
                out = scratch[:c] if scratch is not None else x  # in place on GPU
                # entropy takes no part in the loss: the backward runs without it (g_H = 0)
                _A._logprob_bwd_kernel[(c,)](x, out, targets[sl], m_row[sl], logs_row[sl], g[sl], g[sl], g[sl],
                                             x.stride(0), out.stride(0), VV, VV, inv_temp,
                                             WITH_ENTROPY=False, **bwd_cfg)
                if scratch is not None:
                    x.copy_(scratch[:c])  # round to nearest even, as the GPU kernel's store does
                if need_dh:
                    torch.mm(x, w, out=dh[sl])  # GEMM 2: every row chunk owns its rows of dH
                if need_dw:
                    _dw_accumulate(dw32, x, h_c)  # GEMM 3
            # the view `x` keeps the chunk buffer alive too: drop both before dW is cast (peak memory)
            del buf, scratch, x, out, pad  # `x` and `out` are views that would keep the buffer alive
        loss = torch.empty((), **f32)
        metrics = torch.empty(4, **f32)
        if N > 0:
            _B._ppo_loss_fwd_kernel[(1,)](logp, old_arg, ref_arg, advantages, mask, num_tokens, loss, metrics, N,
                                          *loss_params, logp, **flags, BLOCK=_B._FWD_BLOCK,
                                          num_warps=_B._FWD_WARPS)  # logp: the unused pg-weight pointer
        else:
            loss.zero_()
            metrics.zero_()
        dw = None
        if need_dw:
            if VV == weight.shape[0] and weight.dtype == torch.float32:
                dw = dw32
            else:
                dw = torch.zeros_like(weight)  # rows >= valid_vocab stay zero
                dw[:VV].copy_(dw32)
            del dw32
        ctx.dh, ctx.dw = dh, dw
        outs = (loss, metrics, logp) + ((ent,) if with_entropy else ())
        ctx.mark_non_differentiable(*outs[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
        return outs

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        dh, dw = ctx.dh, ctx.dw
        if dh is None and dw is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("linear_ppo_loss: backward called twice (its gradients are formed in the forward "
                               "and handed out once)")
        ctx.dh = ctx.dw = None
        if g_loss is None:
            return (None,) * 18
        g = g_loss.to(torch.float32)
        # in place on our own tensors: the product is computed in fp32 and rounded once to their dtype
        dh = dh.mul_(g) if dh is not None and ctx.needs_input_grad[0] else None
        dw = dw.mul_(g) if dw is not None and ctx.needs_input_grad[1] else None
        return (dh, dw) + (None,) * 16


def _check(hidden, weight, targets, advantages, mask, num_tokens, old_logp, ref_logp, temperature,
           eps_low, eps_high, clip_c, kl_type, valid_vocab):
    valid_vocab = _check_linear(hidden, weight, targets, temperature, valid_vocab)
    dummy = torch.empty(hidden.shape[0], device=hidden.device)
    if not isinstance(num_tokens, torch.Tensor):
        num_tokens = torch.tensor(float(num_tokens), device=hidden.device)
    _B._check_args(dummy, old_logp, ref_logp, advantages, mask, num_tokens, eps_low, eps_high, clip_c, kl_type)
    return valid_vocab, num_tokens


def linear_ppo_loss_triton(hidden, weight, targets, advantages, mask, num_tokens, old_logp=None, ref_logp=None,
                           temperature=1.0, *, eps_low, eps_high, clip_c, kl_type, kl_coef=0.0,
                           valid_vocab=None, with_entropy=False):
    """The fused 3-GEMM path of `linear_ppo_loss` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    valid_vocab, num_tokens = _check(hidden, weight, targets, advantages, mask, num_tokens, old_logp, ref_logp,
                                     temperature, eps_low, eps_high, clip_c, kl_type, valid_vocab)
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes; avoids i1 pointers
    prep = (lambda t: None if t is None else t.detach().to(torch.float32).contiguous())
    outs = _LinearPPOLoss.apply(
        hidden, weight, targets.contiguous(), prep(advantages), mask.detach().contiguous(),
        num_tokens.detach().reshape(()).to(hidden.device), prep(old_logp), prep(ref_logp),
        float(temperature), eps_low, eps_high, clip_c, kl_coef, kl_type, valid_vocab, bool(with_entropy),
        need_dh, need_dw)
    loss, metrics, logp = outs[:3]
    return loss, dict(zip(_B.METRIC_NAMES, metrics.unbind(0))), logp, (outs[3] if with_entropy else None)


def linear_ppo_loss_torch(hidden, weight, targets, advantages, mask, num_tokens, old_logp=None, ref_logp=None,
                          temperature=1.0, *, eps_low, eps_high, clip_c, kl_type, kl_coef=0.0,
                          valid_vocab=None, with_entropy=False):
    """Plain-autograd reference of `linear_ppo_loss` (same signature and outputs): A's PyTorch reference
    (vocab-chunked logits, fp32 logsumexp, recompute in backward) followed by `ppo_loss_torch`. Its logits
    are fp32 (not rounded to bf16), so on bf16 inputs it differs from the fused path by that rounding."""
    valid_vocab, num_tokens = _check(hidden, weight, targets, advantages, mask, num_tokens, old_logp, ref_logp,
                                     temperature, eps_low, eps_high, clip_c, kl_type, valid_vocab)
    logp, ent = linear_token_logprobs_torch(hidden, weight, targets, temperature, with_entropy, valid_vocab)
    loss, metrics = _B.ppo_loss_torch(logp, old_logp, ref_logp, advantages, mask, num_tokens, eps_low=eps_low,
                                      eps_high=eps_high, clip_c=clip_c, kl_type=kl_type, kl_coef=kl_coef)
    return loss, metrics, logp.detach(), (ent.detach() if ent is not None else None)


def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, num_tokens: torch.Tensor, old_logp: torch.Tensor | None = None,
                    ref_logp: torch.Tensor | None = None, temperature: float = 1.0, *, eps_low: float,
                    eps_high: float, clip_c: float, kl_type: str, kl_coef: float = 0.0,
                    valid_vocab: int | None = None, with_entropy: bool = False
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Token-mean dual-clip PPO + KL loss of softmax(hidden @ weight.T / T) in one fused pass (3 GEMMs).

    hidden [N, H], weight [V, H] (same dtype), targets/advantages/mask/old_logp/ref_logp [N], num_tokens a
    1-element tensor (the GLOBAL response-token count) -> (loss, metrics, logp [N] fp32 detached,
    entropy [N] fp32 detached or None). loss is differentiable w.r.t. hidden and weight only; the
    gradients are computed in the forward (see the module docstring). Benchmark-only (module docstring);
    the no-grad counterpart is linear_token_logprobs_scoring. Dispatches via kernels.backend."""
    impl = linear_ppo_loss_triton if use_triton(hidden, weight) else linear_ppo_loss_torch
    return impl(hidden, weight, targets, advantages, mask, num_tokens, old_logp, ref_logp, temperature,
                eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, kl_type=kl_type, kl_coef=kl_coef,
                valid_vocab=valid_vocab, with_entropy=with_entropy)


@torch.no_grad()
def linear_token_logprobs_scoring(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  temperature: float = 1.0, with_entropy: bool = False,
                                  valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Benchmark-only, like linear_ppo_loss (training scores with A').
    No-grad scoring (old / reference log-probs) with exactly the numerics of linear_ppo_loss: the same row
    chunks, the same bf16 logits from cuBLAS (GEMM 1), the same kernel-A forward. So with the same weights the
    scoring pass and the training pass give bitwise-equal logp, and the on-policy ratio is exactly 1.
    Costs one GEMM + one read of each chunk's logits; holds one [C, V] chunk (~0.6 GiB at V = 151,936 bf16)."""
    N, H = hidden.shape
    VV = weight.shape[0] if valid_vocab is None else int(valid_vocab)
    if not use_triton(hidden, weight):
        return _A.token_logprobs_torch(hidden @ weight.t(), targets, temperature, with_entropy, valid_vocab)
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N, device=dev, dtype=torch.float32) if with_entropy else None
    if N == 0:
        return logp, ent
    C = min(_chunk_rows(VV, hidden.element_size()), N)
    buf = torch.empty(C, VV, device=dev, dtype=hidden.dtype)
    pad = torch.empty(C, H, device=dev, dtype=hidden.dtype) if hidden.is_cuda and N > C else None
    w = weight[:VV]
    for r0 in range(0, N, C):
        r1 = min(r0 + C, N)
        x = _chunk_logits(hidden, r0, r1, w, buf, pad)
        lp, en = _A.token_logprobs_triton(x, targets[r0:r1], temperature, with_entropy, VV)
        logp[r0:r1] = lp
        if with_entropy:
            ent[r0:r1] = en
    return logp, ent
