"""Kernel B: the token-mean dual-clip PPO + KL loss over [N] per-token vectors, fused.

Per response token (DESIGN.md §5; the same formulas as verl's compute_policy_loss_vanilla and
kl_penalty in verl/trainer/ppo/core_algos.py):

    d   = clamp(logp − old, −20, 20);   ρ = exp(d)
    pg1 = −A·ρ;   pg2 = −A·clip(ρ, 1−ε_low, 1+ε_high);   pg = max(pg1, pg2)
    A < 0:  pg = min(pg, −c·A)                                   (dual clip)
    k   = clamp(ref − logp, −20, 20);   kl = −k (k1) | ½k² (k2) | exp(k) − k − 1 (k3)
    loss = Σ m·(w·pg + β·kl) / num_tokens

w is an optional per-token weight on the policy-gradient term only (1 when absent): the truncated importance
weight min(π_train/π_rollout, C) of rollout correction (memrl/algo.py), a constant like A. verl
applies it the same way, to the clipped pg loss and not to the KL term (rollout_corr_math.md §3.2.1: the IS weight
multiplies the PPO surrogate).

num_tokens is the GLOBAL count of response tokens (a device tensor: no host sync), so summing `loss`
and every metric over micro-batches and ranks gives the global token-mean exactly. Metrics, each
Σ over this call's masked tokens / num_tokens, named as verl logs them:
    pg_clipfrac        pg2 > pg1 (the ε clip is active)
    pg_clipfrac_lower  A < 0 and max(pg1, pg2) > −c·A (the dual clip is active)
    ppo_kl             −d = old − logp (verl's ppo_kl)
    kl                 the KL estimate (0 without ref_logp)

Hyperparameters: ε_low, ε_high, c and the KL estimator have no defaults here: the caller says which (training:
memrl.config.AlgoCfg, their one source, through memrl.algo.policy_loss). β = kl_coef defaults to 0, no KL term.

Conventions (identical in the Triton kernels and `ppo_loss_torch`):
- old_logp None = on-policy: d ≡ 0, ρ ≡ 1 exactly, and dρ/dlogp = ρ = 1, so the gradient still flows.
- ref_logp None = no KL term (kl = 0).
- pg_weight None = w ≡ 1 (no load, no multiply: the same bits as before the weight existed).
- The metrics count tokens (m), not w·m: pg_clipfrac is the fraction of tokens clipped, whatever their weight.
- Only logp gets a gradient; old_logp, ref_logp and advantages are constants of the RL step.
- Masked tokens (mask == 0) contribute exactly 0 to the loss, the metrics and dlogp, even when their
  inputs are inf/NaN (padding).
- num_tokens == 0 (nothing to train on) divides by 1 instead: loss 0, not NaN.
- verl additionally clamps the k3 value to [−10, 10]; DESIGN.md §5 does not, and neither do we.

Design (Triton): forward = ONE launch of ONE program that streams the N tokens in blocks of
_FWD_BLOCK, keeps per-lane partial sums in registers and reduces them once at the end. A single
program needs no atomics, no workspace and no second "finish" launch, and the summation order is
fixed, so the result is bitwise deterministic. The cost is one SM's throughput: 17 bytes read
(four fp32 vectors and a 1-byte mask) and ~40 instructions per token, about 10–30 µs at N = 65,536
on an H100, the same order as the host cost of the two launches; at N ≈ 10⁶ tokens per call
(≈ 0.2 ms) a persistent grid with a fixed-order finish would start to pay. Backward = ONE launch,
one program per _BWD_BLOCK tokens, recomputing the per-token terms from the saved [N] inputs
(cheaper than saving them).
"""
import torch

from kernels.backend import tl, triton, use_triton

