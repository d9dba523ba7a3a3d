"""linear_ppo_loss (A' + B fused, 3 GEMMs) against float64 autograd, the unfused kernels and itself.

The fused path rounds the logits to the input dtype once (GEMM 1 writes them in that dtype), so the
float64 reference starts from those same logits: logits64 = (hidden @ weight.T in the input dtype).double(),
then fp64 log_softmax + ppo_loss_torch (fp64) and autograd give logp, loss, metrics and dloss/dlogits;
dH = dz @ W and dW = dz^T @ H in fp64 (the rounding of the logits is a straight-through step, as in
every bf16 lm_head). Tolerances (derived as in tests/test_kernels_logprob.py):
- logp: 1e-5 relative + 1e-5 absolute (fp32 online logsumexp); loss, ppo_kl, kl: 1e-4 relative + 1e-6
  (sums of N fp32 terms whose inputs carry the logp error);
- fp32 gradients: 1e-5·(|dz| @ |W|) + 1e-6·max|ref|;
- bf16 gradients: dlogits are rounded to bf16 before GEMMs 2 and 3 and the result once more:
  2^-8·(|ref| + |dz| @ |W|) (|dz|^T @ |H| for dW) + 1e-5·max|ref|.
On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py) and the GEMMs are torch.matmul.
"""
import importlib
import zlib

import pytest
import torch

from kernels import backend
from kernels import linear_ppo_loss, linear_ppo_loss_torch, linear_token_logprobs, ppo_loss, token_logprobs

LP = importlib.import_module("kernels.linear_ppo")
B = importlib.import_module("kernels.ppo_loss")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_EPS = 2.0**-8
KW = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0)  # the kernels take these from the caller: no defaults


@pytest.fixture(autouse=True)
def _small_chunks_and_kernels(monkeypatch):
    """Chunks of 8 rows on CPU, so every case with N > 8 crosses chunk boundaries (N is never a multiple);
    backend "auto" so the kernels run here whatever MEMRL_KERNELS says (the reference has its own test)."""
    if not backend.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(LP, "_FORCE_CHUNK_ROWS", 8 if DEVICE == "cpu" else None)
    prev = backend.get_backend()
    backend.set_backend("auto")
    yield
    backend.set_backend(prev)


def fresh(seed) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed if isinstance(seed, int) else zlib.crc32(str(seed).encode()))


def make_case(seed, N, H, V, dtype, vv=None, old="near", ref="near", mask_p=0.8, logit_scale=2.0):
    """Random inputs with old/ref near the true log-probs so every clip branch and KL value is exercised
    at realistic sizes (old within ±0.4: outside the [0.8, 1.28] band for some tokens)."""
    g = fresh(seed)
    vv = V if vv is None else vv
    hidden = torch.randn(N, H, generator=g, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=DEVICE) * (logit_scale / H**0.5)).to(dtype)
    targets = torch.randint(0, vv, (N,), generator=g, device=DEVICE)
    adv = torch.randn(N, generator=g, device=DEVICE)
    mask = torch.rand(N, generator=g, device=DEVICE) < mask_p
    with torch.no_grad():  # the true log-probs, in row chunks (the GPU shapes are large)
        lt = torch.cat([torch.log_softmax(hidden[r:r + 1024].double() @ weight[:vv].double().t(), -1)
                        .gather(1, targets[r:r + 1024, None])[:, 0] for r in range(0, N, 1024)])
    old_logp = (lt + 0.8 * (torch.rand(N, generator=g, device=DEVICE).double() - 0.5)).float() if old else None
    ref_logp = (lt + 0.6 * (torch.rand(N, generator=g, device=DEVICE).double() - 0.5)).float() if ref else None
    num_tokens = (mask.sum() + 3).float()  # the global count: more than this micro-batch's
    return dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, mask=mask, num_tokens=num_tokens,
                old_logp=old_logp, ref_logp=ref_logp, valid_vocab=None if vv == V else vv)


