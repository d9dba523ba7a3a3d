"""Kernel A: per-token log-probability (and entropy) from logits, without an fp32 [N, V] tensor.

    token_logprobs(logits [N, V] bf16|fp32, targets [N], temperature=1.0, with_entropy=False, valid_vocab=None)
        -> (logp [N] fp32, entropy [N] fp32 | None)          differentiable w.r.t. logits

With z = logits / T restricted to the first `valid_vocab` columns (the rest are padding rows of the
embedding and count as -inf):
    logp_i    = z_i,t - lse_i                  lse_i = log Σ_j exp z_ij
    entropy_i = -Σ_j p_ij log p_ij             p_ij = exp(z_ij - lse_i)

Design (Triton path). Memory-bound: the floor is one read of the logits forward, one read plus one
write (the gradient) backward.
- Forward: one program per row streams the row in BLOCK_V-wide blocks and keeps an online
  (running-max) logsumexp in fp32 (Milakov & Gimelshein 2018, "Online normalizer calculation for
  softmax"). The running max m is kept in *raw logit units* and the shift happens before the 1/T
  scale, so for logits of size 1e4 the exponent (x - m)/T is formed from an exact difference and
  logp = (x_t - m)/T - log s is accurate to fp32 rounding of an O(1) number, not of a 1e4 one.
  For the entropy it also keeps u = Σ e_j d_j with d_j = (x_j - m)/T, e_j = exp(d_j), rescaled when
  m grows; then  H = log s - u / s  (s = Σ e_j), a form with no cancellation between two large terms.
- Backward: one program per row re-reads the row and writes (derivation in `_logprob_bwd_kernel`)
      dz_j = g (1[j = t] - p_j) - g_H p_j (log p_j + H),      dlogits = dz / T
  in the logits' dtype. Extra memory: exactly one gradient the size of the logits (what autograd
  needs anyway); rows whose two incoming gradients are both zero skip the read.

Invariants
- fp32 accumulation everywhere; never an fp32 [N, V] tensor (only [N] row statistics are saved).
- Deterministic: no atomics; a row's result depends only on that row and on BLOCK_V, which is fixed
  per device kind and never depends on N, so the same rows give bitwise-equal logp for any N, with
  or without entropy, with or without grad (the scoring pass and the training pass agree).
- Columns >= valid_vocab are never read forward and get a zero gradient.
- Targets must lie in [0, valid_vocab); a target outside gives logp = -inf (Triton) / an error (torch).
"""
import torch

from kernels.backend import tl, triton, use_triton

# Block/launch settings per device kind. Changing them may change the low bits of the results (summation
# order) but never makes a row depend on N. GPU values follow Liger-Kernel's measured selective-log-softmax
# setting (2048 columns, 1 warp per row: many rows in flight per SM is what saturates HBM here).
_GPU_FWD = dict(BLOCK_V=2048, num_warps=1, num_stages=4)
_GPU_BWD = dict(BLOCK_V=2048, num_warps=1, num_stages=2)
# Under TRITON_INTERPRET (CPU) the same block: the interpreter's cost is per operation (a reduction costs
# ~1 ms), not per element, so wide blocks are what keeps CPU tests fast.
_CPU = dict(BLOCK_V=2048)