KL_TYPES = {"k1": 1, "k2": 2, "k3": 3}
METRIC_NAMES = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl")
_FWD_BLOCK, _FWD_WARPS = 4096, 16  # one program: wide blocks and many warps keep the SM's loads in flight
_BWD_BLOCK, _BWD_WARPS = 1024, 4


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _token_terms(logp, old, ref, adv, eps_low, eps_high, clip_c,
                 HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr):
    """Per-token pg, kl, d, the two clip indicators and d(pg)/d(logp), d(kl)/d(logp) (DESIGN.md §5)."""
    if HAS_OLD:
        raw_d = logp - old
        d = tl.minimum(tl.maximum(raw_d, -20.0), 20.0)
    else:
        raw_d = tl.zeros_like(logp)
        d = raw_d  # on-policy: ratio exactly 1
    ratio = tl.exp(d)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clip1 = tl.maximum(pg1, pg2)
    pg3 = -adv * clip_c
    dual = (adv < 0.0) & (clip1 > pg3)  # verl: where(A < 0, min(pg3, clip1), clip1)
    pg = tl.where(dual, pg3, clip1)
    # The gradient goes through ρ only on the unclipped branch (pg1 ≥ pg2: inside the band, pg1 == pg2
    # bit for bit) and not when the dual clip holds pg at the constant −c·A; clamp passes it on [−20, 20].
    dpg = tl.where((pg1 >= pg2) & (dual == 0) & (raw_d >= -20.0) & (raw_d <= 20.0), -adv * ratio, 0.0)
    if HAS_REF:
        raw_k = ref - logp
        k = tl.minimum(tl.maximum(raw_k, -20.0), 20.0)
        if KL_TYPE == 1:  # k1 = −k,  dk/dlogp = −1
            kl = -k
            dkl = tl.full(k.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:  # k2 = ½k²
            kl = 0.5 * k * k
            dkl = -k
        else:  # k3 = exp(k) − k − 1 (Schulman, "Approximating KL divergence", 2020)
            ek = tl.exp(k)
            kl = ek - k - 1.0
            dkl = 1.0 - ek
        dkl = tl.where((raw_k >= -20.0) & (raw_k <= 20.0), dkl, 0.0)
    else:
        kl = tl.zeros_like(logp)
        dkl = kl
    return pg, kl, d, pg2 > pg1, dual, dpg, dkl


@triton.jit
def _load_token(ptr, offs, inb, ENABLED: tl.constexpr):
    if ENABLED:
        return tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        return tl.zeros([offs.shape[0]], tl.float32)


@triton.jit
def _ppo_loss_fwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, num_tokens_ptr, loss_ptr, metrics_ptr,
                         N, eps_low, eps_high, clip_c, kl_coef, w_ptr,
                         HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_W: tl.constexpr = False):
    # grid = (1,): one program walks all N tokens; per-lane sums, one fixed-order reduction at the end.
    lanes = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_lower = tl.zeros([BLOCK], tl.float32)
    acc_ppo_kl = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + lanes
        inb = offs < N
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        live = m != 0.0
        logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = _load_token(old_ptr, offs, inb, HAS_OLD)
        ref = _load_token(ref_ptr, offs, inb, HAS_REF)
        pg, kl, d, clipped, dual, dpg, dkl = _token_terms(logp, old, ref, adv, eps_low, eps_high, clip_c,
                                                          HAS_OLD, HAS_REF, KL_TYPE)
        if HAS_W:
            pg = pg * tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        # tl.where, not m·x: a masked token's inf/NaN must not leak into the sums
        acc_loss += tl.where(live, m * (pg + kl_coef * kl), 0.0)
        acc_clip += tl.where(live & clipped, m, 0.0)
        acc_lower += tl.where(live & dual, m, 0.0)
        acc_ppo_kl += tl.where(live, -m * d, 0.0)
        acc_kl += tl.where(live, m * kl, 0.0)
    num = tl.load(num_tokens_ptr).to(tl.float32)
    denom = tl.where(num != 0.0, num, 1.0)
    tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / denom)
    tl.store(metrics_ptr + 0, tl.sum(acc_clip, axis=0) / denom)
    tl.store(metrics_ptr + 1, tl.sum(acc_lower, axis=0) / denom)
    tl.store(metrics_ptr + 2, tl.sum(acc_ppo_kl, axis=0) / denom)
    tl.store(metrics_ptr + 3, tl.sum(acc_kl, axis=0) / denom)


