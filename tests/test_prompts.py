"""Prompts for instruct and thinking models: which templates each preset uses, and a thinking model's turns (the
reply after `</think>` is the memory / the answer; the caps), on a scripted generator that replies with reasoning."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from memrl import config as memrl_config
from memrl import templates
from memrl.episodes import Episode
from memrl.generate import Completion
from memrl.reward import score
from memrl.config import RolloutCfg
from memrl.rollout import decode_response, reply_start, rollout
from memrl.templates import Templates
from memrl.tokenizer import CHATML_TEMPLATE, Tokenizer, make_byte_tokenizer


# ----------------------------------------------------------------------------- templates

def test_paper_presets_ask_for_reasoning_and_a_box_default_keeps_its_tasks_templates():
    for name in ("paper-1.5b", "paper-4b"):
        r = memrl_config.preset(name).rollout
        assert r.final_template == templates.REASONED_FINAL_TEMPLATE
        assert r.single_turn_template == templates.REASONED_SINGLE_TURN_TEMPLATE
        assert r.memory_template == templates.MEMORY_TEMPLATE  # the memory turn stays Figure 4's
    tpl = Templates.from_config(memrl_config.preset("paper-1.5b").rollout)
    assert tpl.final_turn("How many?", "Bob has 7.") == (
        "<question> How many? </question>\n<memory> Bob has 7. </memory>\n"
        "Reason step by step, then give your final answer within \\boxed{}.")
    assert tpl.single_turn_prompt("How many?", "Bob gets 3. How many?").endswith("final answer within \\boxed{}.")
    # the built-in synthetic task's policy learnt the task's own short prompts (memrl/synthetic.py): the default
    # preset uses them; the dataclass defaults stay Figure 4
    from memrl import synthetic

    assert Templates.from_config(memrl_config.preset("default").rollout) == Templates(
        memory=synthetic.MEMORY_TEMPLATE, final=synthetic.FINAL_TEMPLATE, single_turn=synthetic.SINGLE_TURN_TEMPLATE)
    assert Templates().final.endswith("Your final answer:")


# ----------------------------------------------------------------------------- a thinking tokenizer

@pytest.fixture(scope="module", params=["reasoning opened in the reply", "reasoning opened by the template"])
def thinking_tok(request, tmp_path_factory) -> Tokenizer:
    """The byte tokenizer plus Qwen3's <think> / </think> (added, not special: decode keeps them as text). The second
    variant's chat template opens <think> in the generation prompt, as Qwen3-*-Thinking-2507's does."""
    hf = AutoTokenizer.from_pretrained(str(make_byte_tokenizer(tmp_path_factory.mktemp("tok"))))
    hf.add_tokens(["<think>", "</think>"])
    if request.param == "reasoning opened by the template":
        hf.chat_template = CHATML_TEMPLATE.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")
    tok = Tokenizer(hf)
    assert opens_in_prompt(tok) == (request.param == "reasoning opened by the template")
    return tok


def opens_in_prompt(tok: Tokenizer) -> bool:
    return tok.think_start_id in tok.encode_prompt("x")


def reply(tok: Tokenizer, reasoning: str, text: str, closed: bool = True, stop: bool = True) -> list[int]:
    """A thinking model's response ids: [<think>] reasoning [</think>] text [<|im_end|>]."""
    ids = [] if opens_in_prompt(tok) else [tok.think_start_id]
    ids += tok.encode(reasoning)
    if closed:
        ids += [tok.think_end_id] + tok.encode(text)
    return ids + ([tok.hf.convert_tokens_to_ids("<|im_end|>")] if stop else [])


def test_the_reply_is_what_follows_the_reasoning(thinking_tok, tmp_path):
    tok = thinking_tok
    prompt = tok.encode_prompt("<question> How many? </question>")
    full = reply(tok, "3 + 4 = 7, so \\boxed{6} is wrong", "\n\nBob has 7.")
    assert decode_response(tok, full, prompt) == "Bob has 7."
    assert tok.decode(full[reply_start(tok, prompt, full):]).startswith("\n\nBob has 7.")
    # cut (or stopped) inside the reasoning: no reply at all, not the reasoning
    assert reply_start(tok, prompt, reply(tok, "3 + 4 =", "", closed=False, stop=False)) is None
    assert decode_response(tok, reply(tok, "3 + 4 =", "", closed=False, stop=False), prompt) == ""
    # a reply with no reasoning from a model that may think (template did not open it): the whole response
    if not opens_in_prompt(tok):
        plain = tok.encode("Bob has 7.") + [tok.hf.convert_tokens_to_ids("<|im_end|>")]
        assert decode_response(tok, plain, prompt) == "Bob has 7."
    # a vocabulary without </think>: nothing is treated as reasoning
    plain_tok = Tokenizer(AutoTokenizer.from_pretrained(str(make_byte_tokenizer(tmp_path))))
    assert plain_tok.think_end_id is None and reply_start(plain_tok, [], plain_tok.encode("a</think>b")) == 0