def reference64(case, T=1.0, kl_coef=0.0, kl_type="k3"):
    """fp64 logp, entropy, loss, metrics, dH, dW, and the |dz|@|W|, |dz|^T@|H| scales for the tolerances."""
    h, w = case["hidden"], case["weight"]
    vv = case["valid_vocab"] or w.shape[0]
    logits = (h @ w[:vv].t()).double().requires_grad_()  # the input-dtype logits the fused path sees
    log_p = torch.log_softmax(logits / T, -1)
    logp = log_p.gather(1, case["targets"][:, None])[:, 0]
    ent = -(log_p.exp() * log_p).sum(-1)
    f64 = (lambda t: None if t is None else t.double())
    loss, metrics = B.ppo_loss_torch(logp, f64(case["old_logp"]), f64(case["ref_logp"]), case["advantages"].double(),
                                     case["mask"], case["num_tokens"].double(), kl_coef=kl_coef, kl_type=kl_type, **KW)
    (dz,) = torch.autograd.grad(loss, logits)
    h64, w64 = h.double(), w[:vv].double()
    dw = torch.zeros(w.shape, dtype=torch.float64, device=DEVICE)
    dw[:vv] = dz.t() @ h64
    dw_scale = torch.zeros_like(dw)
    dw_scale[:vv] = dz.abs().t() @ h64.abs()
    return dict(logp=logp.detach(), ent=ent.detach(), loss=loss.detach(), metrics=metrics, dh=dz @ w64, dw=dw,
                dh_scale=dz.abs() @ w64.abs(), dw_scale=dw_scale)


