"""Our decoder against transformers on tiny random checkpoints of each family (fp32, max |Δ| ≤ 1e-5)."""
import pytest
import torch

from memrl.hf_io import load_model
from tests.tiny import FAMILIES, make_tiny_checkpoint

CASES = [(f, tied) for f in FAMILIES for tied in (False, True)]


def hf_logits(ckpt, input_ids, attention_mask=None):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    with torch.no_grad():
        return ref(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("family,tied", CASES)
def test_logits_match_transformers(tmp_path, family, tied):
    ckpt = make_tiny_checkpoint(tmp_path, family, tied=tied, seed=hash((family, tied)) % 1000)
    ours = load_model(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    # long enough (T=100 > original_max_position_embeddings/high_freq_factor) that llama3 scaling matters
    ids = torch.randint(0, 259, (3, 100), generator=g)
    with torch.no_grad():
        got = ours(ids)
    want = hf_logits(ckpt, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_is_not_a_no_op(tmp_path):
    """The llama3 test above would be vacuous if scaling changed nothing at these lengths."""
    from memrl.model import ModelConfig, rope_inv_freq

    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    cfg = load_model(ckpt, dtype=torch.float32).config
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    assert not torch.allclose(rope_inv_freq(cfg), rope_inv_freq(plain))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_sequence_alone(tmp_path, family):
    model = load_model(make_tiny_checkpoint(tmp_path, family), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    lengths = [7, 19, 12]
    seqs = [torch.randint(0, 259, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.full((3, T), 256)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as the generator uses
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None])[0]
            assert (batched[i, T - len(s):] - alone).abs().max().item() <= 1e-5
    # and transformers agrees on the padded batch (real positions only)
    want = hf_logits(tmp_path, ids, mask)
    assert ((batched - want).abs() * mask[..., None]).max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_equal_each_sequence_alone(tmp_path, family):
    model = load_model(make_tiny_checkpoint(tmp_path, family), dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 259, (n,), generator=g) for n in (5, 17, 9, 1)]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    seq_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    with torch.no_grad():
        packed = model(ids, positions=positions, seq_ids=seq_ids)[0]
        start = 0
        for s in seqs:
            alone = model(s[None])[0]
            assert (packed[start:start + len(s)] - alone).abs().max().item() <= 1e-5
            start += len(s)


def test_hidden_times_output_weight_is_logits(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, "qwen2", tied=True), dtype=torch.float32)
    ids = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        h = model(ids, return_hidden=True)
        assert torch.equal(h @ model.output_weight().T, model(ids))
    assert model.output_weight() is model.model.embed_tokens.weight


def test_bf16_load_close_to_transformers_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint(tmp_path, "qwen3")
    ours = load_model(ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        got, want = ours(ids).float(), ref(ids).logits.float()
    rel = (got - want).norm() / want.norm()
    assert rel.item() < 1e-2  # bf16 operands: different but equally valid summation orders


def test_gradient_checkpointing_same_gradients(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, "llama"), dtype=torch.float32)
    ids = torch.randint(0, 259, (2, 16))
    grads = []
    for ckpt_on in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt_on
        model.train()
        model(ids).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