@triton.jit
def _logprob_fwd_kernel(x_ptr, tgt_ptr, logp_ptr, ent_ptr, m_ptr, logs_ptr,
                        stride_x, VV, inv_temp,
                        BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x  # int64: N*V exceeds 2^31 at real shapes
    offs = tl.arange(0, BLOCK_V)
    # Running statistics over the columns seen so far (raw units for m, see the module docstring):
    #   m = max x_j,  s = Σ exp((x_j - m)/T),  u = Σ exp((x_j - m)/T) * (x_j - m)/T.
    # m starts at a finite sentinel so the first rescale is exp(-huge) = 0, never (-inf) - (-inf) = nan.
    m = -1e30
    s = 0.0
    u = 0.0
    for start in range(0, VV, BLOCK_V):  # the first block always holds a valid column (VV >= 1)
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < VV, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp((m - m_new) * inv_temp)  # rescale of the old sums to the new max
        d = (x - m_new) * inv_temp  # <= 0; -inf on masked columns
        e = tl.exp(d)  # 0 on masked columns
        if WITH_ENTROPY:
            # u was relative to m; relative to m_new each old term gains (m - m_new)/T:
            #   Σ e'_j d'_j = alpha * (u + (m - m_new)/T * s)
            # The where() guards 0 * (-inf) on masked (or -inf) columns.
            u = alpha * (u + (m - m_new) * inv_temp * s) + tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    tgt = tl.load(tgt_ptr + row)
    x_t = tl.load(x_row + tgt, mask=(tgt >= 0) & (tgt < VV), other=float("-inf")).to(tl.float32)
    tl.store(logp_ptr + row, (x_t - m) * inv_temp - log_s)
    tl.store(m_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    if WITH_ENTROPY:
        # H = -Σ p_j log p_j with p_j = e_j / s, log p_j = d_j - log s  =>  H = log s - u / s
        tl.store(ent_ptr + row, log_s - u / s)


@triton.jit
def _logprob_bwd_kernel(x_ptr, dx_ptr, tgt_ptr, m_ptr, logs_ptr, ent_ptr, g_ptr, gent_ptr,
                        stride_x, stride_dx, V, VV, inv_temp,
                        BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # Derivation (z = x/T, p = softmax(z), lse = log Σ exp z):
    #   ∂logp_t/∂z_j = 1[j = t] - p_j
    #   ∂H/∂z_j = -Σ_k (∂p_k/∂z_j)(log p_k + 1) = -Σ_k p_k(1[k=j] - p_j) log p_k = -p_j (log p_j + H)
    #   (the "+1" terms vanish because Σ_k ∂p_k/∂z_j = 0), and ∂z_j/∂x_j = 1/T.
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    dx_row = dx_ptr + row.to(tl.int64) * stride_dx
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    m = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    g = tl.load(g_ptr + row)
    live = g != 0.0
    if WITH_ENTROPY:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
        live = live | (g_ent != 0.0)
    # Rows with no incoming gradient (e.g. prompt tokens) skip the read: masked lanes issue no load.
    read_end = tl.where(live, VV, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < read_end, other=float("-inf")).to(tl.float32)
        log_p = (x - m) * inv_temp - log_s  # shifted form, accurate for large logits (module docstring)
        p = tl.exp(log_p)  # 0 on masked columns, so they get a zero gradient
        dz = tl.where(cols == tgt, g, 0.0) - g * p
        if WITH_ENTROPY:
            dz -= g_ent * p * tl.where(p > 0, log_p + ent, 0.0)  # where(): 0 * (-inf) on masked columns
        tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=cols < V)


def _launch_config(x: torch.Tensor, gpu: dict) -> dict:
    return dict(gpu) if x.is_cuda else dict(_CPU)


def _check(logits, targets, temperature, valid_vocab) -> int:
    assert logits.dim() == 2, f"logits must be [N, V], got {tuple(logits.shape)}"
    assert logits.dtype in (torch.bfloat16, torch.float16, torch.float32), logits.dtype
    assert targets.shape == logits.shape[:1], f"targets {tuple(targets.shape)} vs logits {tuple(logits.shape)}"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    V = logits.shape[1]
    valid_vocab = V if valid_vocab is None else int(valid_vocab)
    assert 1 <= valid_vocab <= V, f"valid_vocab must be in [1, {V}], got {valid_vocab}"
    return valid_vocab


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, valid_vocab):
        N, V = logits.shape
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        inv_temp = 1.0 / temperature
        f32 = dict(device=logits.device, dtype=torch.float32)
        logp, m, log_s = (torch.empty(N, **f32) for _ in range(3))
        ent = torch.empty(N, **f32) if with_entropy else logp  # dummy pointer when unused
        if N > 0:
            cfg = _launch_config(logits, _GPU_FWD)
            _logprob_fwd_kernel[(N,)](logits, targets, logp, ent, m, log_s, logits.stride(0), valid_vocab, inv_temp,
                                      WITH_ENTROPY=with_entropy, **cfg)
        ctx.save_for_backward(logits, targets, m, log_s, *([ent] if with_entropy else []))
        ctx.inv_temp, ctx.with_entropy, ctx.valid_vocab = inv_temp, with_entropy, valid_vocab
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, targets, m, log_s, *rest = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        N, V = logits.shape
        # Triton's CPU interpreter (3.9) truncates fp32 -> bf16 instead of rounding to nearest even as the GPU
        # does, so there the kernel writes fp32 and torch rounds; on GPU the kernel writes the final dtype.
        round_on_host = not logits.is_cuda and logits.dtype != torch.float32
        dlogits = torch.empty(logits.shape, device=logits.device,
                              dtype=torch.float32 if round_on_host else logits.dtype)
        if N > 0:
            g_logp = g_logp.float().contiguous()
            if ctx.with_entropy:
                ent, g_ent = rest[0], g_ent.float().contiguous()
            else:
                ent = g_ent = g_logp  # dummies, not read (WITH_ENTROPY=False)
            cfg = _launch_config(logits, _GPU_BWD)
            _logprob_bwd_kernel[(N,)](logits, dlogits, targets, m, log_s, ent, g_logp, g_ent,
                                      logits.stride(0), dlogits.stride(0), V, ctx.valid_vocab, ctx.inv_temp,
                                      WITH_ENTROPY=ctx.with_entropy, **cfg)
        if round_on_host:
            dlogits = dlogits.to(logits.dtype)
        return dlogits, None, None, None, None


def token_logprobs_triton(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, valid_vocab: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of `token_logprobs` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    valid_vocab = _check(logits, targets, temperature, valid_vocab)
    out = _TokenLogprobs.apply(logits, targets, float(temperature), bool(with_entropy), valid_vocab)
    return out if with_entropy else (out, None)


def token_logprobs_torch(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = False, valid_vocab: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch reference (autograd does the backward). Holds fp32 [N, V] temporaries: it is the
    readable definition and the fallback where Triton cannot run, not the fast path."""
    valid_vocab = _check(logits, targets, temperature, valid_vocab)
    x = logits[:, :valid_vocab].float()  # slicing gives the padded columns a zero gradient
    # Shift by the row max before scaling (as the kernel does): for logits ~1e4 the fp32 log-softmax would
    # otherwise lose ~1e-3 to the rounding of z and lse. Detached: softmax is shift-invariant.
    z = (x - x.amax(dim=-1, keepdim=True).detach()) / temperature
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)  # [N, valid_vocab]
    logp = log_p.gather(1, targets[:, None].long()).squeeze(1)
    if not with_entropy:
        return logp, None
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(-1)  # p = 0 (underflow, -inf logits) contributes 0
    return logp, entropy


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, valid_vocab: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log p(target) (and entropy) of softmax(logits / temperature) over the first valid_vocab columns.

    logits [N, V] bf16|fp16|fp32, targets [N] long -> (logp [N] fp32, entropy [N] fp32 or None); both
    differentiable w.r.t. logits. Dispatches to Triton or the PyTorch reference (kernels.backend)."""
    if use_triton(logits):
        return token_logprobs_triton(logits, targets, temperature, with_entropy, valid_vocab)
    return token_logprobs_torch(logits, targets, temperature, with_entropy, valid_vocab)
