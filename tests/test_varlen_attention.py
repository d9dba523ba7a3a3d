"""The packed varlen attention kernel (kernels/varlen_attn.py) against float64 per-sequence attention.

The reference is `varlen_attention_torch` on float64 copies of the SAME (bf16 / fp16 / fp32) inputs: a loop over
the sequences, each a plain causal softmax(QK^T/sqrt(D))V, so what remains is the kernel's arithmetic. Tolerances:
- fp32: the worst-case bound of an fp32 sum of n terms, n * 2^-24 relative to the sum of magnitudes (Higham,
  Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1), with n the longest reduction here (a 500-key
  softmax-weighted sum, then 64-128 products): 3e-5 of the largest |value|.
- bf16 / fp16: each value is rounded to the input dtype once on output (2^-8 / 2^-11 relative) and, on the GPU, the
  probabilities and dS are rounded to it before their matmuls (as every flash kernel does), adding one such
  rounding of the summed terms: the error norm stays below 2 roundings of the reference norm, 2^-7 / 2^-10.
On CPU the kernel runs in Triton's interpreter (tests/conftest.py); with a GPU the same tests run compiled, and the
@gpu tests add the real shapes (16k-token micro-batches, Qwen2.5-1.5B and 0.5B heads).
"""
import random

import pytest
import torch

import kernels
from kernels import backend
from kernels.varlen_attn import (LAUNCHES, varlen_attention, varlen_attention_torch, varlen_attention_triton,
                                      varlen_tiles)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def uneven_lengths(seed: int, total: int) -> list[int]:
    """Lengths from 1 to 500 tokens, very uneven: a long-tailed mix of single tokens, short turns and long prompts."""
    rng = random.Random(seed)
    lengths = [500, 1]  # both extremes in every batch
    while sum(lengths) < total:
        lengths.append(rng.choice([1, rng.randint(2, 40), rng.randint(40, 200), rng.randint(200, 500)]))
    rng.shuffle(lengths)
    return lengths


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def make_inputs(seed, lengths, hq, hkv, d, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    T = sum(lengths)
    q, k, v, dout = (torch.randn(T, h, d, generator=g, device=DEVICE).to(dtype) for h in (hq, hkv, hkv, hq))
    return q, k, v, dout


def run(fn, q, k, v, dout, cu):
    """out and (dq, dk, dv) of `fn` for the loss sum(out * dout)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, cu)
    out.backward(dout)
    return out.detach(), [x.grad for x in leaves]


def reference(q, k, v, dout, cu):
    return run(varlen_attention_torch, q.double(), k.double(), v.double(), dout.double(), cu)


def check(got, want, dtype, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape and torch.isfinite(got).all(), what
    err = (got - want).abs()
    if dtype == torch.float32:
        bound = 3e-5 * want.abs().max().item()
        assert err.max().item() <= bound, f"{what}: max |err| {err.max().item():.3e} > {bound:.3e}"
    else:
        rel = (err.norm() / want.norm()).item()
        bound = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        assert rel <= bound, f"{what}: relative error {rel:.3e} > {bound:.3e}"


# seed, packed tokens, Hq, Hkv, head_dim, dtype: uneven lengths 1..500 in every case, GQA groups 2, 3 and 1
CASES = [
    (0, 1000, 4, 2, 64, torch.float32),
    (1, 800, 6, 2, 64, torch.bfloat16),
    (2, 700, 4, 2, 128, torch.float16),
    (3, 600, 2, 2, 24, torch.float32),  # no GQA; head_dim 24 (padded to 32 inside the kernel)
]


@pytest.mark.parametrize("seed,total,hq,hkv,d,dtype", CASES)
def test_outputs_and_gradients_match_float64(seed, total, hq, hkv, d, dtype):
    lengths = uneven_lengths(seed, total)
    cu = cu_of(lengths)
    q, k, v, dout = make_inputs(seed, lengths, hq, hkv, d, dtype)
    out, grads = run(varlen_attention_triton, q, k, v, dout, cu)
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    ref_out, ref_grads = reference(q, k, v, dout, cu)
    check(out, ref_out, dtype, "out")
    for name, gr, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        check(gr, ref, dtype, name)


def test_reference_equals_one_sdpa_call_per_sequence():
    """The reference itself against torch's SDPA (causal), one call per sequence, GQA by repeat_interleave."""
    lengths = [5, 1, 33, 12]
    q, k, v, _ = make_inputs(7, lengths, 6, 2, 16, torch.float64)
    got = varlen_attention_torch(q, k, v, cu_of(lengths))
    start = 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1)[None] for x in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks.repeat_interleave(3, 1),
                                                                vs.repeat_interleave(3, 1), is_causal=True)
        torch.testing.assert_close(got[start:start + n], want[0].transpose(0, 1), rtol=1e-12, atol=1e-12)
        start += n


