"""Generator on CPU against independent sides: a full-recompute greedy loop, transformers' greedy generate, a
teacher-forced forward (log-probs), a chi-square test of the sampled frequencies; plus the request contract."""
import math

import pytest
import torch

from memrl.generate import Completion, Generator, SamplingParams
from memrl.hf_io import load_model
from tests.tiny import FAMILIES, make_tiny_checkpoint

PROMPT_LENS = [5, 17, 9, 1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {f: make_tiny_checkpoint(tmp_path_factory.mktemp(f), f, seed=11 + i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def qwen2(ckpts):
    return load_model(ckpts["qwen2"], dtype=torch.float32)


def ragged_prompts(seed=0, lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 259, (n,), generator=g).tolist() for n in lens]


def naive_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ref.generation_config.eos_token_id = None  # random weights: run to full length, as our call without stop ids
    ref.generation_config.pad_token_id = 256
    return ref.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_naive_loop_and_transformers(ckpts, family):
    model = load_model(ckpts[family], dtype=torch.float32)
    prompts, n_new = ragged_prompts(1), 14
    gen = Generator(model, vocab_size=model.config.vocab_size)  # no masking: transformers does none
    batched = gen.generate(prompts, SamplingParams(max_new_tokens=n_new, greedy=True))
    ref = hf_model(ckpts[family])
    for i, p in enumerate(prompts):
        alone = gen.generate([p], SamplingParams(max_new_tokens=n_new, greedy=True))[0]
        assert batched[i].token_ids == alone.token_ids, "batched != one by one"
        assert batched[i].token_ids == naive_greedy(model, p, n_new), "!= full-recompute loop"
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=n_new)
        assert batched[i].token_ids == hf[0, len(p):].tolist(), "!= transformers generate"
        assert batched[i].finish_reason == "length" and len(batched[i].logprobs) == n_new
    # transformers on the left-padded batch agrees too
    T = max(map(len, prompts))
    ids = torch.tensor([[256] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new)
    assert [c.token_ids for c in batched] == hf[:, T:].tolist()


def reference_logprobs(model, prompt, completion, vocab_size, temperature, top_k, top_p, greedy=False):
    """Teacher-forced, float64, each row's truncated renormalised distribution built independently."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1, :vocab_size].double()
    out, kept_sets = [], []
    for row, tok in zip(logits, completion):
        z = row if greedy else row / temperature
        kept = list(range(vocab_size))
        if not greedy:
            order = sorted(range(vocab_size), key=lambda j: -z[j].item())
            if top_k:
                order = order[:top_k]
            probs = torch.softmax(z[order], 0)
            kept, mass = [], 0.0
            for j, pj in zip(order, probs.tolist()):
                if mass >= top_p:
                    break
                kept.append(j)
                mass += pj
        lse = torch.logsumexp(z[kept], 0)
        out.append((z[tok] - lse).item())
        kept_sets.append(set(kept))
    return out, kept_sets


@pytest.mark.parametrize("temperature,top_k,top_p,greedy", [
    (1.0, 0, 1.0, False), (0.7, 0, 0.9, False), (0.7, 20, 1.0, False), (1.3, 30, 0.8, False), (1.0, 0, 1.0, True),
])
def test_logprobs_equal_teacher_forced_forward(qwen2, temperature, top_k, top_p, greedy):
    vocab = 259  # the tokenizer's size: model rows 259..271 are padding, masked
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                            n=2, seed=5)
    prompts = ragged_prompts(2, [7, 3, 15])
    out = Generator(qwen2, vocab_size=vocab).generate(prompts, params)
    for c in out:
        want, kept = reference_logprobs(qwen2, prompts[c.prompt_index], c.token_ids, vocab, temperature, top_k,
                                        top_p, greedy)
        assert all(t in k for t, k in zip(c.token_ids, kept)), "sampled outside the truncated set"
        assert max(abs(a - b) for a, b in zip(c.logprobs, want)) <= 1e-5


def chi2_pvalue(stat: float, dof: int) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # regularised upper incomplete gamma Q(dof/2, stat/2)
        return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                       torch.tensor(stat / 2, dtype=torch.float64)).item()


def chi2_test(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expecting < 5 draws are pooled into one (dropped if it is still < 5)."""
    n = counts.sum().item()
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    big = probs * n >= 5
    c, p = counts[big], probs[big]
    rest_c, rest_p = counts[~big].sum(), probs[~big].sum()
    if rest_p * n >= 5:
        c, p = torch.cat([c, rest_c[None]]), torch.cat([p, rest_p[None]])
    else:  # negligible mass: condition on landing in the big cells
        n = c.sum().item()
        p = p / p.sum()
    expected = p * n
    stat = ((c - expected) ** 2 / expected).sum().item()
    return chi2_pvalue(stat, len(c) - 1)


def truncated_probs(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    order = torch.argsort(z, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    p = torch.softmax(z[order], 0)
    kept, mass = [], 0.0
    for j, pj in zip(order, p.tolist()):
        if mass >= top_p:
            break
        kept.append(j)
        mass += pj
    out = torch.zeros_like(z)
    out[kept] = torch.softmax(z[kept], 0)
    return out


@pytest.mark.parametrize("vocab,temperature,top_k,top_p", [(16, 1.0, 0, 1.0), (16, 0.6, 5, 1.0), (12, 1.4, 0, 0.7)])
def test_sampled_frequencies_match_the_distribution(tmp_path, vocab, temperature, top_k, top_p):
    ckpt = make_tiny_checkpoint(tmp_path, "qwen2", vocab_size=16, num_hidden_layers=1, eos_token_id=0,
                                pad_token_id=0, seed=3)
    model = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():  # sharpen the logits so the test has power (random init is nearly uniform)
        model.model.norm.weight.mul_(2.0)
    prompt, n = [3, 1, 4, 1, 5], 6000
    out = Generator(model, vocab_size=vocab).generate(
        [prompt], SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p, n=n, seed=7))
    with torch.no_grad():
        z = model(torch.tensor([prompt]))[0, -1, :vocab].double() / temperature
    first = torch.tensor([c.token_ids[0] for c in out])
    probs = truncated_probs(z, top_k, top_p)
    assert chi2_test(torch.bincount(first, minlength=vocab).double(), probs) > 1e-3
    # second step (a different noise counter), conditioned on the most frequent first token
    t0 = torch.bincount(first).argmax().item()
    second = torch.tensor([c.token_ids[1] for c in out if c.token_ids[0] == t0])
    with torch.no_grad():
        z2 = model(torch.tensor([prompt + [t0]]))[0, -1, :vocab].double() / temperature
    probs2 = truncated_probs(z2, top_k, top_p)
    assert chi2_test(torch.bincount(second, minlength=vocab).double(), probs2) > 1e-3


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(qwen2):
    gen = Generator(qwen2, vocab_size=259)
    prompts = ragged_prompts(3)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=123)
    a = gen.generate(prompts, params)
    b = gen.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    assert len({tuple(c.token_ids) for c in a}) == len(a), "samples should differ"
    other = gen.generate(prompts, SamplingParams(max_new_tokens=10, n=3, seed=124))
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    # prompt 0 with different company (and fewer rows) samples the same tokens
    alone = gen.generate([prompts[0], prompts[3]], params)
    assert [c.token_ids for c in alone[:3]] == [c.token_ids for c in a[:3]]
    # with a seed of its own, a request samples the same tokens at any position, in any company
    own = [SamplingParams(max_new_tokens=10, n=2, seed=1000 + i) for i in range(len(prompts))]
    full = gen.generate(prompts, own)
    part = gen.generate([prompts[3], prompts[1]], [own[3], own[1]])
    assert [c.token_ids for c in part] == [c.token_ids for c in full[6:8] + full[2:4]]
    # a KV budget of 3 slots: 15 rows queue and are admitted as slots free up; same tokens
    small = Generator(qwen2, vocab_size=259, kv_budget_tokens=3 * 32)
    c = small.generate(prompts, params)
    assert small.last_stats["admissions"] > 1 and small.last_stats["slots"] == 3
    assert [x.token_ids for x in c] == [x.token_ids for x in a]
    assert max(abs(x - y) for p, q in zip(a, c) for x, y in zip(p.logprobs, q.logprobs)) <= 1e-5
    # seed=None draws from torch's global RNG
    torch.manual_seed(0)
    d1 = gen.generate(prompts[:2], SamplingParams(max_new_tokens=6))
    torch.manual_seed(0)
    d2 = gen.generate(prompts[:2], SamplingParams(max_new_tokens=6))
    assert [c.token_ids for c in d1] == [c.token_ids for c in d2]


def test_stop_ids_per_request_and_lengths(qwen2):
    gen = Generator(qwen2, vocab_size=272)
    prompts = ragged_prompts(4, [6, 11])
    free = gen.generate(prompts, SamplingParams(max_new_tokens=12, greedy=True))
    stop = free[0].token_ids[3]
    first = free[0].token_ids.index(stop)
    out = gen.generate(prompts, [SamplingParams(max_new_tokens=12, greedy=True, stop_ids=frozenset({stop, 999})),
                                 SamplingParams(max_new_tokens=12, greedy=True)])
    assert out[0].token_ids == free[0].token_ids[:first + 1] and out[0].finish_reason == "stop"
    assert out[0].logprobs == pytest.approx(free[0].logprobs[:first + 1], abs=1e-6)
    assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"
    # per-request max_new_tokens, including 0 and 1, in one call
    lens = [0, 1, 5]
    out = gen.generate(prompts[:1] * 3, [SamplingParams(max_new_tokens=m, greedy=True) for m in lens])
    assert [len(c.token_ids) for c in out] == lens and all(c.finish_reason == "length" for c in out)
    assert out[2].token_ids == free[0].token_ids[:5]
    # a stop id sampled as the very first token
    out = gen.generate(prompts[:1], SamplingParams(max_new_tokens=5, greedy=True,
                                                   stop_ids=frozenset({free[0].token_ids[0]})))
    assert out[0].token_ids == free[0].token_ids[:1] and out[0].finish_reason == "stop"


def test_n_samples_share_a_prefill(qwen2):
    gen = Generator(qwen2, vocab_size=259)
    prompts = ragged_prompts(5, [8, 4])
    out = gen.generate(prompts, [SamplingParams(max_new_tokens=6, n=4, seed=1), SamplingParams(max_new_tokens=6, n=2)])
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert all(isinstance(c, Completion) and len(c.token_ids) == 6 for c in out)
    assert gen.last_stats["prefill_tokens"] == 12  # each prompt prefilled once
    greedy = gen.generate(prompts[:1], SamplingParams(max_new_tokens=6, n=3, greedy=True))
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids


def test_masked_ids_are_never_sampled(qwen2):
    vocab = 7
    out = Generator(qwen2, vocab_size=vocab).generate(
        ragged_prompts(6, [5, 9]), SamplingParams(max_new_tokens=20, temperature=5.0, n=50, seed=2))
    seen = {t for c in out for t in c.token_ids}
    assert seen <= set(range(vocab)) and len(seen) == vocab  # hot: every allowed id shows up, nothing else
    # greedy masks too: ask for the model's unmasked favourite to be out of range
    free = Generator(qwen2, vocab_size=272).generate([[1, 2, 3]], SamplingParams(max_new_tokens=1, greedy=True))
    top = free[0].token_ids[0]
    masked = Generator(qwen2, vocab_size=top).generate([[1, 2, 3]], SamplingParams(max_new_tokens=1, greedy=True))
    assert masked[0].token_ids[0] < top


def test_clear_errors(qwen2):
    gen = Generator(qwen2, vocab_size=259)
    window = qwen2.config.max_position_embeddings
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[1, 2], []], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="context window"):
        gen.generate([[1] * (window + 1)], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1, 300]], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="vocab_size"):
        Generator(qwen2, vocab_size=1000)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="KV budget"):
        Generator(qwen2, vocab_size=259, kv_budget_tokens=10).generate([[1, 2]], SamplingParams(max_new_tokens=20))
    # a prompt filling the window gets nothing; one near it is cut at the window
    out = gen.generate([[1] * window, [1] * (window - 3)], SamplingParams(max_new_tokens=10, greedy=True))
    assert out[0].token_ids == [] and len(out[1].token_ids) == 3
    assert all(c.finish_reason == "length" for c in out)