@triton.jit
def _ppo_loss_bwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, num_tokens_ptr, grad_loss_ptr, dlogp_ptr,
                         N, eps_low, eps_high, clip_c, kl_coef, w_ptr,
                         HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_W: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    live = m != 0.0
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = _load_token(old_ptr, offs, inb, HAS_OLD)
    ref = _load_token(ref_ptr, offs, inb, HAS_REF)
    pg, kl, d, clipped, dual, dpg, dkl = _token_terms(logp, old, ref, adv, eps_low, eps_high, clip_c,
                                                      HAS_OLD, HAS_REF, KL_TYPE)
    if HAS_W:
        dpg = dpg * tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    num = tl.load(num_tokens_ptr).to(tl.float32)
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.where(num != 0.0, num, 1.0)
    dlogp = tl.where(live, (m * scale) * (dpg + kl_coef * dkl), 0.0)
    tl.store(dlogp_ptr + offs, dlogp.to(dlogp_ptr.dtype.element_ty), mask=inb)


class _PPOLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, num_tokens,
                eps_low, eps_high, clip_c, kl_coef, kl_type, pg_weight):
        loss = torch.empty((), dtype=torch.float32, device=logp.device)
        metrics = torch.empty(4, dtype=torch.float32, device=logp.device)
        # absent inputs: pass logp as a never-read placeholder pointer
        old_arg = old_logp if old_logp is not None else logp
        ref_arg = ref_logp if ref_logp is not None else logp
        w_arg = pg_weight if pg_weight is not None else logp
        params = (logp.numel(), float(eps_low), float(eps_high), float(clip_c), float(kl_coef), w_arg)
        flags = dict(HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None, KL_TYPE=KL_TYPES[kl_type],
                     HAS_W=pg_weight is not None)
        _ppo_loss_fwd_kernel[(1,)](logp, old_arg, ref_arg, advantages, mask, num_tokens, loss, metrics, *params,
                                   **flags, BLOCK=_FWD_BLOCK, num_warps=_FWD_WARPS)
        ctx.save_for_backward(logp, old_arg, ref_arg, advantages, mask, num_tokens, w_arg)
        ctx.params, ctx.flags = params, flags
        ctx.mark_non_differentiable(metrics)
        # no zero-filled gradient for `metrics` in backward: that fill would be a third launch per step
        ctx.set_materialize_grads(False)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return (None,) * 12
        logp, old_arg, ref_arg, advantages, mask, num_tokens, w_arg = ctx.saved_tensors
        dlogp = torch.empty_like(logp)
        n = logp.numel()
        if n > 0:
            grad_loss = grad_loss.to(torch.float32).contiguous()
            _ppo_loss_bwd_kernel[(triton.cdiv(n, _BWD_BLOCK),)](
                logp, old_arg, ref_arg, advantages, mask, num_tokens, grad_loss, dlogp, *ctx.params[:-1], w_arg,
                **ctx.flags, BLOCK=_BWD_BLOCK, num_warps=_BWD_WARPS)
        return (dlogp,) + (None,) * 11


