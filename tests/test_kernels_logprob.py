"""Kernels A (logits -> logp/entropy) and A' (fused lm_head) against a float64 autograd reference.

Every comparison uses fresh random inputs and a float64 `log_softmax` reference computed from the *same*
(bf16 or fp32) values, so what remains is the kernels' fp32 arithmetic, plus, for bf16 gradients, the
rounding to bf16 that the output dtype forces. Tolerances (derived, not tuned):
- logp / entropy: 1e-5 relative (+1e-5 absolute near 0). For A' we add twice the worst-case bound on an fp32
  K-term dot product, γ_K·Σ|h_k w_k| ≈ K·2^-24·Σ|h_k w_k| per logit (Higham, Accuracy and Stability of
  Numerical Algorithms, 2nd ed., §3.1): an fp32 GEMM cannot promise more. It is ~1e-4 for the O(10) logits
  here and matters only for logits of size 1e4 (on CPU every A' case also passes without it).
- fp32 gradients: 1e-5 relative + 1e-6·max|grad|.
- bf16 gradients: round-to-nearest costs ≤ 2^-8 relative per rounding. A: one rounding of dlogits. A': the
  dlogits chunk is rounded (as on GPU) before the two GEMMs and the result once more, so
  |err| ≤ 2^-8·(|ref| + |dz|@|W|) for dH (and |dz|^T@|H| for dW) + 1e-5·max|ref|.
On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with a GPU
the same tests run compiled on CUDA, and the @gpu tests check the real shapes (N=4096, V=151,936, H=1,536).
"""
import zlib

import pytest
import torch

import kernels.linear_logprob as AL
import kernels.logprob as A
from kernels import backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_EPS = 2.0**-8  # bf16 round-to-nearest: |rnd(x) - x| <= 2^-8 |x|


def fresh(seed) -> torch.Generator:
    """A generator per test case (seed: int or any str-able key), reproducible across runs. It lives on DEVICE
    so the GPU tests draw their multi-GiB inputs on the GPU."""
    return torch.Generator(device=DEVICE).manual_seed(seed if isinstance(seed, int) else zlib.crc32(str(seed).encode()))


def randn(*shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def randint(high, n, g):
    return torch.randint(0, high, (n,), generator=g, device=DEVICE)


def assert_close(got, want, rtol, atol, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs()
    tol = atol + rtol * want.abs()
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max |err| {err.max().item():.3e}, worst err/tol {worst:.2f}"


def reference(logits64, targets, T, vv, g_logp, g_ent, row_chunk=512):
    """fp64 autograd of log_softmax: (logp, entropy, dloss/dlogits) for loss = Σ g_logp·logp + g_ent·H.
    Rows in chunks so the GPU shapes fit; rows are independent."""
    logps, ents, grads = [], [], []
    for r in range(0, logits64.shape[0], row_chunk):
        x = logits64[r:r + row_chunk].detach().clone().requires_grad_()
        log_p = torch.log_softmax(x[:, :vv] / T, dim=-1)
        logp = log_p.gather(1, targets[r:r + row_chunk, None]).squeeze(1)
        ent = -(log_p.exp() * log_p).sum(-1)
        ((logp * g_logp[r:r + row_chunk].double()).sum() + (ent * g_ent[r:r + row_chunk].double()).sum()).backward()
        logps.append(logp.detach()), ents.append(ent.detach()), grads.append(x.grad)
    return torch.cat(logps), torch.cat(ents), torch.cat(grads)


def grad_tol(dtype, ref):
    """(rtol, atol) for a gradient in `dtype` (module docstring)."""
    if dtype == torch.float32:
        return 1e-5, 1e-6 * ref.abs().max().item()
    return BF16_EPS + 1e-5, 1e-6 * ref.abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# A: token_logprobs from logits

LOGPROB_IMPLS = {"triton": A.token_logprobs_triton, "torch": A.token_logprobs_torch}


def check_logprobs(impl, N, V, vv, T, dtype, seed, scale=3.0):
    g = fresh(seed)
    logits = randn(N, V, g=g, scale=scale, dtype=dtype)
    targets = randint(vv or V, N, g)
    g_logp, g_ent = randn(N, g=g), randn(N, g=g)
    x = logits.clone().requires_grad_()
    logp, ent = LOGPROB_IMPLS[impl](x, targets, T, with_entropy=True, valid_vocab=vv)
    assert logp.dtype == ent.dtype == torch.float32
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert x.grad.dtype == dtype
    ref_logp, ref_ent, ref_grad = reference(logits.double(), targets, T, vv or V, g_logp, g_ent)
    assert_close(logp, ref_logp, 1e-5, 1e-5, "logp")
    assert_close(ent, ref_ent, 1e-5, 1e-5, "entropy")
    assert_close(x.grad, ref_grad, *grad_tol(dtype, ref_grad), "dlogits")
    if vv is not None:
        assert (x.grad[:, vv:] == 0).all(), "padded columns must get a zero gradient"


@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,V,vv,T", [(37, 1000, None, 1.0),  # V not a multiple of any block
                                      (5, 5000, 4321, 0.7),  # several blocks per row, ragged, padded vocab
                                      (1, 1000, None, 0.7)])  # N = 1