def test_compaction_with_uneven_lengths_matches_rows_alone(qwen2):
    """Rows finishing at different steps (stop ids, max_new) leave the batch; the rest are unaffected."""
    gen = Generator(qwen2, vocab_size=259)
    prompts = ragged_prompts(7, [4, 13, 2, 8, 20, 6])
    params = [SamplingParams(max_new_tokens=m, temperature=0.9, seed=9 + i, stop_ids=frozenset(s))
              for i, (m, s) in enumerate(zip([3, 15, 8, 1, 11, 15], [(), (5, 6, 7), (), (), (100, 101), ()]))]
    together = gen.generate(prompts, params)
    assert len({len(c.token_ids) for c in together}) > 2
    for i, (p, sp) in enumerate(zip(prompts, params)):
        alone = gen.generate([p], [sp])[0]
        assert alone.token_ids == together[i].token_ids
        assert math.isclose(sum(alone.logprobs), sum(together[i].logprobs), abs_tol=1e-4)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gpu_schedule_on_cpu(tmp_path, monkeypatch, kernels):
    """The GPU loop without a GPU: batches padded to graph buckets (inert rows), several steps between host syncs
    (finished rows linger and must not write), the capture's warm-up + undo before each new bucket, a KV budget
    that queues rows. "triton" also runs the fused sampler inside the step, as the CUDA graph does.
    On a machine with CUDA the same schedule runs there, eagerly (Triton's interpreter is only set up without a GPU,
    and compiled Triton kernels cannot read CPU tensors)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(make_tiny_checkpoint(tmp_path, "qwen2", seed=8), dtype=torch.float32, device=device)
    eager = dict(cuda_graphs=False, compile=False)  # the schedule is driven by the test hooks below, not by graphs
    prompts = ragged_prompts(8, [4, 13, 2, 8] if kernels == "torch" else [4, 9, 2])
    n_new = 10 if kernels == "torch" else 5
    greedy_free = Generator(model, vocab_size=259, kernels="torch", **eager).generate(
        prompts, SamplingParams(max_new_tokens=n_new, greedy=True))
    stops = frozenset({greedy_free[1].token_ids[2]})
    params = [SamplingParams(max_new_tokens=n_new, greedy=True, stop_ids=stops),
              SamplingParams(max_new_tokens=n_new - 2, temperature=1.0, n=3, seed=4, stop_ids=stops),
              SamplingParams(max_new_tokens=1, temperature=0.8, seed=5)]
    if kernels == "torch":
        params.append(SamplingParams(max_new_tokens=n_new, temperature=0.7, top_k=20, top_p=0.9, n=2, seed=6))
    want = Generator(model, vocab_size=259, kernels="torch", **eager).generate(prompts, params)
    budget = 5 * 32 if kernels == "torch" else 3 * 16  # 5 / 3 slots for 11 / 5 rows
    gen = Generator(model, vocab_size=259, kernels=kernels, sync_every=3, kv_budget_tokens=budget, **eager)
    gen.runner.pad_batches = gen.runner.rehearse = True
    monkeypatch.setattr("memrl.model_runner._bucket", lambda n, cap: cap)  # most padding: every step runs all slots
    got = gen.generate(prompts, params)
    assert gen.last_stats["admissions"] > 1 and gen.last_stats["padded_row_steps"] > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert max(abs(x - y) for p, q in zip(got, want) for x, y in zip(p.logprobs, q.logprobs)) <= 1e-5


def test_every_entry_point_runs_without_autograd(qwen2):
    """The benchmark drives _start/_admit/_decode_step directly, with grad on: the forward must still run under
    no_grad (the attention custom ops have no autograd formula; a compile traced with grad on fails on them)."""
    from collections import deque

    assert any(p.requires_grad for p in qwen2.parameters())
    grad_in_forward = []
    hook = qwen2.register_forward_hook(lambda mod, args, out: grad_in_forward.append(torch.is_grad_enabled()))
    gen = Generator(qwen2, vocab_size=259)
    params = SamplingParams(max_new_tokens=4, seed=1)
    try:
        with torch.enable_grad():
            _, _, live = gen._start(ragged_prompts(10, [3, 6]), params)
            gen._admit(deque(live))
            gen._compact()
            gen._decode_step()
            gen._compact()
            gen.generate(ragged_prompts(10, [3, 6]), params)
    finally:
        hook.remove()
    assert grad_in_forward and not any(grad_in_forward)
    assert not gen.runner.state.out_logp.requires_grad


def test_compile_failure_falls_back_loudly_or_raises(qwen2, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("simulated compiler failure")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    prompts, params = ragged_prompts(11, [4, 7]), SamplingParams(max_new_tokens=5, greedy=True)
    want = Generator(qwen2, vocab_size=259).generate(prompts, params)
    gen = Generator(qwen2, vocab_size=259, compile=True)
    with pytest.warns(UserWarning, match="simulated compiler failure"):
        got = gen.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert not gen.compile and "simulated" in gen.compile_error
    with pytest.raises(RuntimeError, match="simulated"):
        Generator(qwen2, vocab_size=259, compile=True, compile_fallback=False).generate(prompts, params)


@pytest.mark.slow
def test_torch_compile_equals_eager_on_cpu(qwen2):
    """torch.compile traces through the attention custom ops (CPU inductor here; the GPU test runs it there)."""
    prompts = ragged_prompts(9)
    params = [SamplingParams(max_new_tokens=8, greedy=True), SamplingParams(max_new_tokens=8, n=2, seed=1),
              SamplingParams(max_new_tokens=6, seed=3), SamplingParams(max_new_tokens=8, top_p=0.8, seed=2)]
    gen = Generator(qwen2, vocab_size=259, compile=True, compile_prefill=True)
    got = gen.generate(prompts, params)
    assert gen.compile, "compile fell back to eager"
    assert gen.lifetime["compiles"] == 2 and gen.last_stats["compile_s"] > 0  # decode + prefill, timed apart
    want = Generator(qwen2, vocab_size=259).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert max(abs(x - y) for p, q in zip(got, want) for x, y in zip(p.logprobs, q.logprobs)) <= 1e-5


def test_graph_buckets():
    from memrl.model_runner import MIN_BUCKET, _bucket

    sizes = [_bucket(n, 10_000) for n in range(1, 1025)]
    assert all(b >= n for n, b in zip(range(1, 1025), sizes)) and len(set(sizes)) <= 16
    assert min(sizes) == MIN_BUCKET >= 2  # never a batch of 1 in the compiled step (it would compile again)
    assert all(b - n < MIN_BUCKET for n, b in zip(range(1, 257), sizes))  # bandwidth-bound range: a few rows
    assert max(b / n for n, b in zip(range(257, 1025), sizes[256:])) <= 1.25
    assert _bucket(300, 301) == 301 and _bucket(5, 6) == 6


def _rollout_like_calls(gen, seed=0):
    """Calls shaped like a rollout's: one prompt x n samples, batches of n = 1 whose sizes coincide (P = rows),
    a lone prompt of one token (sizes of 1), lengths that finish one by one down to a single live row, two slot
    lengths alternating (memory turns, then answers, then memory turns again)."""
    import random

    rng = random.Random(seed)

    def prompts(k, lo, hi):
        return [[rng.randrange(259) for _ in range(rng.randint(lo, hi))] for _ in range(k)]

    out = []
    for k, n, lo, hi, budget in [(2, 4, 10, 14, 20), (8, 1, 8, 8, 40), (5, 1, 3, 30, 20), (1, 1, 1, 1, 40),
                                 (3, 2, 4, 9, 20)]:
        ps = prompts(k, lo, hi)
        params = [SamplingParams(max_new_tokens=1 + (i * 7) % budget, n=n, greedy=True) for i in range(k)]
        out.append((ps, params, gen.generate(ps, params), dict(gen.last_stats)))
    return out


def test_one_compile_per_function_and_graphs_kept_across_layouts(qwen2, monkeypatch):
    """issue 11, first step: over calls of every shape a rollout makes, the decode step compiles once and the prefill
    (compile_prefill) once: no recompile for a batch of 1, a prompt of 1 token, sizes equal by chance at the first
    call (duck sizing) or a new slot count. Dynamo's own backend stands in for inductor (same guards, no codegen).
    Each (bucket, layout) is captured once: the third layout change comes back to the first layout's graphs.
    Tokens equal the uncompiled generator's."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    gen = Generator(qwen2, vocab_size=259, compile=True, compile_prefill=True, compile_fallback=False,
                    kv_budget_tokens=1024)  # one cache buffer throughout (a regrown buffer would drop every layout)
    gen.runner.pad_batches = gen.runner.rehearse = True  # GPU schedule: padded buckets, a capture per (bucket, layout)
    got = _rollout_like_calls(gen)
    assert gen.lifetime["compiles"] == 2, gen.lifetime  # one decode graph, one prefill graph
    want = _rollout_like_calls(Generator(qwen2, vocab_size=259))
    for (_, _, a, _), (_, _, b, _) in zip(got, want):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # layouts: the 5th call has the 1st call's slot length again (granule 16 on CPU: 32 tokens), after others
    slot_lens = [stats["slot_len"] for *_, stats in got]
    assert slot_lens[0] == slot_lens[4] == 32 and slot_lens[1] != 32 and slot_lens[3] != 32, slot_lens
    assert got[4][3]["captures"] == 0 < got[0][3]["captures"]  # back to layout 1: its graphs are reused
    assert gen.lifetime["captures"] == sum(stats["captures"] for *_, stats in got)