# ----------------------------------------------------------------------------- public API
def _check_args(logp, old_logp, ref_logp, advantages, mask, num_tokens, eps_low, eps_high, clip_c, kl_type,
                pg_weight=None):
    if logp.dim() != 1:
        raise ValueError(f"logp must be 1-D [N], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("advantages", advantages), ("mask", mask),
                    ("pg_weight", pg_weight)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if not isinstance(num_tokens, torch.Tensor) or num_tokens.numel() != 1:
        raise ValueError("num_tokens must be a 1-element tensor (the global response-token count)")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {tuple(KL_TYPES)}, got {kl_type!r}")
    if not clip_c > 1.0:  # verl asserts the same: the dual clip bound c must exceed 1
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
             advantages: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor, *,
             eps_low: float, eps_high: float, clip_c: float, kl_type: str, kl_coef: float = 0.0,
             pg_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean dual-clip PPO + KL loss -> (loss 0-dim fp32, {pg_clipfrac, pg_clipfrac_lower, ppo_kl, kl}).

    All vectors are [N]; mask is bool or float (a float mask weights tokens, both terms); pg_weight (optional, [N])
    weights the policy-gradient term only; num_tokens is a 1-element tensor holding the global response-token
    count. Dispatches on kernels.backend.
    """
    if not isinstance(num_tokens, torch.Tensor):
        num_tokens = torch.tensor(float(num_tokens), device=logp.device)
    _check_args(logp, old_logp, ref_logp, advantages, mask, num_tokens, eps_low, eps_high, clip_c, kl_type,
                pg_weight)
    if not use_triton(logp, old_logp, ref_logp, advantages, mask) or logp.numel() == 0:  # N = 0: nothing to launch
        return ppo_loss_torch(logp, old_logp, ref_logp, advantages, mask, num_tokens, eps_low=eps_low,
                              eps_high=eps_high, clip_c=clip_c, kl_type=kl_type, kl_coef=kl_coef,
                              pg_weight=pg_weight)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes; avoids i1 pointers
    num_tokens = num_tokens.reshape(()).to(logp.device)
    loss, metrics = _PPOLossTriton.apply(
        logp.contiguous(),
        None if old_logp is None else old_logp.detach().contiguous(),
        None if ref_logp is None else ref_logp.detach().contiguous(),
        advantages.detach().contiguous(), mask.contiguous(), num_tokens,
        eps_low, eps_high, clip_c, kl_coef, kl_type,
        None if pg_weight is None else pg_weight.detach().float().contiguous())
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))


def ppo_loss_torch(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor, *,
                   eps_low: float, eps_high: float, clip_c: float, kl_type: str, kl_coef: float = 0.0,
                   pg_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PyTorch reference of `ppo_loss` (same signature, autograd gradient). Computes in fp32, or in
    fp64 when logp is fp64 (the tests' reference)."""
    if not isinstance(num_tokens, torch.Tensor):
        num_tokens = torch.tensor(float(num_tokens), device=logp.device)
    _check_args(logp, old_logp, ref_logp, advantages, mask, num_tokens, eps_low, eps_high, clip_c, kl_type,
                pg_weight)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    live = mask != 0
    m = mask.to(dtype)

    # Zero the masked tokens' inputs first: where() then keeps inf/NaN padding out of values AND grads.
    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(live, x.to(dtype), 0.0)

    logp = masked(logp)
    adv = masked(advantages).detach()
    old = logp.detach() if old_logp is None else masked(old_logp).detach()  # None: d = 0, ratio = 1 exactly

    # verl core_algos.compute_policy_loss_vanilla
    d = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(d)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * clip_c
    pg = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    if pg_weight is not None:  # rollout correction's truncated IS weight: on the pg term only, a constant
        pg = pg * masked(pg_weight).detach()

    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:  # verl core_algos.kl_penalty; k3 = "low_var_kl" (Schulman 2020, http://joschu.net/blog/kl-approx.html)
        k = torch.clamp(masked(ref_logp).detach() - logp, -20.0, 20.0)
        kl = {"k1": lambda: -k, "k2": lambda: 0.5 * k * k, "k3": lambda: torch.exp(k) - k - 1.0}[kl_type]()

    num = num_tokens.reshape(()).to(device=logp.device, dtype=dtype)
    denom = torch.where(num != 0, num, torch.ones_like(num))
    loss = (m * (pg + kl_coef * kl)).sum() / denom
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": (m * (pg2 > pg1)).sum() / denom,
            "pg_clipfrac_lower": (m * ((clip1 > pg3) & (adv < 0))).sum() / denom,
            "ppo_kl": (m * -d).sum() / denom,
            "kl": (m * kl).sum() / denom,
        }
    return loss, metrics