def test_logprobs_match_fp64(impl, dtype, N, V, vv, T):
    check_logprobs(impl, N, V, vv, T, dtype, seed=(impl, N, V, dtype))


@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
def test_logprobs_qwen_vocab(impl):
    """The real ragged vocabulary (151,936 = 74.2 blocks of 2,048), with the tokenizer's 151,665 valid ids."""
    check_logprobs(impl, N=3, V=151_936, vv=151_665, T=0.7, dtype=torch.bfloat16, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_logprobs_extreme_logits(dtype, T):
    """Logits of size 1e4: p is one-hot, exp underflows everywhere else; nothing may turn into inf/nan."""
    for impl in LOGPROB_IMPLS:
        check_logprobs(impl, N=9, V=3000, vv=None, T=T, dtype=dtype, seed=11, scale=1e4)


def test_logprobs_ignore_padded_columns():
    """Huge values in the padded columns (>= valid_vocab) change nothing."""
    g = fresh(3)
    logits = randn(6, 3000, g=g, scale=2.0)
    targets = randint(2500, 6, g)
    poisoned = logits.clone()
    poisoned[:, 2500:] = 1e4
    a, ea = A.token_logprobs_triton(logits[:, :2500].contiguous(), targets, 0.7, True)
    b, eb = A.token_logprobs_triton(poisoned, targets, 0.7, True, valid_vocab=2500)
    assert torch.equal(a, b) and torch.equal(ea, eb)


def test_logprobs_zero_and_empty_grads():
    """Rows with no incoming gradient (masked tokens) get exactly zero dlogits; N = 0 works."""
    g = fresh(4)
    x = randn(8, 1000, g=g, dtype=torch.bfloat16).requires_grad_()
    targets = randint(1000, 8, g)
    logp, ent = A.token_logprobs_triton(x, targets, 0.7, with_entropy=True)
    keep = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], device=DEVICE, dtype=torch.float32)
    ((logp * keep).sum() + (ent * keep * 0.5).sum()).backward()
    assert (x.grad[keep == 0] == 0).all() and (x.grad[keep == 1] != 0).any()
    x.grad = None
    logp, _ = A.token_logprobs_triton(x, targets)  # fully masked: all-zero upstream gradient
    (logp * 0).sum().backward()
    assert (x.grad == 0).all()
    empty = torch.zeros(0, 1000, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    logp, ent = A.token_logprobs_triton(empty, targets[:0], with_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert empty.grad.shape == (0, 1000)


def test_logprobs_strided_rows():
    """A row-strided view (e.g. every other position of a [B, T, V] buffer) is read in place."""
    g = fresh(5)
    big = randn(10, 1000, g=g, dtype=torch.bfloat16)
    targets = randint(1000, 5, g)
    a, _ = A.token_logprobs_triton(big[::2], targets)
    b, _ = A.token_logprobs_triton(big[::2].contiguous(), targets)
    assert torch.equal(a, b)


def test_logprobs_deterministic_and_independent_of_n():
    """Bitwise: two calls, any subset of rows (any N, any offset), with/without entropy, with/without grad."""
    g = fresh(6)
    x = randn(24, 5000, g=g, dtype=torch.bfloat16)
    targets = randint(5000, 24, g)
    with torch.no_grad():
        logp, ent = A.token_logprobs_triton(x, targets, 0.7, True)
        again, ent_again = A.token_logprobs_triton(x, targets, 0.7, True)
        no_ent, _ = A.token_logprobs_triton(x, targets, 0.7, False)
    assert torch.equal(logp, again) and torch.equal(ent, ent_again) and torch.equal(logp, no_ent)
    for lo, hi in [(3, 20), (17, 18), (0, 23)]:
        sub, sub_ent = A.token_logprobs_triton(x[lo:hi].clone().requires_grad_(), targets[lo:hi], 0.7, True)
        assert torch.equal(sub, logp[lo:hi]) and torch.equal(sub_ent, ent[lo:hi]), (lo, hi)


# --------------------------------------------------------------------------------------------------------------
# A': linear_token_logprobs (fused lm_head)

LINEAR_IMPLS = {"triton": AL.linear_token_logprobs_triton, "torch": AL.linear_token_logprobs_torch}


def gemm_error_bound(h64, w64, T):
    """Per row, max over the vocabulary of the fp32 K-term dot-product error bound K·2^-24·Σ_k|h_k||w_k| / T."""
    K = h64.shape[1]
    return K * 2.0**-24 * (h64.abs() @ w64.abs().T).amax(dim=1) / T


def check_linear(impl, N, H, V, vv, T, dtype, seed, h_scale=1.0, w_scale=0.3, with_entropy=True):
    g = fresh(seed)
    hidden, weight = randn(N, H, g=g, scale=h_scale, dtype=dtype), randn(V, H, g=g, scale=w_scale, dtype=dtype)
    vv_ = vv or V
    targets = randint(vv_, N, g)
    g_logp, g_ent = randn(N, g=g), randn(N, g=g) if with_entropy else torch.zeros(N, device=DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = LINEAR_IMPLS[impl](h, w, targets, T, with_entropy=with_entropy, valid_vocab=vv)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == dtype

    h64, w64 = hidden.double(), weight.double()
    ref_logp, ref_ent, dz = reference(h64 @ w64.T, targets, T, vv_, g_logp, g_ent)
    ref_dh, ref_dw = dz @ w64, dz.T @ h64
    zerr = gemm_error_bound(h64, w64[:vv_], T)  # module docstring
    assert_close(logp, ref_logp, 1e-5, 1e-5 + 2 * zerr, "logp")
    if with_entropy:
        assert_close(ent, ref_ent, 1e-5, 1e-5 + 2 * zerr, "entropy")
    if dtype == torch.float32:
        assert_close(h.grad, ref_dh, *grad_tol(dtype, ref_dh), "dH")
        assert_close(w.grad, ref_dw, *grad_tol(dtype, ref_dw), "dW")
    else:  # bf16 dlogits feed the two GEMMs (module docstring)
        assert_close(h.grad, ref_dh, 0, BF16_EPS * (ref_dh.abs() + dz.abs() @ w64.abs())
                     + 1e-5 * ref_dh.abs().max(), "dH")
        assert_close(w.grad, ref_dw, 0, BF16_EPS * (ref_dw.abs() + dz.abs().T @ h64.abs())
                     + 1e-5 * ref_dw.abs().max(), "dW")
    assert (w.grad[vv_:] == 0).all(), "padded vocabulary rows must get a zero gradient"


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,V,vv,T", [(37, 72, 1000, None, 1.0),  # ragged V, H not a multiple of BLOCK_K
                                        (20, 64, 3001, 2900, 0.7),  # several groups, padded vocab, even K
                                        (1, 40, 1000, None, 0.7)])  # N = 1
def test_linear_matches_fp64(impl, dtype, N, H, V, vv, T):
    check_linear(impl, N, H, V, vv, T, dtype, seed=(impl, N, V, dtype))


def test_linear_without_entropy():
    check_linear("triton", 21, 48, 1000, None, 0.7, torch.bfloat16, seed=12, with_entropy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_extreme_logits(dtype):
    """Logits of size 1e4 (|h| ~ 100, |w| ~ 100/sqrt(H))."""
    for impl in LINEAR_IMPLS:
        check_linear(impl, 9, 64, 1000, None, 0.7, dtype, seed=13, h_scale=100.0, w_scale=100.0 / 8)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_linear_qwen_vocab(impl):
    """The real ragged vocabulary 151,936 (151,665 valid ids) at a small N and H. The Triton path takes ~30 s of
    CPU in the interpreter (its tl.dot is a non-BLAS numpy loop), hence slow; test_gpu_linear_real_shape covers it."""
    check_linear(impl, 3, 32, 151_936, 151_665, 0.7, torch.bfloat16, seed=14)


def test_linear_chunked_backward(monkeypatch):
    """Several backward vocab chunks (ragged last one) give bitwise the same dH and dW as one chunk."""
    g = fresh(15)
    hidden, weight = randn(20, 64, g=g, dtype=torch.bfloat16), randn(3000, 64, g=g, scale=0.3, dtype=torch.bfloat16)
    targets = randint(3000, 20, g)
    g_logp, g_ent = randn(20, g=g), randn(20, g=g)

    def grads():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = AL.linear_token_logprobs_triton(h, w, targets, 0.7, with_entropy=True)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return h.grad, w.grad

    one = grads()
    assert AL._chunk_width(20, 3000, 2) >= 3000
    monkeypatch.setattr(AL, "_CHUNK_BYTES", 1)  # -> the minimum width, _CHUNK_ALIGN = 1024: 3 chunks
    assert AL._chunk_width(20, 3000, 2) == 1024
    three = grads()
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_linear_zero_grads_frozen_weight_and_empty():
    g = fresh(16)
    hidden, weight = randn(10, 40, g=g), randn(1000, 40, g=g, scale=0.3)
    targets = randint(1000, 10, g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = AL.linear_token_logprobs_triton(h, w, targets)
    (logp * 0).sum().backward()  # fully masked batch
    assert (h.grad == 0).all() and (w.grad == 0).all()
    h, h_ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()  # frozen lm_head: only dH
    logp, _ = AL.linear_token_logprobs_triton(h, weight, targets)
    logp.sum().backward()
    AL.linear_token_logprobs_torch(h_ref, weight, targets)[0].sum().backward()
    assert_close(h.grad, h_ref.grad, *grad_tol(torch.float32, h_ref.grad), "dH with a frozen weight")
    empty = torch.zeros(0, 40, device=DEVICE, requires_grad=True)
    w = weight.clone().requires_grad_()
    logp, ent = AL.linear_token_logprobs_triton(empty, w, targets[:0], with_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert empty.grad.shape == (0, 40) and (w.grad == 0).all()


def test_linear_ignores_padded_vocab_rows():
    g = fresh(17)
    hidden, weight = randn(7, 32, g=g), randn(1200, 32, g=g, scale=0.3)
    targets = randint(1000, 7, g)
    poisoned = weight.clone()
    poisoned[1000:] = 1e3
    a, ea = AL.linear_token_logprobs_triton(hidden, weight[:1000].contiguous(), targets, 0.7, True)
    b, eb = AL.linear_token_logprobs_triton(hidden, poisoned, targets, 0.7, True, valid_vocab=1000)
    assert torch.equal(a, b) and torch.equal(ea, eb)


def test_linear_deterministic_and_independent_of_n():
    """Bitwise: two calls; with/without entropy and grad; the same rows inside any N. On CPU the subsets keep
    each row's position inside its BLOCK_N tile, because numpy's matmul (the interpreter's tl.dot) rounds
    differently by position; the GPU test below shifts rows arbitrarily (tensor-core MMA does not)."""
    g = fresh(18)
    hidden, weight = randn(40, 64, g=g, dtype=torch.bfloat16), randn(3000, 64, g=g, scale=0.3, dtype=torch.bfloat16)
    targets = randint(3000, 40, g)
    with torch.no_grad():
        logp, ent = AL.linear_token_logprobs_triton(hidden, weight, targets, 0.7, True)
        again, ent_again = AL.linear_token_logprobs_triton(hidden, weight, targets, 0.7, True)
        no_ent, _ = AL.linear_token_logprobs_triton(hidden, weight, targets, 0.7, False)
    assert torch.equal(logp, again) and torch.equal(ent, ent_again) and torch.equal(logp, no_ent)
    bn = AL._CPU_FWD["BLOCK_N"]
    spans = [(3, 30), (17, 18), (1, 39)] if DEVICE == "cuda" else [(0, 30), (bn, 40), (bn, bn + 1), (0, 1)]
    for lo, hi in spans:
        h = hidden[lo:hi].clone().requires_grad_()
        sub, sub_ent = AL.linear_token_logprobs_triton(h, weight, targets[lo:hi], 0.7, True)
        assert torch.equal(sub, logp[lo:hi]) and torch.equal(sub_ent, ent[lo:hi]), (lo, hi)


# --------------------------------------------------------------------------------------------------------------
# The switch (kernels.backend)

def test_dispatch_follows_backend():
    g = fresh(19)
    logits = randn(4, 1000, g=g, dtype=torch.bfloat16)
    hidden, weight = randn(4, 32, g=g), randn(1000, 32, g=g, scale=0.3)
    targets = randint(1000, 4, g)
    saved = backend.get_backend()
    try:
        for name, lp_impl, lin_impl in [("torch", A.token_logprobs_torch, AL.linear_token_logprobs_torch),
                                        ("auto", A.token_logprobs_triton, AL.linear_token_logprobs_triton)]:
            backend.set_backend(name)
            assert torch.equal(A.token_logprobs(logits, targets, 0.7, True)[1], lp_impl(logits, targets, 0.7, True)[1])
            assert torch.equal(AL.linear_token_logprobs(hidden, weight, targets)[0],
                               lin_impl(hidden, weight, targets)[0])
    finally:
        backend.set_backend(saved)


# --------------------------------------------------------------------------------------------------------------
# Real shapes on a GPU (pytest -m gpu)

QWEN_V, QWEN_VALID, QWEN_H = 151_936, 151_665, 1_536


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_gpu_logprobs_real_shape(T):
    check_logprobs("triton", N=4096, V=QWEN_V, vv=QWEN_VALID, T=T, dtype=torch.bfloat16, seed=21, scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_gpu_linear_real_shape(T):
    # hidden ~ final-normed activations (O(1)), lm_head rows ~ 1/sqrt(H): logits O(1..10) like a real model
    check_linear("triton", 4096, QWEN_H, QWEN_V, QWEN_VALID, T, torch.bfloat16, seed=22, w_scale=2.0 / QWEN_H**0.5)


@pytest.mark.gpu
def test_gpu_determinism_any_shift():
    """On tensor cores a row's logp must not depend on N nor on its position inside a tile."""
    g = fresh(23)
    N = 4096
    logits = randn(N, QWEN_V, g=g, scale=4.0, dtype=torch.bfloat16)
    hidden = randn(N, QWEN_H, g=g, dtype=torch.bfloat16)
    weight = randn(QWEN_V, QWEN_H, g=g, scale=2.0 / QWEN_H**0.5, dtype=torch.bfloat16)
    targets = randint(QWEN_VALID, N, g)
    for fn, args in [(A.token_logprobs_triton, (logits,)), (AL.linear_token_logprobs_triton, (hidden, weight))]:
        with torch.no_grad():
            full, full_ent = fn(*args, targets, 0.7, True, QWEN_VALID)
            assert torch.equal(full, fn(*args, targets, 0.7, True, QWEN_VALID)[0])
            assert torch.equal(full, fn(*args, targets, 0.7, False, QWEN_VALID)[0])
        for lo, hi in [(3, 1000), (77, 78), (1, N - 5)]:
            sub_args = tuple(a[lo:hi].clone().requires_grad_() for a in args[:1]) + args[1:]
            sub, sub_ent = fn(*sub_args, targets[lo:hi], 0.7, True, QWEN_VALID)
            assert torch.equal(sub, full[lo:hi]) and torch.equal(sub_ent, full_ent[lo:hi]), (fn.__name__, lo, hi)


@pytest.mark.gpu
def test_gpu_memory_budgets():
    """Peak memory beyond inputs, at N=16,384 (DESIGN.md §6 / issue 3): A fwd+bwd ≤ one bf16 grad of the
    logits + O(N); A' fwd+bwd ≤ 1.8 GiB including the dH and dW it returns."""
    g = fresh(24)
    N = 16_384
    targets = randint(QWEN_VALID, N, g)
    g_logp = randn(N, g=g)

    logits = randn(N, QWEN_V, g=g, scale=4.0, dtype=torch.bfloat16).requires_grad_()
    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, ent = A.token_logprobs_triton(logits, targets, 0.7, True, QWEN_VALID)
    ((logp * g_logp).sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= logits.numel() * 2 + 64 * N * 4 + 2**20, f"A extra memory {extra / 2**30:.2f} GiB"
    del logits, logp, ent

    hidden = randn(N, QWEN_H, g=g, dtype=torch.bfloat16).requires_grad_()
    weight = randn(QWEN_V, QWEN_H, g=g, scale=2.0 / QWEN_H**0.5, dtype=torch.bfloat16).requires_grad_()
    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, ent = AL.linear_token_logprobs_triton(hidden, weight, targets, 0.7, True, QWEN_VALID)
    ((logp * g_logp).sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.8 * 2**30, f"A' extra memory {extra / 2**30:.2f} GiB"
