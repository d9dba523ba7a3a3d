"""Kernel B (kernels/ppo_loss.py): the fused token-mean dual-clip PPO + KL loss.

Checked against a case computed by hand from DESIGN.md §5, a plain-Python float64 loop written
independently of both implementations, and the float64 PyTorch reference; on both backends (Triton
runs under TRITON_INTERPRET=1 on CPU, see conftest.py).
"""
import math

import pytest
import torch

from kernels import get_backend, ppo_loss, ppo_loss_torch, set_backend
from kernels.backend import HAS_TRITON, interpreter_on, use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (DEVICE == "cuda" or interpreter_on()) else [])
METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl")
# the kernels take every loss hyperparameter from the caller (no defaults): the tests' unless a test says otherwise
CLIPS = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_type="k3")


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = get_backend()
    set_backend(request.param)
    yield request.param
    set_backend(previous)


def run(logp, old, ref, adv, mask, num_tokens, **kw):
    """loss, metrics (floats) and dlogp of one ppo_loss call on the current backend."""
    logp = logp.detach().clone().to(DEVICE).requires_grad_(True)
    to = (lambda t: None if t is None else t.to(DEVICE))
    loss, metrics = ppo_loss(logp, to(old), to(ref), to(adv), to(mask), to(num_tokens), **(CLIPS | kw))
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    return loss.item(), {k: v.item() for k, v in metrics.items()}, logp.grad.cpu()


# ----------------------------------------------------------------------------- hand-computed case
# eps_low 0.2, eps_high 0.28 (band [0.8, 1.28]), c = 3, beta = 0.1, k3, num_tokens = 5 (token 5 is masked).
#   token  logp   old    d=logp-old  rho=e^d    A     pg1=-A*rho  pg2=-A*clip(rho)  pg        branch
#   0      -1.0   -1.5    0.5        1.6487213  +1    -1.6487213  -1.28             -1.28     clip high (pg2>pg1)
#   1      -2.0   -1.5   -0.5        0.6065307  -2     1.2130613   1.6               1.6      clip low (pg2>pg1)
#   2      -0.5   -2.0    1.5        4.4816891  -1     4.4816891   1.28              3.0      dual: min(4.48, -cA=3)
#   3      -1.5   -1.6    0.1        1.1051709  +0.5  -0.5525855  -0.5525855        -0.5525855 inside the band
#   4      -0.8   -1.2    0.4        1.4918247  -1     1.4918247   1.28              1.4918247 A<0, rho>1.28: unclipped
#   5      -3.0  -10.0    7.0        1096.63     +5   (masked: contributes nothing)
# KL, k = ref - logp:  k = [0.2, -0.3, 0, 0.5, -0.1, (1.0)]
#   k3 = e^k - k - 1 = [0.0214028, 0.0408182, 0, 0.1487213, 0.0048374]           sum 0.2157797
# loss = (sum pg + beta * sum k3) / 5 = (4.2592392 + 0.1 * 0.2157797) / 5 = 0.8561634
# pg_clipfrac = 2/5 (tokens 0, 1); pg_clipfrac_lower = 1/5 (token 2);
# ppo_kl = sum(-d)/5 = -(0.5 - 0.5 + 1.5 + 0.1 + 0.4)/5 = -0.4;  kl = 0.2157797/5 = 0.0431559
# dlogp = m * (dpg + beta * dk3) / 5 with dpg = -A*rho on the unclipped branch only and dk3/dlogp = 1 - e^k:
#   0: (0 + 0.1*(1-1.2214028))/5 = -0.0044281      1: (0 + 0.1*(1-0.7408182))/5 = 0.0051836
#   2: (0 + 0.1*0)/5 = 0                             3: (-0.5525855 + 0.1*(1-1.6487213))/5 = -0.1234915
#   4: (1.4918247 + 0.1*(1-0.9048374))/5 = 0.3002682 5: masked -> 0
HAND_LOGP = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.8, -3.0])
HAND_OLD = torch.tensor([-1.5, -1.5, -2.0, -1.6, -1.2, -10.0])
HAND_K = torch.tensor([0.2, -0.3, 0.0, 0.5, -0.1, 1.0])
HAND_ADV = torch.tensor([1.0, -2.0, -1.0, 0.5, -1.0, 5.0])
HAND_MASK = torch.tensor([True, True, True, True, True, False])


