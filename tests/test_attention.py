"""Packed-row attention (memrl/attention.py) and the model's packed forward under every backend.

The independent side is always per-sequence computation: each sequence run ALONE through the model (plain causal
SDPA, no packing at all), or, at the attention level, the dense block-diagonal mask. float64 throughout where the
backend runs in float64 (padded, dense, flex's eager forward; triton dispatches float64 to its reference), so
those agree to rounding (1e-10). The Triton kernel itself is checked in fp32 against the float64 per-sequence
forward (3e-5 of the largest value: the fp32 bound derived in tests/test_varlen_attention.py); flex has no
backward on CPU (torch raises), so its CPU check is forward only. The @gpu tests add flash and compiled flex.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from kernels.varlen_attn import LAUNCHES
from memrl import attention as A
from memrl.model import ModelConfig, Transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(dtype=torch.float64, layers=2, head_dim=16, seed=0):
    cfg = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim,
        "max_position_embeddings": 1024})
    torch.manual_seed(seed)
    model = Transformer(cfg).to(DEVICE, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else
                    torch.randn_like(p) * 0.1)
    return model


def uneven(seed: int, total: int) -> list[int]:
    """Lengths 1..500, both extremes always present."""
    rng = random.Random(seed)
    lengths = [500, 1]
    while sum(lengths) < total:
        lengths.append(rng.choice([1, rng.randint(2, 40), rng.randint(40, 200), rng.randint(200, 500)]))
    rng.shuffle(lengths)
    return lengths


def packed_inputs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None].to(DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(DEVICE)
    return seqs, ids, positions, seq_ids


def hidden_and_grads(model, run, weight):
    """Final hidden states of `run()` and the parameter gradients of sum(hidden * weight)."""
    model.zero_grad()
    hidden = run()
    (hidden * weight).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def per_sequence(model, seqs, weight):
    """Each sequence alone (no packing, plain causal attention), hidden states concatenated, gradients summed."""
    def run():
        return torch.cat([model(s[None].to(DEVICE), return_hidden=True)[0] for s in seqs])[None]
    return hidden_and_grads(model, run, weight)


def packed(model, backend, ids, positions, seq_ids, lengths, weight):
    model.attention = backend
    return hidden_and_grads(
        model, lambda: model(ids, positions=positions, seq_ids=seq_ids, seq_lengths=lengths, return_hidden=True),
        weight)


@pytest.mark.parametrize("backend", ["padded", "dense", "auto", "triton"])
def test_packed_forward_and_gradients_equal_per_sequence_float64(backend):
    model = tiny_model()
    lengths = [40, 1, 1, 7, 1, 90, 3] if backend != "padded" else [5, 3, 7, 6]  # loop branch / pad branch
    seqs, ids, positions, seq_ids = packed_inputs(lengths)
    weight = torch.randn(1, sum(lengths), 64, dtype=torch.float64, device=DEVICE)
    want_h, want_g = per_sequence(model, seqs, weight)
    got_h, got_g = packed(model, backend, ids, positions, seq_ids, lengths, weight)
    torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-10)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-10, atol=1e-10, msg=name)


def test_padded_backend_pads_when_even_and_loops_when_uneven():
    even = A.packed_layout((5, 3, 7, 6), "cpu", "padded")
    assert even.gather is not None and even.scatter is not None  # 4 * 7 <= 2 * 21: one padded call
    assert A.packed_layout((40, 1, 1, 1), "cpu", "padded").gather is None  # 4 * 40 > 2 * 43: per-sequence loop


def test_triton_in_the_model_launches_per_layer_and_equals_per_sequence(monkeypatch):
    """The GPU path ("triton", run by Triton's interpreter on CPU) on a packed batch of lengths 1..500: ONE kernel
    launch per layer forward and TWO backward, no SDPA call, the layout built once per forward; and the fp32 kernel
    against the float64 per-sequence forward of the same weights, hidden states and every parameter gradient."""
    layers = 2
    model = tiny_model(torch.float32, layers=layers)
    lengths = uneven(1, 700)
    seqs, ids, positions, seq_ids = packed_inputs(lengths, seed=1)
    weight = torch.randn(1, sum(lengths), 64, device=DEVICE)
    sdpa_calls, layouts = [], []
    real_sdpa, real_layout = F.scaled_dot_product_attention, A.packed_layout
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or real_sdpa(*a, **kw))
    monkeypatch.setattr("memrl.model.packed_layout", lambda *a, **kw: layouts.append(1) or real_layout(*a, **kw))
    model.attention = "triton"
    model.zero_grad()
    LAUNCHES.clear()
    hidden = model(ids, positions=positions, seq_ids=seq_ids, seq_lengths=lengths, return_hidden=True)
    assert dict(LAUNCHES) == {"varlen_fwd": layers} and len(layouts) == 1
    (hidden * weight).sum().backward()
    assert dict(LAUNCHES) == {"varlen_fwd": layers, "varlen_bwd_preprocess": layers, "varlen_bwd": layers}
    assert not sdpa_calls
    got = [("hidden", hidden.detach())]
    got += [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]

    monkeypatch.undo()
    want_h, want_g = per_sequence(model.double(), seqs, weight.double())
    for name, value in got:
        want = want_h if name == "hidden" else want_g[name]
        err = (value.double() - want).abs().max().item()
        assert err <= 3e-5 * want.abs().max().item(), f"{name}: max |err| {err:.3e}"


@pytest.mark.skipif(DEVICE == "cuda", reason="compiled flex runs bf16: test_gpu_backends_match_float64")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_equals_per_sequence_float64():
    model = tiny_model()
    lengths = [40, 1, 7, 90, 3]
    seqs, ids, positions, seq_ids = packed_inputs(lengths)
    model.attention = "flex"
    with torch.no_grad():  # flex has no CPU backward
        got = model(ids, positions=positions, seq_ids=seq_ids, seq_lengths=lengths, return_hidden=True)
        want = torch.cat([model(s[None].to(DEVICE), return_hidden=True)[0] for s in seqs])[None]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lengths_from_seq_ids_give_the_same_forward():
    model = tiny_model(torch.float32)
    lengths = [12, 1, 30]
    _, ids, positions, seq_ids = packed_inputs(lengths)
    with torch.no_grad():
        a = model(ids, positions=positions, seq_ids=seq_ids, seq_lengths=lengths)
        b = model(ids, positions=positions, seq_ids=seq_ids)  # lengths read from seq_ids (one sync)
    assert torch.equal(a, b)
    assert A.lengths_from_seq_ids(torch.tensor([[0, 0, 1, 0]])) is None  # not contiguous runs: dense mask instead


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("lengths", [(5, 3, 7), (1, 1, 1), (12,), (40, 1, 1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("backend", ["padded", "dense", "triton", "flex"])
def test_packed_attention_equals_block_diagonal_mask(lengths, backend):
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(DEVICE)
    q, k, v = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64).to(DEVICE) for h in (6, 2, 2))
    if backend == "flex" and DEVICE == "cuda":
        pytest.skip("compiled flex runs bf16: test_gpu_backends_match_float64")
    ref = A.sdpa_attention(q, k, v, A.build_attention_mask(T, None, seq, DEVICE))
    layout = A.packed_layout(lengths, DEVICE, backend, torch.float64, 8)
    torch.testing.assert_close(A.packed_attention(q, k, v, layout), ref, rtol=1e-12, atol=1e-12)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert A.resolve_backend("auto", cpu, torch.float32, 64, A.CPU_DENSE_MAX_TOKENS) == "dense"
    assert A.resolve_backend("auto", cpu, torch.float32, 64, A.CPU_DENSE_MAX_TOKENS + 1) == "padded"
    cuda = torch.device("cuda")
    if A.CUDA_DEFAULT == "flash":  # flash has no fp32 kernel: auto takes ours there
        assert A.resolve_backend("auto", cuda, torch.float32, 128, 16384) == "triton"
    assert A.resolve_backend("auto", cuda, torch.bfloat16, 128, 16384) == A.CUDA_DEFAULT
    with pytest.raises(ValueError, match="model.attention must be one of"):
        A.resolve_backend("sdpa", cpu, torch.float32, 64, 10)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA flash kernels on bf16/fp16, not cpu"):
            A.packed_layout((3, 4), "cpu", "flash")


def test_bench_length_distribution_is_what_it_states():
    """benchmarks/bench_attention.py's record lengths: memory responses mean ~55 with ~3% cut at 256, answers mean
    ~150 with a tail to 512, prompts 100..700, ~4 memory turns per answer (its docstring)."""
    from benchmarks.bench_attention import draw_record

    rng = random.Random(0)
    records = [draw_record(rng) for _ in range(20000)]
    memory = [r for kind, _, r in records if kind == "memory"]
    answers = [r for kind, _, r in records if kind == "final"]
    assert 0.78 < len(memory) / len(records) < 0.82
    assert 50 < sum(memory) / len(memory) < 60 and 0.02 < memory.count(256) / len(memory) < 0.04
    assert max(memory) == 256 and max(answers) == 512
    assert 140 < sum(answers) / len(answers) < 160 and 0.005 < answers.count(512) / len(answers) < 0.04
    assert min(p for _, p, _ in records) == 100 and max(p for _, p, _ in records) == 700


# ----------------------------------------------------------------------------------------------------------
# GPU: torch's flash varlen and compiled flex against our kernel's reference at real shapes


def _realistic(seed):
    from benchmarks.bench_attention import realistic_micro_batch

    return tuple(realistic_micro_batch(random.Random(seed), 16384))


def _attention_grads(layout, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = A.packed_attention(*leaves, layout)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "flex", "triton"])
@pytest.mark.parametrize("hq,hkv,d", [(12, 2, 128), (14, 2, 64)])
def test_gpu_backends_match_float64(backend, hq, hkv, d):
    lengths = _realistic(hq)
    T = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, T, d, generator=g, device="cuda", dtype=torch.bfloat16)
                     for h in (hq, hkv, hkv, hq))
    got = _attention_grads(A.packed_layout(lengths, "cuda", backend, torch.bfloat16, d), q, k, v, dout)
    want = _attention_grads(A.packed_layout(lengths, "cuda", "triton", torch.float64, d),  # float64: reference
                            q.double(), k.double(), v.double(), dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel <= 2.0**-7, f"{backend} {name}: relative error {rel:.2e}"  # bf16 bound, see test_varlen_attention


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "flash"])
def test_gpu_kernel_launches_do_not_depend_on_the_spread(backend):
    """Every CUDA kernel of one layer's attention forward + backward (torch.profiler; the layout is built before,
    once per micro-batch): as many with ~35 real-length sequences as with one 16k-token sequence; for ours
    exactly 1 forward kernel and 2 backward ones."""
    from torch.profiler import ProfilerActivity, profile

    def kernels_of(lengths):
        T = sum(lengths)
        q, k, v, dout = (torch.randn(1, h, T, 128, device="cuda", dtype=torch.bfloat16) for h in (12, 2, 2, 12))
        layout = A.packed_layout(lengths, "cuda", backend, torch.bfloat16, 128)
        _attention_grads(layout, q, k, v, dout)  # warm-up: Triton / flex compilation
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            A.packed_attention(*leaves, layout).backward(dout)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type.name == "CUDA"]

    spread, single = kernels_of(_realistic(0)), kernels_of((16384,))
    assert len(_realistic(0)) > 20 and len(spread) == len(single), (spread, single)
    if A.resolve_backend(backend, torch.device("cuda"), torch.bfloat16, 128, 16384) == "triton":
        for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_kernel"):
            assert sum(name in n for n in spread) == 1, (name, spread)