def test_bitwise_deterministic_and_scoring_equals_training_forward():
    lengths = [37, 1, 200, 64]
    cu = cu_of(lengths)
    q, k, v, dout = make_inputs(11, lengths, 4, 2, 64, torch.bfloat16)
    out1, grads1 = run(varlen_attention_triton, q, k, v, dout, cu)
    out2, grads2 = run(varlen_attention_triton, q, k, v, dout, cu)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)
    with torch.no_grad():  # the scoring pass runs the same forward kernel: bitwise the training forward
        assert torch.equal(varlen_attention_triton(q, k, v, cu), out1)


@pytest.mark.parametrize("lengths", [[1], [64], [500, 1, 1, 1], [1] * 12 + [300] + [7] * 6])
def test_one_forward_and_two_backward_launches_whatever_the_lengths(lengths):
    q, k, v, dout = make_inputs(3, lengths, 4, 2, 16, torch.float32)
    cu = cu_of(lengths)
    LAUNCHES.clear()
    out, _ = run(varlen_attention_triton, q, k, v, dout, cu)
    assert dict(LAUNCHES) == {"varlen_fwd": 1, "varlen_bwd_preprocess": 1, "varlen_bwd": 1}
    check(out, reference(q, k, v, dout, cu)[0], torch.float32, "out")


def test_tile_map_by_hand():
    """Lengths 1, 64, 65 in tiles of 64: sequence 0 has one tile, 1 one, 2 two (rows 0 and 64); the map's static
    size is cdiv(130, 64) + 3 = 6 and the unused entries say (3, 0): sequence S, no work."""
    tiles = varlen_tiles(torch.tensor([0, 1, 65, 130], dtype=torch.int32), 130, 64)
    assert tiles.tolist() == [[0, 1, 2, 2, 3, 3], [0, 0, 0, 64, 0, 0]]


def test_strided_inputs_as_the_model_passes_them():
    """q, k, v as views of one fused [T, (Hq + 2 Hkv) * D] projection (row stride > H * D), as in memrl/model.py."""
    lengths = [70, 3, 129]
    T, hq, hkv, d = sum(lengths), 4, 2, 16
    g = torch.Generator(device=DEVICE).manual_seed(5)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g, device=DEVICE)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    cu = cu_of(lengths)
    with torch.no_grad():
        check(varlen_attention_triton(q, k, v, cu), varlen_attention_torch(q.double(), k.double(), v.double(), cu),
              torch.float32, "out")


def test_backend_switch_and_float64():
    lengths = [9, 30]
    q, k, v, _ = make_inputs(2, lengths, 4, 2, 16, torch.float32)
    cu = cu_of(lengths)
    assert kernels.varlen_attention is varlen_attention
    LAUNCHES.clear()
    try:
        kernels.set_backend("torch")
        torch.testing.assert_close(varlen_attention(q, k, v, cu), varlen_attention_torch(q, k, v, cu), rtol=0, atol=0)
    finally:
        kernels.set_backend("auto")
    assert not LAUNCHES
    got = varlen_attention(q.double(), k.double(), v.double(), cu)  # float64 always takes the reference
    assert got.dtype == torch.float64 and not LAUNCHES
    if backend.use_triton(q):
        varlen_attention(q, k, v, cu)
        assert LAUNCHES["varlen_fwd"] == 1


# ----------------------------------------------------------------------------------------------------------
# GPU: real shapes


def realistic_lengths(seed: int, total: int = 16384) -> list[int]:
    """Turn records as pack_turns sees them: a prompt of 100-700 tokens plus a memory turn (mean ~55, ~3% cut at
    256) or an answer (mean ~150, tail to 512); see benchmarks/bench_attention.py."""
    from benchmarks.bench_attention import realistic_micro_batch

    return realistic_micro_batch(random.Random(seed), total)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(12, 2, 128), (14, 2, 64), (16, 8, 128)])
def test_gpu_real_shapes_match_float64(hq, hkv, d):
    lengths = realistic_lengths(hq + d)
    cu = cu_of(lengths)
    q, k, v, dout = make_inputs(hq, lengths, hq, hkv, d, torch.bfloat16)
    out, grads = run(varlen_attention_triton, q, k, v, dout, cu)
    ref_out, ref_grads = reference(q, k, v, dout, cu)
    check(out, ref_out, torch.bfloat16, "out")
    for name, gr, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        check(gr, ref, torch.bfloat16, name)
    out2, grads2 = run(varlen_attention_triton, q, k, v, dout, cu)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