def test_hand_computed_case(backend):
    loss, metrics, dlogp = run(HAND_LOGP, HAND_OLD, HAND_LOGP + HAND_K, HAND_ADV, HAND_MASK, torch.tensor(5),
                               eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.1, kl_type="k3")
    assert loss == pytest.approx(0.8561634, abs=2e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(0.4, abs=1e-7)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(0.2, abs=1e-7)
    assert metrics["ppo_kl"] == pytest.approx(-0.4, abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.0431559, abs=1e-6)
    expected = torch.tensor([-0.0044281, 0.0051836, 0.0, -0.1234915, 0.3002682, 0.0])
    torch.testing.assert_close(dlogp, expected, atol=2e-6, rtol=0)
    assert dlogp[5] == 0.0 and dlogp[2] == 0.0


# k1 = -k, k2 = k^2/2 on the same tokens with A = 0 (pg = 0) and beta = 1, so loss = mean KL:
#   k1: loss = -(0.2 - 0.3 + 0 + 0.5 - 0.1)/5 = -0.06;  dk1/dlogp = +1       -> dlogp = 0.2 per live token
#   k2: loss = (0.04 + 0.09 + 0 + 0.25 + 0.01)/2/5 = 0.039;  dk2/dlogp = -k -> dlogp = -k/5
#   k3: loss = 0.2157797/5 = 0.0431559;  dk3/dlogp = 1 - e^k
@pytest.mark.parametrize("kl_type, loss_expected, dlogp_expected", [
    ("k1", -0.06, [0.2, 0.2, 0.2, 0.2, 0.2, 0.0]),
    ("k2", 0.039, [-0.04, 0.06, 0.0, -0.1, 0.02, 0.0]),
    ("k3", 0.0431559, [-0.0442806, 0.0518364, 0.0, -0.1297443, 0.0190325, 0.0]),
])
def test_kl_estimators_by_hand(backend, kl_type, loss_expected, dlogp_expected):
    loss, metrics, dlogp = run(HAND_LOGP, HAND_OLD, HAND_LOGP + HAND_K, torch.zeros(6), HAND_MASK, torch.tensor(5.0),
                               kl_coef=1.0, kl_type=kl_type)
    assert loss == pytest.approx(loss_expected, abs=2e-6)
    assert metrics["kl"] == pytest.approx(loss_expected, abs=2e-6)
    torch.testing.assert_close(dlogp, torch.tensor(dlogp_expected), atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- random inputs vs float64
def naive_reference(logp, old, ref, adv, mask, num_tokens, eps_low, eps_high, clip_c, kl_coef, kl_type,
                    pg_weight=None):
    """DESIGN.md §5 token by token in Python floats (float64); returns loss, metrics, dlogp. pg_weight: the rollout
    correction's per-token weight w on the policy-gradient term (loss m·(w·pg + β·kl))."""
    clamp = (lambda x: min(max(x, -20.0), 20.0))
    denom = num_tokens if num_tokens != 0 else 1.0
    total = {"loss": 0.0, **{k: 0.0 for k in METRICS}}
    dlogp = []
    weights = pg_weight if pg_weight is not None else [1.0] * len(logp)
    for lp, o, r, a, m, w in zip(logp, old, ref, adv, mask, weights):
        if m == 0:
            dlogp.append(0.0)
            continue
        raw_d = lp - o
        d = clamp(raw_d)
        rho = math.exp(d)
        pg1, pg2 = -a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high)
        pg = max(pg1, pg2)
        dual = a < 0 and pg > -clip_c * a
        grad_pg = -a * rho if (pg1 >= pg2 and not dual and -20 <= raw_d <= 20) else 0.0
        if dual:
            pg = -clip_c * a
        raw_k = r - lp
        k = clamp(raw_k)
        kl, dkl = {"k1": (-k, 1.0), "k2": (0.5 * k * k, -k), "k3": (math.exp(k) - k - 1, 1 - math.exp(k))}[kl_type]
        dkl = dkl if -20 <= raw_k <= 20 else 0.0
        total["loss"] += m * (w * pg + kl_coef * kl)
        total["pg_clipfrac"] += m * (pg2 > pg1)
        total["pg_clipfrac_lower"] += m * dual
        total["ppo_kl"] += m * -d
        total["kl"] += m * kl
        dlogp.append(m * (w * grad_pg + kl_coef * dkl) / denom)
    return {k: v / denom for k, v in total.items()}, torch.tensor(dlogp, dtype=torch.float64)


def random_inputs(n: int, seed: int, float_mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g) * 4
    d = torch.randn(n, generator=g) * 0.6  # |d| ~ 0.6: every branch is hit many times
    d[: n // 50] = torch.randn(n // 50, generator=g) * 30  # some beyond the +-20 clamp
    old = logp - d
    ref = logp + torch.randn(n, generator=g) * 0.4
    adv = torch.randn(n, generator=g)
    adv[torch.rand(n, generator=g) < 0.05] = 0.0
    if float_mask:
        mask = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.8)
    else:
        mask = torch.rand(n, generator=g) < 0.8
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("float_mask", [False, True])
def test_matches_naive_float64_loop(backend, kl_type, float_mask):
    logp, old, ref, adv, mask = random_inputs(777, seed=1, float_mask=float_mask)
    num_tokens = float(mask.float().sum()) + 13.0  # a global count larger than this call's (micro-batch)
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.05, kl_type=kl_type)
    loss, metrics, dlogp = run(logp, old, ref, adv, mask, torch.tensor(num_tokens), **kw)
    ref_metrics, ref_dlogp = naive_reference(logp.double().tolist(), old.double().tolist(), ref.double().tolist(),
                                             adv.double().tolist(), mask.double().tolist(), num_tokens, **kw)
    assert ref_metrics["pg_clipfrac"] > 0.1 and ref_metrics["pg_clipfrac_lower"] > 0.005  # branches really hit
    assert loss == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    for k in METRICS:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(dlogp.double(), ref_dlogp, rtol=1e-5, atol=1e-7)


