"""The conversation condition (memrl/conversation.py): the ids of every turn against a full chat-template render of
the same messages (transformers' apply_chat_template, the independent side), KV continuation against a fresh prefill
of every turn, and the training row's loss mask against the replies themselves."""
from __future__ import annotations

import pytest
import torch

from memrl import synthetic
from memrl.algo import pack_turns
from memrl.conversation import RAW_TURN_SEPARATOR, ChatContinuation
from memrl.episodes import Episode
from memrl.generate import Completion, Generator
from memrl.hf_io import load_model
from memrl.config import RolloutCfg
from memrl.rollout import decode_response, rollout
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer, make_byte_tokenizer
from tests.tiny import make_tiny_checkpoint

# Llama 3's header layout (its real template also adds a dated system block; not needed here), on the byte
# tokenizer's added specials: every message's content is trimmed, as Llama 3's template does
LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen3's rule for earlier assistant turns, reduced to its core: the <think> block is dropped from history
QWEN3_LIKE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def budgets(memory_cap_tokens: int, response_max_tokens: int) -> RolloutCfg:
    return RolloutCfg(memory_cap_tokens=memory_cap_tokens, response_max_tokens=response_max_tokens)


def byte_tokenizer(path, template: str | None = None, specials=()) -> Tokenizer:
    """The repo's byte tokenizer (ChatML), or with another chat template and extra special tokens."""
    from transformers import AutoTokenizer

    make_byte_tokenizer(path)
    if template is None:
        return Tokenizer.from_pretrained(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    hf.add_special_tokens({"additional_special_tokens": list(specials)})
    hf.chat_template = template
    return Tokenizer(hf)


class ScriptedChat:
    """A generator that replies with fixed texts: reply i of a conversation is `replies[turn]`, ended by `end` (a stop
    id) or cut (end None). It records what it was asked, so the test can compare every prompt."""

    window = 10**6

    def __init__(self, tok: Tokenizer, replies: list[tuple[str, int | None]]):
        self.tok, self.replies, self.prompts, self.last_stats = tok, replies, [], {}

    def generate(self, prompts, params, **continuation):
        out = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            self.prompts.append(list(ids))
            turn = self.tok.decode(ids, skip_special_tokens=False).count("<question>") - 1  # user messages - 1
            text, end = self.replies[min(turn, len(self.replies) - 1)]
            tokens = self.tok.encode(text) + ([end] if end is not None else [])
            out += [Completion(i, j, tokens, [-0.5] * len(tokens), "stop" if end is not None else "length")
                    for j in range(p.n)]
        return out

    def free(self, handles):
        pass


def render(tok: Tokenizer, messages: list[dict]) -> list[int]:
    ids = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_messages(tpl: Templates, ep: Episode, replies: list[str], upto: int) -> list[dict]:
    """The chat of turns 0..upto as messages: user message t, then the reply to it as its text."""
    msgs = []
    for t in range(upto + 1):
        user = (tpl.conversation_shard_turn(ep.question, ep.shards[t]) if t < len(ep.shards)
                else tpl.conversation_final_turn(ep.question))
        msgs.append({"role": "user", "content": user})
        if t < upto:
            msgs.append({"role": "assistant", "content": replies[t]})
    return msgs


EPISODE = Episode("e", "How many coins does Ann have?", ["Ann has 3 coins.", "Bob gives Ann 2.", "Ann loses 1."], "4")


def test_delimiters_are_derived_from_the_template(tmp_path):
    chatml = ChatContinuation.from_tokenizer(byte_tokenizer(tmp_path / "chatml"))
    assert (chatml.reply_end, chatml.user_open, chatml.user_close) == (
        "<|im_end|>", "\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    llama = ChatContinuation.from_tokenizer(byte_tokenizer(
        tmp_path / "llama", LLAMA3_LIKE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                          "<|eot_id|>"]))
    assert (llama.reply_end, llama.user_open, llama.user_close) == (
        "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="none of the stop tokens"):  # a reply closed by no stop token
        ChatContinuation.from_tokenizer(byte_tokenizer(tmp_path / "bad", CHATML_CLOSED_BY_TEXT))
    base = byte_tokenizer(tmp_path / "base")
    base.chat = False
    assert ChatContinuation.from_tokenizer(base).next_user_text([5], "next") == RAW_TURN_SEPARATOR + "next"


CHATML_CLOSED_BY_TEXT = (
    "{% for message in messages %}[{{ message['role'] }}]: {{ message['content'] }} [end]\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}")


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_conversation_ids_equal_a_full_render(tmp_path, template):
    """Every turn's prompt ids == apply_chat_template of the messages so far (replies as their text), for replies
    that stopped on the template's own end token and for one cut by its budget (the template's end is added)."""
    if template == "chatml":
        tok = byte_tokenizer(tmp_path / "tok")
        end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    else:
        tok = byte_tokenizer(tmp_path / "tok", LLAMA3_LIKE, ["<|begin_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>", "<|eot_id|>"])
        end = tok.hf.convert_tokens_to_ids("<|eot_id|>")
    replies = [("Ann: 3.", end), ("Ann: 3 + 2 = 5", None), ("Ann: 4.", end), ("\\boxed{4}", end)]  # turn 1 is cut
    gen = ScriptedChat(tok, replies)
    tpl = Templates()
    res = rollout(gen, tok, [EPISODE], "conversation", 2, tpl, budgets(8, 8), greedy=True, kv_reuse=False)
    turns = [r for r in res.records if r.trajectory_id == 0]
    assert [r.kind for r in turns] == ["memory"] * 3 + ["final"]
    for t, rec in enumerate(turns):
        assert rec.prompt_ids == render(tok, chat_messages(tpl, EPISODE, [r[0] for r in replies], t)), t
        assert decode_response(tok, rec.response_ids) == replies[t][0]
    assert res.trajectories[0].final_text == "\\boxed{4}"


def test_where_a_render_differs_the_model_keeps_its_own_tokens(tmp_path):
    """Named exceptions: (1) a reply that stopped on ANOTHER stop id (<|endoftext|>) keeps it, and the template's
    <|im_end|> follows; (2) a template that rewrites history (Qwen3: the <think> block of earlier turns dropped, Llama
    3: whitespace trimmed) renders earlier turns differently from what the model saw: the ids keep what it saw."""
    tok = byte_tokenizer(tmp_path / "tok")
    eot = tok.hf.convert_tokens_to_ids("<|endoftext|>")
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    gen = ScriptedChat(tok, [("Ann: 3.", eot), ("\\boxed{3}", im_end)])
    ep = Episode("e", "How many?", ["Ann has 3."], "3")
    res = rollout(gen, tok, [ep], "conversation", 1, Templates(), budgets(8, 8), greedy=True,
                  kv_reuse=False)
    final = res.records[-1]
    rendered = render(tok, chat_messages(Templates(), ep, ["Ann: 3."], 1))
    reply_end = len(res.records[0].prompt_ids) + len(tok.encode("Ann: 3."))
    assert final.prompt_ids == rendered[:reply_end] + [eot] + rendered[reply_end:]

    qwen3 = byte_tokenizer(tmp_path / "qwen3", QWEN3_LIKE)
    end = qwen3.hf.convert_tokens_to_ids("<|im_end|>")
    thinking = "<think>\nadd them\n</think>\n\nAnn: 3."
    gen = ScriptedChat(qwen3, [(thinking, end), ("\\boxed{3}", end)])
    res = rollout(gen, qwen3, [ep], "conversation", 1, Templates(), budgets(40, 8), greedy=True,
                  kv_reuse=False)
    final = res.records[-1]
    assert qwen3.decode(final.prompt_ids, skip_special_tokens=False).count("<think>") == 1  # what the model wrote
    rendered = qwen3.decode(render(qwen3, chat_messages(Templates(), ep, [thinking], 1)), skip_special_tokens=False)
    assert "<think>" not in rendered  # the template's history drops it: equality cannot hold for such templates


def naive_greedy(model, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Full recompute per token, argmax over the tokenizer's real ids (the generator masks the padding rows)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1, :vocab].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    # a 1,024-token window: a conversation of byte tokens over three coin-sum shards takes ~520
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen2", seed=3, max_position_embeddings=1024)
    return load_model(path, dtype=torch.float32), Tokenizer.from_pretrained(path)


def episodes():
    # three shards each (the task has 3-5): short conversations, quick tests
    eps = [Episode(e.id, e.question, e.shards[:3], e.answer) for e in synthetic.make_episodes(3, "train", seed=4)]
    assert all(len(e.shards) == 3 for e in eps)
    eps[1] = Episode("short", eps[1].question, eps[1].shards[:1], "1")  # ends two turns before the others
    return eps


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_continuation_equals_prefilling_every_turn(policy, greedy):
    """The rollout with KV reuse vs the same rollout prefilling the whole chat every turn: identical tokens (greedy
    and seeded sampling), log-probs within 1e-5; and greedy replies equal a full-recompute loop on each prompt."""
    model, tok = policy
    G = 1 if greedy else 3
    kw = dict(seed=7, step=2, greedy=greedy)
    gen = Generator(model, tok.vocab_size)
    reused = rollout(gen, tok, episodes(), "conversation", G, Templates(), budgets(6, 5), **kw)
    assert len(gen.retained) == 0  # every retained K/V freed when its conversation ended
    assert sum(s["reused_kv_tokens"] for s in reused.generate_stats) > 0
    fresh = rollout(Generator(model, tok.vocab_size), tok, episodes(), "conversation", G, Templates(),
                    budgets(6, 5), kv_reuse=False, **kw)
    assert len(reused.records) == len(fresh.records)
    for a, b in zip(reused.records, fresh.records):
        assert (a.trajectory_id, a.turn_index) == (b.trajectory_id, b.turn_index)
        assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
        if greedy:  # a stop only ends the reply early: its tokens are the loop's first ones
            assert a.response_ids == naive_greedy(model, a.prompt_ids, len(a.response_ids), tok.vocab_size)
    # each call after the first prefilled only the new ids, not the chat so far
    prefilled = sum(s["prefill_tokens"] for s in reused.generate_stats)
    assert prefilled < sum(s["prefill_tokens"] for s in fresh.generate_stats)


def test_training_row_masks_exactly_every_reply(policy):
    model, tok = policy
    res = rollout(Generator(model, tok.vocab_size), tok, episodes(), "conversation", 2, Templates(),
                  budgets(6, 5), seed=1)
    rows = res.training_records()
    assert len(rows) == len(res.trajectories) == 6 and all(r.kind == "conversation" for r in rows)
    advantages = torch.linspace(-1, 1, 6)
    for row in rows:
        turns = sorted((r for r in res.records if r.trajectory_id == row.trajectory_id), key=lambda r: r.turn_index)
        assert len(turns) == len(row.response_spans) == len(res.trajectories[row.trajectory_id].episode.shards) + 1
        # the row is the last turn's prompt + its reply: the whole chat, in one sequence
        assert row.prompt_ids + row.response_ids == turns[-1].prompt_ids + turns[-1].response_ids
        batch = pack_turns([row], advantages, max_tokens=10**6)[0]
        replies = [t for rec in turns for t in rec.response_ids]
        assert batch.targets[batch.response_rows].tolist() == replies  # every reply token, in order, nothing else
        assert batch.num_response_tokens == len(replies) == row.num_response_tokens
        # the rows that predict each turn's reply are exactly its positions in the chat
        expected = torch.zeros(batch.num_tokens, dtype=torch.bool)
        for rec in turns:
            P = len(rec.prompt_ids)
            expected[P - 1: P - 1 + len(rec.response_ids)] = True
        assert torch.equal(batch.response_mask, expected)
        assert torch.equal(batch.rollout_logprobs, torch.tensor([x for rec in turns for x in rec.logprobs]))
        assert torch.equal(batch.advantages, advantages[row.trajectory_id].expand(len(replies)))


def test_a_conversation_beyond_the_window_is_refused_clearly(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2", seed=3)  # the default 512-token window
    model, tok = load_model(path, dtype=torch.float32), Tokenizer.from_pretrained(path)
    long = Episode("long", "How many?", ["x" * 200] * 3, "1")  # 3 turns of ~240 tokens > the 512-token window
    gen = Generator(model, tok.vocab_size)
    with pytest.raises(ValueError, match="context window is 512"):
        rollout(gen, tok, [long], "conversation", 1, Templates(), budgets(4, 4))
    assert len(gen.retained) == 0  # freed on the way out
