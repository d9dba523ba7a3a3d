"""The generator's Triton kernels against float64 / the torch references (TRITON_INTERPRET=1 on CPU, see conftest),
and the whole generator on its Triton path against its torch path."""
import pytest
import torch

from kernels.decode_attention import decode_attention_torch, decode_attention_triton
from memrl.generate import Generator, SamplingParams
from memrl.hf_io import load_model
from memrl.sampling import row_keys, sample_fused, sample_torch
from tests.tiny import make_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


# B rows, S slots (>= B: rows live in slots 0..B-1), Hq, Hkv, T slot length, D head dim
ATTN_CASES = [
    (3, 5, 4, 2, 100, 16, torch.float32, None),
    (2, 2, 4, 2, 64, 24, torch.float32, 3),  # Qwen3-like head_dim, not a power of two
    (5, 6, 2, 2, 17, 16, torch.float32, 1),  # no GQA, one split (direct write)
    (4, 4, 12, 2, 200, 128, torch.bfloat16, None),  # Qwen2.5-1.5B heads: g = 6 query heads per kv head
]


@pytest.mark.parametrize("B,S,Hq,Hkv,T,D,dtype,splits", ATTN_CASES)
def test_decode_attention_matches_float64(B, S, Hq, Hkv, T, D, dtype, splits):
    g = torch.Generator().manual_seed(B * T + D)
    q = torch.randn(B, Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(S, Hkv, T, D, generator=g).to(DEV, dtype)
    v = torch.randn(S, Hkv, T, D, generator=g).to(DEV, dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 1, T
    lengths = lengths.to(DEV)
    k[B:] = float("nan")  # slots past the batch must never be read
    ref = decode_attention_torch(q.double(), k[:B].double(), v[:B].double(), lengths, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(decode_attention_triton(q, k, v, lengths, D ** -0.5, num_splits=splits), ref) < tol
    assert rel_err(decode_attention_torch(q, k, v, lengths, D ** -0.5), ref) < tol
    # keys past a row's length are never read either
    k2, v2 = k.clone(), v.clone()
    for b in range(B):
        k2[b, :, lengths[b]:] = float("nan")
        v2[b, :, lengths[b]:] = float("nan")
    assert rel_err(decode_attention_triton(q, k2, v2, lengths, D ** -0.5, num_splits=splits), ref) < tol


# ragged rows around the chunk boundaries: B, Hq, Hkv (group 6 / 8 / 1), T, D, dtype, split_size, block_n, lengths
SPLIT_CASES = [
    (7, 12, 2, 200, 128, torch.bfloat16, 64, 64, [1, 63, 64, 65, 127, 129, 200]),
    (5, 8, 1, 130, 64, torch.float32, 64, 32, [1, 2, 64, 65, 130]),
    (4, 4, 4, 100, 32, torch.float32, 32, 16, [31, 32, 33, 100]),
    (2, 12, 2, 1500, 128, torch.bfloat16, None, 64, [1500, 1337]),  # long context, plan_split's choice
]


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,dtype,split_size,block_n,lengths", SPLIT_CASES)
def test_decode_attention_split_boundaries(B, Hq, Hkv, T, D, dtype, split_size, block_n, lengths, append):
    """float64 reference; with append the kernel also writes the new K/V at position len-1 (read from registers:
    that cache entry is NaN before the call) and leaves every other cache entry untouched."""
    g = torch.Generator().manual_seed(T + D)
    q = torch.randn(B, Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(B + 1, Hkv, T, D, generator=g).to(DEV, dtype)
    v = torch.randn(B + 1, Hkv, T, D, generator=g).to(DEV, dtype)
    lens = torch.tensor(lengths, device=DEV)
    k_new = torch.randn(B, Hkv, D, generator=g).to(DEV, dtype)
    v_new = torch.randn(B, Hkv, D, generator=g).to(DEV, dtype)
    k_ref, v_ref = k.clone(), v.clone()
    if append:
        rows = torch.arange(B, device=DEV)
        k_ref[rows, :, lens - 1], v_ref[rows, :, lens - 1] = k_new, v_new
    ref = decode_attention_torch(q.double(), k_ref[:B].double(), v_ref[:B].double(), lens, D ** -0.5)
    for b in range(B):  # nothing at or past a row's end may be read (position len-1 only when appending)
        k[b, :, lens[b] - int(append):] = float("nan")
        v[b, :, lens[b] - int(append):] = float("nan")
    k_want, v_want = k.clone(), v.clone()
    kw = dict(k_new=k_new, v_new=v_new) if append else {}
    out = decode_attention_triton(q, k, v, lens, D ** -0.5, split_size=split_size, block_n=block_n, **kw)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    if append:
        k_want[rows, :, lens - 1], v_want[rows, :, lens - 1] = k_new, v_new
    assert torch.equal(k.nan_to_num(7.0), k_want.nan_to_num(7.0))
    assert torch.equal(v.nan_to_num(7.0), v_want.nan_to_num(7.0))


def test_plan_split_follows_the_h100_measurements(monkeypatch):
    """One chunk per (row, kv head) wherever the H100 table in kernels/decode_attention.py measured it fastest;
    a split (chunks of >= MIN_SPLIT keys, multiples of the tile, ~one program per SM) only for few rows x long slots."""
    import kernels.decode_attention as da

    monkeypatch.setattr(da, "_sm_count", lambda device: 132)  # H100
    cpu = torch.device("cpu")
    for B, T in [(64, 768), (64, 1536), (256, 768), (256, 1536), (512, 768), (512, 1536), (64, 32768), (33, 8192),
                 (8, 1920), (1, 100)]:
        assert da.plan_split(B, 2, T, cpu) == -(-T // 64) * 64, (B, T)  # the whole slot: 1 split
    for B, T in [(8, 4992), (16, 4992), (1, 32768), (32, 2048)]:
        s = da.plan_split(B, 2, T, cpu)
        splits = -(-T // s)
        assert s % 64 == 0 and s >= da.MIN_SPLIT and 1 < splits and B * 2 * splits <= 2 * 132, (B, T, s)
    assert da.plan_split(4, 2, 256, cpu, num_splits=2) == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampler_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    m, V, vocab = 24, 300, 290
    logits = (3 * torch.randn(m, V, generator=g)).to(dtype)
    logits[:, vocab:] = 100.0  # padding rows of the embedding: must never win
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # greedy tie: the first index wins
    temp = torch.rand(m, generator=g) + 0.3
    temp[:4] = 0.0
    keys = [row_keys(99, i, i % 3) for i in range(m)]
    key0, key1 = torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys])
    counter = torch.randint(0, 10_000, (m,), generator=g)
    args = [t.to(DEV) for t in (temp, key0, key1, counter)]
    tok, logp = sample_fused(logits.to(DEV), vocab, *args)
    ref_tok, ref_logp = sample_torch(logits.to(DEV), vocab, args[0], torch.zeros(m, dtype=torch.long, device=DEV),
                                     torch.ones(m, device=DEV), *args[1:])
    assert torch.equal(tok, ref_tok) and tok[0].item() == 5 and (tok < vocab).all()
    assert (logp - ref_logp).abs().max().item() < 1e-5
    # float64 check of the log-probs: log softmax(z) at the token, over the real vocabulary
    z = logits[:, :vocab].double().to(DEV) / torch.where(args[0] > 0, args[0], 1).double()[:, None]
    want = z.gather(1, tok[:, None])[:, 0] - torch.logsumexp(z, -1)
    assert (logp.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_generator_triton_path_equals_torch_path(tmp_path, family):
    """The GPU code path (Triton decode attention + fused sampler), run by the interpreter on a tiny model."""
    # on a GPU machine the same check runs on CUDA (the interpreter is only set up where there is no GPU)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(make_tiny_checkpoint(tmp_path, family, seed=4), dtype=torch.float32, device=device)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [40, 41, 42, 43]]
    params = [SamplingParams(max_new_tokens=4, greedy=True), SamplingParams(max_new_tokens=4, n=2, seed=3),
              SamplingParams(max_new_tokens=3, temperature=0.8, top_p=0.9, seed=4)]
    want = Generator(model, vocab_size=259, kernels="torch").generate(prompts, params)
    got = Generator(model, vocab_size=259, kernels="triton").generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.logprobs, y.logprobs)) < 1e-5