def test_pg_weight_matches_naive_float64_loop(backend):
    """The rollout-correction weight w multiplies the pg term only (not the KL, not the clip counts)."""
    logp, old, ref, adv, mask = random_inputs(900, seed=8)
    g = torch.Generator().manual_seed(8)
    weight = (torch.rand(900, generator=g) * 2.5).clamp(max=2.0)  # a truncated IS weight in [0, C = 2]
    weight[~mask] = float("nan")  # a masked token's weight is never read
    num_tokens = float(mask.sum()) + 5.0
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.05, kl_type="k3")
    loss, metrics, dlogp = run(logp, old, ref, adv, mask, torch.tensor(num_tokens), pg_weight=weight, **kw)
    ref_metrics, ref_dlogp = naive_reference(logp.double().tolist(), old.double().tolist(), ref.double().tolist(),
                                             adv.double().tolist(), mask.double().tolist(), num_tokens, **kw,
                                             pg_weight=weight.double().tolist())
    assert loss == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    for k in METRICS:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(dlogp.double(), ref_dlogp, rtol=1e-5, atol=1e-7)
    unweighted = run(logp, old, ref, adv, mask, torch.tensor(num_tokens), **kw)
    assert unweighted[0] != pytest.approx(loss, rel=1e-3)  # the weight did change the loss
    ones = run(logp, old, ref, adv, mask, torch.tensor(num_tokens), pg_weight=torch.ones(900), **kw)
    assert ones[0] == unweighted[0] and ones[1] == unweighted[1] and torch.equal(ones[2], unweighted[2])