def assert_close(got, want, tol, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = (got - want).abs()
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max |err| {err.max().item():.3e}, worst err/tol {worst:.2f}"


def grad_tol(dtype, ref, scale):
    top = ref.abs().max().item()
    if dtype == torch.float32:
        return 1e-5 * scale + 1e-6 * top + 1e-30
    return BF16_EPS * (ref.abs() + scale) + 1e-5 * top + 1e-30


def run(fn, case, T=1.0, kl_coef=0.0, kl_type="k3", with_entropy=False, scale=None):
    h = case["hidden"].detach().clone().requires_grad_()
    w = case["weight"].detach().clone().requires_grad_()
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    loss, metrics, logp, ent = fn(h, w, temperature=T, kl_coef=kl_coef, kl_type=kl_type, with_entropy=with_entropy,
                                  **KW, **args)
    (loss if scale is None else loss * scale).backward()
    return dict(loss=loss.detach(), metrics=metrics, logp=logp, ent=ent, dh=h.grad, dw=w.grad)


def check_vs_ref(out, ref, dtype, case, kl_coef, kl_type, with_entropy=False):
    assert out["logp"].dtype == torch.float32 and not out["logp"].requires_grad
    assert_close(out["logp"], ref["logp"], 1e-5 + 1e-5 * ref["logp"].abs(), "logp")
    if with_entropy:
        assert not out["ent"].requires_grad
        assert_close(out["ent"], ref["ent"], 1e-5 + 1e-5 * ref["ent"].abs(), "entropy")
    assert_close(out["loss"], ref["loss"], 1e-6 + 1e-4 * ref["loss"].abs(), "loss")
    for k in ("ppo_kl", "kl"):
        assert_close(out["metrics"][k], ref["metrics"][k], 1e-6 + 1e-4 * ref["metrics"][k].abs(), k)
    # clip fractions are counts: they must equal kernel B's on the returned logp (same inputs, bit for bit)
    _, m_b = ppo_loss(out["logp"], case["old_logp"], case["ref_logp"], case["advantages"], case["mask"],
                      case["num_tokens"], kl_coef=kl_coef, kl_type=kl_type, **KW)
    for k in B.METRIC_NAMES:
        assert torch.equal(out["metrics"][k], m_b[k]), k
    assert out["dh"].dtype == dtype and out["dw"].dtype == dtype
    assert_close(out["dh"], ref["dh"], grad_tol(dtype, ref["dh"], ref["dh_scale"]), "dH")
    assert_close(out["dw"], ref["dw"], grad_tol(dtype, ref["dw"], ref["dw_scale"]), "dW")


CASES = [  # (dtype, V, valid_vocab, T, old, ref, kl_type, kl_coef, with_entropy)
    (torch.float32, 1000, None, 1.0, "near", None, "k3", 0.0, False),
    (torch.float32, 1003, 1000, 0.7, "near", "near", "k3", 0.1, True),
    (torch.float32, 1000, None, 1.0, None, "near", "k1", 0.5, False),
    (torch.bfloat16, 1000, None, 1.0, "near", "near", "k2", 0.3, False),
    (torch.bfloat16, 1003, 1000, 0.7, None, None, "k3", 0.0, True),
    (torch.bfloat16, 1003, None, 0.7, "near", "near", "k3", 0.2, False),
]


@pytest.mark.parametrize("dtype,V,vv,T,old,ref,kl_type,kl_coef,ent", CASES)
def test_matches_fp64(dtype, V, vv, T, old, ref, kl_type, kl_coef, ent):
    case = make_case(("fp64", str(dtype), V, vv, T, old, ref, kl_type), 21, 48, V, dtype, vv, old, ref)
    out = run(linear_ppo_loss, case, T, kl_coef, kl_type, with_entropy=ent)
    check_vs_ref(out, reference64(case, T, kl_coef, kl_type), dtype, case, kl_coef, kl_type, ent)


def test_torch_reference_matches_fp64():
    case = make_case("torchref", 13, 32, 1003, torch.float32, 1000)
    out = run(linear_ppo_loss_torch, case, 0.7, 0.1, "k3", with_entropy=True)
    check_vs_ref(out, reference64(case, 0.7, 0.1, "k3"), torch.float32, case, 0.1, "k3", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_unfused_kernels(dtype):
    """Same numbers as the unfused kernels: A (on the same input-dtype logits) + B; and, in fp32, A' + B."""
    case = make_case(("unfused", str(dtype)), 19, 48, 1003, dtype, 1000)
    T, kw = 0.7, dict(kl_coef=0.1, kl_type="k3", **KW)
    out = run(linear_ppo_loss, case, T, 0.1, "k3")
    h = case["hidden"].detach().clone().requires_grad_()
    w = case["weight"].detach().clone().requires_grad_()
    logp, _ = token_logprobs(h @ w.t(), case["targets"], T, valid_vocab=1000)
    loss, metrics = ppo_loss(logp, case["old_logp"], case["ref_logp"], case["advantages"], case["mask"],
                             case["num_tokens"], **kw)
    loss.backward()
    assert_close(out["logp"], logp, 1e-6 + 1e-6 * logp.abs(), "logp vs A")
    assert_close(out["loss"], loss, 1e-6 + 1e-5 * loss.abs(), "loss vs A+B")
    ref = reference64(case, T, 0.1, "k3")
    assert_close(out["dh"], h.grad, grad_tol(dtype, ref["dh"], ref["dh_scale"]), "dH vs A+B")
    assert_close(out["dw"], w.grad, grad_tol(dtype, ref["dw"], ref["dw_scale"]), "dW vs A+B")
    if dtype == torch.float32:  # A' keeps fp32 logits: equal to the fused path up to fp32 rounding
        h.grad = w.grad = None
        logp2, _ = linear_token_logprobs(h, w, case["targets"], T, valid_vocab=1000)
        loss2, _ = ppo_loss(logp2, case["old_logp"], case["ref_logp"], case["advantages"], case["mask"],
                            case["num_tokens"], **kw)
        loss2.backward()
        assert_close(out["loss"], loss2, 1e-6 + 1e-5 * loss2.abs(), "loss vs A'+B")
        assert_close(out["dh"], h.grad, grad_tol(dtype, ref["dh"], ref["dh_scale"]), "dH vs A'+B")
        assert_close(out["dw"], w.grad, grad_tol(dtype, ref["dw"], ref["dw_scale"]), "dW vs A'+B")


@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_dw_gemm_implementations(monkeypatch, impl):
    """GEMM 3 both ways (Triton fp32-accumulating kernel; cuBLAS addmm with an fp32 output, CPU stand-in)."""
    if impl == "cublas" and DEVICE == "cuda" and not LP._cublas_f32_ok(torch.device(DEVICE)):
        pytest.skip("torch.addmm(..., out_dtype=float32) not available in this torch")
    monkeypatch.setattr(LP, "_DW_IMPL", impl)
    case = make_case(("dw", impl), 20, 40, 1000, torch.bfloat16)
    out = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
    check_vs_ref(out, reference64(case, 1.0, 0.1, "k3"), torch.bfloat16, case, 0.1, "k3")


def test_n1_and_fully_masked():
    case = make_case("n1", 1, 32, 1003, torch.bfloat16, 1000, mask_p=1.0)
    case["num_tokens"] = torch.tensor(1.0, device=DEVICE)
    out = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
    check_vs_ref(out, reference64(case, 1.0, 0.1, "k3"), torch.bfloat16, case, 0.1, "k3")
    for num in (0.0, 5.0):  # nothing to train on: loss, metrics and both gradients exactly 0
        case = make_case(("masked", num), 11, 32, 1000, torch.float32, mask_p=0.0)
        case["num_tokens"] = torch.tensor(num, device=DEVICE)
        out = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
        assert out["loss"].item() == 0.0 and all(v.item() == 0.0 for v in out["metrics"].values())
        assert torch.isfinite(out["logp"]).all()
        assert not out["dh"].any() and not out["dw"].any()


def test_microbatches_sum_to_one_call():
    case = make_case("micro", 23, 32, 1000, torch.float32)
    whole = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
    parts = []
    for sl in (slice(0, 9), slice(9, 23)):
        sub = {k: (v[sl] if isinstance(v, torch.Tensor) and k not in ("weight", "num_tokens") else v)
               for k, v in case.items()}
        parts.append(run(linear_ppo_loss, sub, 1.0, 0.1, "k3"))
    assert_close(parts[0]["loss"] + parts[1]["loss"], whole["loss"], 1e-6 + 1e-5 * whole["loss"].abs(), "loss")
    for k in B.METRIC_NAMES:
        want = whole["metrics"][k]
        assert_close(parts[0]["metrics"][k] + parts[1]["metrics"][k], want, 1e-6 + 1e-5 * want.abs(), k)
    assert_close(torch.cat([parts[0]["dh"], parts[1]["dh"]]), whole["dh"], 1e-6 * whole["dh"].abs().max() + 1e-30, "dH")
    assert_close(parts[0]["dw"] + parts[1]["dw"], whole["dw"], 1e-6 * whole["dw"].abs().max() + 1e-30, "dW")


def test_deterministic_grad_output_no_grad_and_frozen_weight():
    case = make_case("det", 19, 32, 1003, torch.bfloat16, 1000)
    a = run(linear_ppo_loss, case, 0.7, 0.1, "k2")
    b = run(linear_ppo_loss, case, 0.7, 0.1, "k2")
    for k in ("loss", "logp", "dh", "dw"):
        assert torch.equal(a[k], b[k]), f"{k} not bitwise equal across calls"
    # backward only scales the stashed gradients by grad_output
    c = run(linear_ppo_loss, case, 0.7, 0.1, "k2", scale=3.0)
    want_dh, want_dw = (a["dh"].float() * 3).to(torch.bfloat16), (a["dw"].float() * 3).to(torch.bfloat16)
    assert torch.equal(c["dh"], want_dh) and torch.equal(c["dw"], want_dw)
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    with torch.no_grad():  # forward only: same loss and logp, no gradient work
        loss, _, logp, _ = linear_ppo_loss(case["hidden"], case["weight"], temperature=0.7, kl_coef=0.1,
                                           kl_type="k2", **KW, **args)
    assert torch.equal(loss, a["loss"]) and torch.equal(logp, a["logp"])
    h = case["hidden"].detach().clone().requires_grad_()
    loss, *_ = linear_ppo_loss(h, case["weight"], temperature=0.7, kl_coef=0.1, kl_type="k2", **KW, **args)
    loss.backward()
    assert torch.equal(h.grad, a["dh"])
    with pytest.raises(RuntimeError, match="twice"):
        h2 = case["hidden"].detach().clone().requires_grad_()
        loss, *_ = linear_ppo_loss(h2, case["weight"], temperature=0.7, kl_coef=0.1, kl_type="k2", **KW,
                                   **args)
        loss.backward(retain_graph=True)
        loss.backward()


def test_chunk_size_changes_nothing_but_rounding(monkeypatch):
    case = make_case("chunks", 21, 32, 1000, torch.float32)
    a = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
    monkeypatch.setattr(LP, "_FORCE_CHUNK_ROWS", None)  # one chunk (from the byte budget)
    b = run(linear_ppo_loss, case, 1.0, 0.1, "k3")
    assert_close(a["loss"], b["loss"], 1e-6 + 1e-6 * b["loss"].abs(), "loss")
    assert_close(a["dw"], b["dw"], 1e-6 * b["dw"].abs().max() + 1e-30, "dW")
    assert LP._chunk_rows(151_936, 2) == 2048  # the real shape: 594 MiB of bf16 logits per chunk


def test_dispatch_follows_backend(monkeypatch):
    case = make_case("dispatch", 5, 16, 1000, torch.float32)
    calls = []
    monkeypatch.setattr(LP, "linear_ppo_loss_torch", lambda *a, **k: calls.append("torch"))
    monkeypatch.setattr(LP, "linear_ppo_loss_triton", lambda *a, **k: calls.append("triton"))
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    prev = backend.get_backend()
    try:
        backend.set_backend("torch")
        LP.linear_ppo_loss(case["hidden"], case["weight"], kl_type="k3", **KW, **args)
        backend.set_backend("auto")
        LP.linear_ppo_loss(case["hidden"], case["weight"], kl_type="k3", **KW, **args)
    finally:
        backend.set_backend(prev)
    assert calls == ["torch", "triton" if backend.HAS_TRITON else "torch"]


# --------------------------------------------------------------------------------------------------------------
# Real shapes on a GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dw_impl", ["auto", "triton"])
def test_gpu_real_shape(monkeypatch, dw_impl):
    """N=4,096, V=151,936, H=1,536 bf16 vs fp64: logp/dH on 2×64 rows, loss, metrics, and dW (all rows)."""
    monkeypatch.setattr(LP, "_DW_IMPL", dw_impl)
    N, H, V, T = 4096, 1536, 151_936, 0.7
    case = make_case("gpu", N, H, V, torch.bfloat16, logit_scale=2.5)
    out = run(linear_ppo_loss, case, T, 1e-3, "k3", with_entropy=True)
    h, w = case["hidden"], case["weight"]
    rows = torch.cat([torch.arange(64), torch.arange(N - 64, N)]).to(DEVICE)
    w64 = w.double()
    # fp64 reference in row chunks (dz needs the loss gradient: dloss/dlogp is elementwise, from the fp64 logp)
    dw64 = torch.zeros(V, H, dtype=torch.float64, device=DEVICE)
    dws = torch.zeros_like(dw64)
    logp64, dz_rows = [], {}
    # the reference's logits in the kernel's row chunks: the same cuBLAS shape, so the same bf16 logits
    C = LP._chunk_rows(V, 2)
    for r0 in range(0, N, C):
        sl = slice(r0, r0 + C)
        logits = (h[sl] @ w.t()).double() / T
        lp = torch.log_softmax(logits, -1)
        logp64.append(lp.gather(1, case["targets"][sl, None])[:, 0])
    logp64 = torch.cat(logp64)
    lp_var = logp64.clone().requires_grad_()
    loss64, met64 = B.ppo_loss_torch(lp_var, case["old_logp"].double(), case["ref_logp"].double(),
                                     case["advantages"].double(), case["mask"], case["num_tokens"].double(),
                                     kl_coef=1e-3, kl_type="k3", **KW)
    (g64,) = torch.autograd.grad(loss64, lp_var)
    for r0 in range(0, N, C):
        sl = slice(r0, r0 + C)
        logits = (h[sl] @ w.t()).double() / T
        p = torch.softmax(logits, -1)
        dz = -g64[sl, None] * p
        dz[torch.arange(dz.shape[0], device=DEVICE), case["targets"][sl]] += g64[sl]
        dz /= T
        dw64 += dz.t() @ h[sl].double()
        dws += dz.abs().t() @ h[sl].double().abs()
        for r in rows.tolist():
            if r0 <= r < r0 + C:
                dz_rows[r] = dz[r - r0]
        del logits, p, dz
    dz_r = torch.stack([dz_rows[r] for r in rows.tolist()])
    dh64, dhs = dz_r @ w64, dz_r.abs() @ w64.abs()
    assert_close(out["logp"], logp64, 1e-5 + 1e-5 * logp64.abs(), "logp")
    assert_close(out["loss"], loss64, 1e-6 + 1e-4 * loss64.abs(), "loss")
    for k in ("ppo_kl", "kl"):
        assert_close(out["metrics"][k], met64[k], 1e-6 + 1e-4 * met64[k].abs(), k)
    assert_close(out["dh"][rows], dh64, grad_tol(torch.bfloat16, dh64, dhs), "dH rows")
    assert_close(out["dw"], dw64, grad_tol(torch.bfloat16, dw64, dws), "dW")


@pytest.mark.gpu
def test_gpu_memory_budget():
    """Peak extra memory of forward + backward at N=16,384, H=1,536, V=151,936 bf16 within 1.8 GiB."""
    N, H, V = 16_384, 1536, 151_936
    case = make_case("gpumem", N, H, V, torch.bfloat16)
    h = case["hidden"].requires_grad_()
    w = case["weight"].requires_grad_()
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    loss, *_ = linear_ppo_loss(h, w, kl_coef=1e-3, kl_type="k3", **KW, **args)  # warm-up (compiles)
    loss.backward()
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, *_ = linear_ppo_loss(h, w, kl_coef=1e-3, kl_type="k3", **KW, **args)
    loss.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert extra <= 1.8, f"peak extra memory {extra:.2f} GiB > 1.8 GiB"


# ---- the no-grad scoring path that shares linear_ppo_loss's numerics ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_is_bitwise_the_training_logp_and_matches_fp64(dtype, monkeypatch):
    from kernels.linear_ppo import linear_token_logprobs_scoring

    monkeypatch.setattr(importlib.import_module("kernels.linear_ppo"), "_FORCE_CHUNK_ROWS", 8)  # several chunks and a short last one
    g = torch.Generator().manual_seed(4242)
    N, H, V, VV = 21, 32, 1003, 1000
    hidden = (torch.randn(N, H, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, VV, (N,), generator=g)
    adv, mask = torch.randn(N, generator=g), torch.ones(N, dtype=torch.bool)
    _, _, logp_train, ent_train = linear_ppo_loss(hidden, weight, targets, adv, mask, mask.sum(), temperature=0.7,
                                                  valid_vocab=VV, with_entropy=True, kl_type="k3", **KW)
    logp, ent = linear_token_logprobs_scoring(hidden, weight, targets, 0.7, with_entropy=True, valid_vocab=VV)
    assert torch.equal(logp, logp_train) and torch.equal(ent, ent_train)
    # against float64 from the same (input-dtype) logits
    z = (hidden @ weight.T)[:, :VV].double() / 0.7
    want = z.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(logp.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_scoring_same_rows_bitwise_for_any_n():
    """Zero-padded full-chunk GEMMs: a row's logp does not depend on N or on where the row sits."""
    from kernels.linear_ppo import linear_token_logprobs_scoring

    g = torch.Generator(device="cuda").manual_seed(7)
    N, H, V = 5000, 1536, 151_936
    hidden = torch.randn(N, H, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    full, _ = linear_token_logprobs_scoring(hidden, weight, targets)
    part, _ = linear_token_logprobs_scoring(hidden[37:4100], weight, targets[37:4100])
    assert torch.equal(full[37:4100], part)
