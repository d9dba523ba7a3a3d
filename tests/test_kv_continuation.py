"""KV continuation in the generator (memrl/kv_retain.py): a request that extends a retained sequence prefills only its
new ids, and decodes exactly as a fresh prefill of the whole ids does (greedy tokens identical, log-probs within
1e-5), and as a full-recompute greedy loop does."""
import copy

import pytest
import torch

from memrl.generate import Generator, SamplingParams
from memrl.hf_io import load_model
from tests.test_generate import naive_greedy, ragged_prompts
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=5), dtype=torch.float32)


def greedy(n, stop=frozenset()):
    return SamplingParams(max_new_tokens=n, greedy=True, stop_ids=stop)


def conversation_turns(gen, starts, suffixes, n_new, reuse: bool, **gen_kw):
    """Several conversations, one generate() call per turn: turn t's ids = turn t-1's ids + its completion + the
    next suffix. reuse: extend the retained K/V; else prefill every turn's whole ids. -> per turn, per
    conversation: (ids, completion)."""
    ids = [list(s) for s in starts]
    handles = [None] * len(ids)
    turns, out = [], []
    for t in range(len(suffixes[0]) + 1):
        if t:
            ids = [i + c.token_ids + suf[t - 1] for i, c, suf in zip(ids, out, suffixes)]
        last = t == len(suffixes[0])
        kw = dict(retain=reuse and not last, extend=handles if reuse else None)
        out = gen.generate(ids, greedy(n_new[t]), **kw, **gen_kw)
        handles = [c.handle for c in out]
        assert all((h is not None) == (reuse and not last) for h in handles)
        turns.append([(list(i), c) for i, c in zip(ids, out)])
    assert len(gen.retained) == 0  # the last turn retained nothing and every handle was used
    return turns


def test_continuation_equals_fresh_prefill_and_the_naive_loop(model):
    starts = ragged_prompts(3, lens=[7, 2, 13])
    suffixes = [[s] for s in ragged_prompts(4, lens=[5, 1, 9])]  # one more user message per conversation
    suffixes = [s + t for s, t in zip(suffixes, [[x] for x in ragged_prompts(6, lens=[3, 8, 1])])]  # and another
    n_new = [6, 4, 5]
    gen = Generator(model, model.config.vocab_size)
    reused = conversation_turns(gen, starts, suffixes, n_new, reuse=True)
    assert gen.last_stats["reused_kv_tokens"] > 0
    # the call of the last turn prefilled only the new ids of each conversation
    new_ids = sum(len(s[-1]) + 1 for s in suffixes)  # suffix + the previous completion's last token
    assert gen.last_stats["prefill_tokens"] == new_ids
    fresh = conversation_turns(Generator(model, model.config.vocab_size), starts, suffixes, n_new, reuse=False)
    for turn_r, turn_f in zip(reused, fresh):
        for (ids_r, c_r), (ids_f, c_f) in zip(turn_r, turn_f):
            assert ids_r == ids_f and c_r.token_ids == c_f.token_ids  # greedy: identical tokens
            assert max(abs(a - b) for a, b in zip(c_r.logprobs, c_f.logprobs)) <= 1e-5
            assert c_r.token_ids == naive_greedy(model, ids_r, len(c_r.token_ids))


def test_continuation_with_forks_queueing_and_compaction(model):
    """Retained rows finish at different steps (stop ids), a small KV budget makes work wait for free slots, fresh
    requests with n samples share the call: the continuations still equal fresh prefills."""
    # 4 slots of 64 tokens; prefill batches of at most 24 padded new ids, 96 keys: several per admission
    gen = Generator(model, model.config.vocab_size, kv_budget_tokens=4 * 64, prefill_tokens=24)
    starts = ragged_prompts(8, lens=[3, 11, 6, 9, 4, 2])
    first = gen.generate(starts, greedy(12), retain=True)
    stops = frozenset({first[0].token_ids[3], first[2].token_ids[1]})  # some continuations stop early
    suffixes = ragged_prompts(9, lens=[4, 1, 7, 2, 5, 3])
    ids = [s + c.token_ids + x for s, c, x in zip(starts, first, suffixes)]
    extra = ragged_prompts(10, lens=[5, 8])  # fresh work in the same call, one of them forked n=3
    params = [greedy(10, stops)] * len(ids) + [greedy(6), SamplingParams(max_new_tokens=7, n=3, seed=4)]
    out = gen.generate(ids + extra, params, extend=[c.handle for c in first] + [None, None], retain=True)
    assert gen.last_stats["admissions"] > 1  # work waited for free slots
    ref = Generator(model, model.config.vocab_size)
    fresh = ref.generate(ids + extra, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in fresh]
    for a, b in zip(out, fresh):
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) <= 1e-5
    assert {c.finish_reason for c in out[:6]} == {"stop", "length"}
    # every completion retained; the forked samples each got their own handle, and extend in turn
    assert len(gen.retained) == len(out) == 10 and len({c.handle for c in out}) == 10
    more = [x + c.token_ids + [5, 6] for x, c in zip([extra[1]] * 3, out[-3:])]
    again = gen.generate(more, greedy(4), extend=[c.handle for c in out[-3:]])
    assert [c.token_ids for c in again] == [naive_greedy(model, m, 4) for m in more]
    gen.free(c.handle for c in out[:-3])
    assert len(gen.retained) == 0 and gen.retained.tokens_held == 0