@pytest.mark.parametrize("with_old, with_ref", [(True, True), (False, True), (True, False)])
def test_matches_float64_torch_reference(backend, with_old, with_ref):
    logp, old, ref, adv, mask = random_inputs(5000, seed=2)
    old, ref = (old if with_old else None), (ref if with_ref else None)
    num_tokens = mask.sum()
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.01, kl_type="k3")
    loss, metrics, dlogp = run(logp, old, ref, adv, mask, num_tokens, **kw)
    logp64 = logp.double().requires_grad_(True)
    f64 = (lambda t: None if t is None else t.double())
    loss64, metrics64 = ppo_loss_torch(logp64, f64(old), f64(ref), adv.double(), mask, num_tokens, **kw)
    loss64.backward()
    assert loss == pytest.approx(loss64.item(), rel=1e-5, abs=1e-6)
    for k in METRICS:
        assert metrics[k] == pytest.approx(metrics64[k].item(), rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(dlogp.double(), logp64.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- edge cases
def test_on_policy_ratio_is_exactly_one(backend):
    logp, _, ref, adv, mask = random_inputs(1000, seed=3)
    n = mask.sum()
    loss_none, metrics_none, dlogp_none = run(logp, None, ref, adv, mask, n, kl_coef=0.0)
    loss_same, metrics_same, dlogp_same = run(logp, logp.clone(), ref, adv, mask, n, kl_coef=0.0)
    # ratio == 1: no clipping, ppo_kl 0, loss = mean(-A), and the gradient -A*rho = -A still flows
    assert metrics_none["pg_clipfrac"] == 0.0 and metrics_none["pg_clipfrac_lower"] == 0.0
    assert metrics_none["ppo_kl"] == 0.0
    assert loss_none == loss_same and torch.equal(dlogp_none, dlogp_same)
    expected = torch.where(mask, -adv, 0.0) / n
    assert loss_none == pytest.approx(float(expected.double().sum()), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(dlogp_none, expected, rtol=1e-6, atol=0)
    assert dlogp_none.abs().sum() > 0


def test_micro_batches_sum_to_one_call(backend):
    logp, old, ref, adv, mask = random_inputs(2500, seed=4)
    n = mask.sum()
    kw = dict(kl_coef=0.1, kl_type="k3")
    loss, metrics, dlogp = run(logp, old, ref, adv, mask, n, **kw)
    parts = [run(*(t[s] for t in (logp, old, ref, adv, mask)), n, **kw) for s in (slice(0, 700), slice(700, 1900),
                                                                                  slice(1900, 2500))]
    assert sum(p[0] for p in parts) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    for k in METRICS:
        assert sum(p[1][k] for p in parts) == pytest.approx(metrics[k], rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), dlogp, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("num_tokens", [0, 7])
def test_fully_masked(backend, num_tokens):
    logp, old, ref, adv, _ = random_inputs(300, seed=5)
    logp[::3] = float("nan")  # padding garbage must not leak through the mask
    old[1::3] = float("inf")
    loss, metrics, dlogp = run(logp, old, ref, adv, torch.zeros(300, dtype=torch.bool), torch.tensor(num_tokens),
                               kl_coef=0.1)
    assert loss == 0.0 and all(v == 0.0 for v in metrics.values())
    assert torch.equal(dlogp, torch.zeros(300))


def test_masked_garbage_is_ignored(backend):
    logp, old, ref, adv, mask = random_inputs(400, seed=6)
    clean = run(logp, old, ref, adv, mask, mask.sum(), kl_coef=0.1)
    dirty_logp, dirty_old = logp.clone(), old.clone()
    dirty_logp[~mask] = float("nan")
    dirty_old[~mask] = float("-inf")
    dirty = run(dirty_logp, dirty_old, ref, adv, mask, mask.sum(), kl_coef=0.1)
    assert dirty[0] == clean[0] and dirty[1] == clean[1] and torch.equal(dirty[2], clean[2])


def test_single_token(backend):
    logp, old, ref, adv = (torch.tensor([x]) for x in (-0.7, -1.1, -0.9, -0.4))  # A<0, rho=e^0.4: unclipped
    loss, metrics, dlogp = run(logp, old, ref, adv, torch.tensor([True]), torch.tensor(1), kl_coef=0.2)
    rho, k = math.exp(0.4), -0.2
    assert loss == pytest.approx(0.4 * rho + 0.2 * (math.exp(k) - k - 1), rel=1e-6)
    assert dlogp.item() == pytest.approx(0.4 * rho + 0.2 * (1 - math.exp(k)), rel=1e-6)
    assert metrics["ppo_kl"] == pytest.approx(-0.4, rel=1e-6)


def test_empty_and_deterministic(backend):
    empty = torch.zeros(0)
    loss, metrics, dlogp = run(empty, empty, empty, empty, torch.zeros(0, dtype=torch.bool), torch.tensor(0))
    assert loss == 0.0 and dlogp.numel() == 0
    logp, old, ref, adv, mask = random_inputs(9000, seed=7)
    a, b = (run(logp, old, ref, adv, mask, mask.sum(), kl_coef=0.1) for _ in range(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------- backend switch and arguments
def test_backend_switch(monkeypatch):
    previous = get_backend()
    x = torch.zeros(3)
    try:
        set_backend("torch")
        assert not use_triton(x)
        with pytest.raises(ValueError):
            set_backend("cuda")
        if HAS_TRITON:
            set_backend("triton")
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                use_triton(x)
            set_backend("auto")
            assert not use_triton(x)  # CPU tensors, no interpreter: the reference
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert use_triton(x, None)
    finally:
        set_backend(previous)


def test_argument_checks():
    x = torch.zeros(4)
    m = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="kl_type"):
        ppo_loss(x, None, None, x, m, torch.tensor(4), **(CLIPS | dict(kl_type="k4")))
    with pytest.raises(ValueError, match="clip_c"):
        ppo_loss(x, None, None, x, m, torch.tensor(4), **(CLIPS | dict(clip_c=1.0)))
    with pytest.raises(ValueError, match="shape"):
        ppo_loss(x, torch.zeros(3), None, x, m, torch.tensor(4), **CLIPS)