# ----------------------------------------------------------------------------- a rollout of a thinking model

class ScriptedThinker:
    """Stands in for memrl.generate.Generator: replies by turn kind with the scripted (reasoning, text), then applies
    the request's max_new_tokens and stop ids exactly as the Generator's contract says (the stop token is kept)."""

    def __init__(self, tok: Tokenizer, memory: tuple[str, str], final: tuple[str, str]):
        self.tok, self.script = tok, {"memory": memory, "final": final}
        self.calls: list[list[int]] = []  # max_new_tokens of every request
        self.last_stats: dict = {}

    def generate(self, prompts, params):
        params = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            kind = "memory" if "Updated memory:" in self.tok.decode(prompt) else "final"
            ids = reply(self.tok, *self.script[kind])
            stop_at = next((j for j, t in enumerate(ids) if t in p.stop_ids), len(ids))
            ids = ids[:min(stop_at + 1, p.max_new_tokens)]
            self.calls.append(p.max_new_tokens)
            for s in range(p.n):
                out.append(Completion(i, s, list(ids), [-0.5] * len(ids),
                                      "stop" if ids[-1] in p.stop_ids else "length"))
        return out


EPISODE = Episode("e", "How many coins does Bob have?", ["Bob gets 3.", "Bob gets 4."], "7")


def run(tok, gen, cap, answer, thinking_budget):
    tpl = Templates(final=templates.REASONED_FINAL_TEMPLATE)
    settings = RolloutCfg(memory_cap_tokens=cap, response_max_tokens=answer, thinking_budget_tokens=thinking_budget)
    return rollout(gen, tok, [EPISODE], "memory", 2, tpl, settings, seed=0)


def test_memory_and_answer_are_the_replies_after_reasoning(thinking_tok):
    tok = thinking_tok
    gen = ScriptedThinker(tok, memory=("add the coins: 3 + 4", "Bob has 7."),
                          final=("the memory says 7; \\boxed{6} would be wrong", "Bob has \\boxed{7}."))
    res = run(tok, gen, cap=12, answer=20, thinking_budget=64)
    assert set(gen.calls) == {12 + 64, 20 + 64}  # each turn: its own budget plus the reasoning allowance
    for tr in res.trajectories:
        assert tr.memories == ["Bob has 7.", "Bob has 7."] and tr.final_text == "Bob has \\boxed{7}."
        assert score(tr.final_text, EPISODE.answer, "gsm8k") == 1.0  # the boxed 6 in the reasoning is not read
    for rec in res.records:
        assert rec.finish_reason == "stop" and rec.response_ids[-1] in tok.stop_ids
        assert tok.think_end_id in rec.response_ids  # reasoning tokens stay in the record: the policy wrote them
    second = [r for r in res.records if r.turn_index == 1][0]
    assert "<memory> Bob has 7. </memory>" in tok.decode(second.prompt_ids)  # the carried memory holds no reasoning


def test_the_cap_bounds_the_reply_and_reasoning_has_its_own_budget(thinking_tok):
    tok = thinking_tok
    long_memory = "Bob has 7 coins after both shards."  # 34 byte tokens
    gen = ScriptedThinker(tok, memory=("3 + 4", long_memory), final=("7", "\\boxed{7}"))
    res = run(tok, gen, cap=10, answer=20, thinking_budget=64)
    for rec in (r for r in res.records if r.kind == "memory"):
        start = reply_start(tok, rec.prompt_ids, rec.response_ids)
        assert len(rec.response_ids) - start == 10 and rec.finish_reason == "length"  # cut at the cap, record too
        assert len(rec.logprobs) == len(rec.response_ids)
    assert all(m == long_memory[:10].strip() for tr in res.trajectories for m in tr.memories)
    # no reasoning allowance: the turn ends inside its reasoning and carries nothing forward
    res = run(tok, ScriptedThinker(tok, memory=("3 + 4 makes seven in all", "Bob has 7."), final=("7", "\\boxed{7}")),
              cap=10, answer=20, thinking_budget=0)
    assert all(m == "" for tr in res.trajectories for m in tr.memories)
    assert all("<memory>  </memory>" in tok.decode(r.prompt_ids) for r in res.records if r.turn_index == 1)