def test_per_layer_compile_once_for_all_layers(ckpts, monkeypatch):
    """rollout.compile=layers (issue 11, first step): each decoder layer's two halves around its attention compile
    ONCE for all layers and every batch size (2 graphs, not 2 per layer), over calls of every shape a rollout makes,
    on the GPU schedule (padded buckets, graph warm-ups); tokens equal the uncompiled generator's; training's forward
    (grad on) and a prefill still run the eager code; names and parameters of the model are untouched. Dynamo's own
    backend stands in for inductor (same graphs and guards, no code generation)."""
    from memrl.compile import uncompile_layers

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    model = load_model(ckpts["qwen2"], dtype=torch.float32)
    assert model.config.num_hidden_layers >= 2  # else "once for all layers" would prove nothing
    names = list(model.state_dict())
    ids = torch.tensor([[5, 9, 3, 7]])
    want_logits = model(ids)
    gen = Generator(model, vocab_size=259, compile=True, compile_layers=True, compile_fallback=False,
                    kv_budget_tokens=1024)
    gen._pad_batches = gen._rehearse = True
    got = _rollout_like_calls(gen)
    assert gen.lifetime["compiles"] == 2, gen.lifetime  # attention_inputs + attention_output_and_mlp
    want = _rollout_like_calls(Generator(load_model(ckpts["qwen2"], dtype=torch.float32), vocab_size=259))
    for (_, _, a, _), (_, _, b, _) in zip(got, want):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert list(model.state_dict()) == names
    graphs = gen.lifetime["compiles"]
    out = model(ids)  # grad on, one sequence of 4 tokens: the eager code, no new graph
    out.sum().backward()
    torch.testing.assert_close(out, want_logits, rtol=0, atol=0)
    from memrl.compile import compiled_graphs
    before = compiled_graphs()
    model(ids)
    assert compiled_graphs() == before and gen.lifetime["compiles"] == graphs
    uncompile_layers(model)
    assert all("attention_inputs" not in vars(layer) for layer in model.model.layers)
