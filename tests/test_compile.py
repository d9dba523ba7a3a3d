"""memrl/compile.py (model.compile_train): compiled norms and MLPs against the same model run eagerly, on packed
micro-batches of very uneven lengths, forward and backward; one compile for micro-batches of any length."""
import random

import pytest
import torch

from memrl.algo import TurnRecord, pack_turns, response_logprobs
from memrl.compile import COMPILE_STATS, compiled_graphs, compile_blocks
from memrl.hf_io import load_model
from memrl.model import MLP, RMSNorm
from tests.tiny import make_tiny_checkpoint


def micro_batch(lengths, seed):
    """One packed micro-batch of records with (prompt, response) lengths, random tokens and advantages."""
    rng = random.Random(seed)
    recs = [TurnRecord([rng.randrange(259) for _ in range(p)], [rng.randrange(259) for _ in range(r)], [0.0] * r,
                       trajectory_id=i, group_id=i, turn_index=0, kind="final") for i, (p, r) in enumerate(lengths)]
    return pack_turns(recs, torch.randn(len(recs), generator=torch.Generator().manual_seed(seed)), 10**9)[0]


def loss_and_grads(model, mb):
    model.zero_grad(set_to_none=True)
    logp, _ = response_logprobs(model, mb)
    loss = (logp * mb.advantages).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_equal_eager_and_compile_once(tmp_path, backend):
    """backend "eager" (dynamo alone: the graphs, guards and recompiles, in seconds); "inductor": the real code
    generation (CPU here, ~1 min), whose fused kernels must give eager's loss and gradients up to fp32 rounding."""
    ckpt = make_tiny_checkpoint(tmp_path, "qwen3", seed=3)  # qwen3: per-head q/k norms too (4-d inputs)
    eager, compiled = load_model(ckpt, dtype=torch.float32), load_model(ckpt, dtype=torch.float32)
    names = list(compiled.state_dict())
    n = compile_blocks(compiled, backend=backend)
    L = compiled.config.num_hidden_layers
    assert n == sum(isinstance(m, (RMSNorm, MLP)) for m in compiled.modules()) == L * 5 + 1
    assert list(compiled.state_dict()) == names  # HF names unchanged: checkpoints load and save as before
    torch._dynamo.reset()
    stats_before = dict(COMPILE_STATS)  # module-global: other tests of this process may have compiled before
    # padded layout (similar lengths), then a very uneven one (1 to 120 tokens: the per-sequence path), other T
    batches = [micro_batch([(9, 5), (7, 6), (8, 4)], seed=1),
               micro_batch([(1, 1), (100, 20), (3, 2), (30, 1), (2, 40)], seed=2)]
    compiles_after = []
    for mb in batches:
        want_loss, want_grads = loss_and_grads(eager, mb)
        got_loss, got_grads = loss_and_grads(compiled, mb)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        for name, g in want_grads.items():  # fp32 rounding of reordered sums: relative to the tensor's scale
            err = (got_grads[name] - g).abs().max().item()
            assert err <= 1e-5 * g.abs().max().item(), f"{name}: max |grad diff| {err:.2e}"
        compiles_after.append(compiled_graphs())
    assert batches[0].num_tokens != batches[1].num_tokens
    assert compiles_after[1] == compiles_after[0] > 0, "a micro-batch of another length compiled again"
    assert 0 < COMPILE_STATS["compiles"] - stats_before["compiles"] <= compiles_after[0]
    assert COMPILE_STATS["compile_s"] > stats_before["compile_s"]
    with torch.no_grad():  # scoring: forward-only graphs, compiled once too
        for mb in batches:
            torch.testing.assert_close(response_logprobs(compiled, mb)[0], response_logprobs(eager, mb)[0],
                                       rtol=1e-5, atol=1e-5)
    no_grad_compiles = compiled_graphs() - compiles_after[1]
    with torch.no_grad():
        response_logprobs(compiled, micro_batch([(4, 3), (50, 9)], seed=3))
    assert compiled_graphs() - compiles_after[1] == no_grad_compiles