def test_continuation_errors_are_clear(model):
    gen = Generator(model, model.config.vocab_size)
    p = ragged_prompts(11, lens=[6])[0]
    c = gen.generate([p], greedy(3), retain=True)[0]
    with pytest.raises(ValueError, match="does not extend retained sequence"):
        gen.generate([p + [1, 2]], greedy(2), extend=[c.handle])  # skips the completion
    with pytest.raises(ValueError, match="n=1"):
        gen.generate([p + c.token_ids + [1]], SamplingParams(max_new_tokens=2, n=2), extend=[c.handle])
    with pytest.raises(ValueError, match="names no retained sequence"):
        gen.generate([p], greedy(2), extend=[c.handle + 100])
    assert len(gen.retained) == 1  # a refused call takes nothing
    gen.generate([p + c.token_ids + [1]], greedy(2), extend=[c.handle])
    with pytest.raises(ValueError, match="names no retained sequence"):  # a handle is used once
        gen.generate([p + c.token_ids + [1]], greedy(2), extend=[c.handle])
    small = Generator(model, model.config.vocab_size, retain_budget_tokens=8)
    with pytest.raises(ValueError, match="retain_budget_tokens"):
        small.generate([p], greedy(5), retain=True)  # 6 + 5 - 1 = 10 tokens of K/V > 8


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_continuation_under_the_gpu_schedule_on_cpu(model, monkeypatch, kernels):
    """The GPU loop without a GPU (as tests/test_generate.py's test_gpu_schedule_on_cpu): padded graph buckets,
    several decode steps between host syncs, so a finished retained row lingers in the batch before its K/V is
    copied out; it must not disturb the positions it keeps. "triton": the decode attention kernel writes the K/V.
    On a machine with CUDA the same schedule runs there, eagerly (Triton's interpreter is only set up without a GPU,
    and compiled Triton kernels cannot read CPU tensors)."""
    if torch.cuda.is_available():
        model = copy.deepcopy(model).cuda()
    eager = dict(cuda_graphs=False, compile=False)
    starts = ragged_prompts(12, lens=[5, 9, 3])
    probe = Generator(model, model.config.vocab_size, kernels="torch", **eager).generate(starts, greedy(8))
    stops = frozenset({probe[1].token_ids[2]})  # conversation 1 stops early and lingers up to sync_every steps
    gen = Generator(model, model.config.vocab_size, kernels=kernels, sync_every=4, kv_budget_tokens=3 * 48, **eager)
    gen.runner.pad_batches = gen.runner.rehearse = True
    monkeypatch.setattr("memrl.model_runner._bucket", lambda n, cap: cap)
    first = gen.generate(starts, greedy(8, stops), retain=True)
    assert first[1].finish_reason == "stop" and len(first[1].token_ids) == 3
    ids = [s + c.token_ids + [7, 8, 9] for s, c in zip(starts, first)]
    out = gen.generate(ids, greedy(5), extend=[c.handle for c in first])
    fresh = Generator(model, model.config.vocab_size, kernels="torch", **eager).generate(ids, greedy(5))
    assert [c.token_ids for c in out] == [c.token_ids for c in fresh]
    assert max(abs(x - y) for a, b in zip(out, fresh) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


@pytest.mark.slow  # inductor compiles on CPU for minutes
def test_torch_compile_traces_the_continuation_prefill(model):
    """The continuation prefill is compiled like the others (CPU inductor here; the GPU benchmark runs it there with
    compile_fallback=False): the extend-attention custom op with its host-int key length traces, and equals eager."""
    starts = ragged_prompts(13, lens=[4, 10])
    runs = []
    for compile_ in (True, False):
        gen = Generator(model, model.config.vocab_size, compile=compile_, compile_fallback=False)
        first = gen.generate(starts, greedy(5), retain=True)
        ids = [s + c.token_ids + [3, 4, 5][:i + 1] for i, (s, c) in enumerate(zip(starts, first))]
        runs.append(gen.generate(ids, greedy(5), extend=[c.handle for c in first]))
        assert gen.compile == compile_
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    assert max(abs(x - y) for a, b in zip(*runs) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


@pytest.mark.gpu
def test_continuation_on_the_gpu_with_graphs_and_compile(tmp_path):
    """The GPU path as training runs it (CUDA graphs, torch.compile, Triton decode attention): a continuation decodes
    as a fresh prefill of the whole ids does, greedy and seeded sampling, fp32."""
    model = load_model(make_tiny_checkpoint(tmp_path, "qwen2", seed=9), dtype=torch.float32, device="cuda")
    starts = ragged_prompts(14, lens=[6, 30, 2, 17])
    params = [greedy(20), SamplingParams(max_new_tokens=20, seed=5), greedy(9, frozenset({7, 8, 9})), greedy(1)]
    gen = Generator(model, model.config.vocab_size, cuda_graphs=True, compile=True, compile_fallback=False)
    first = gen.generate(starts, params, retain=True)
    ids = [s + c.token_ids + x for s, c, x in zip(starts, first, ragged_prompts(15, lens=[3, 11, 1, 40]))]
    out = gen.generate(ids, params, extend=[c.handle for c in first], min_slot_len=256)
    fresh = Generator(model, model.config.vocab_size, cuda_graphs=True, compile=True).generate(ids, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in fresh]
    assert max(abs(x - y) for a, b in zip(out, fresh) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
    assert gen.last_stats["prefill_tokens"] == sum(len(i) - len(s) - len(c.token_ids) + 1
                                                   for i, s, c in zip(ids, starts, first))
