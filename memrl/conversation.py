"""The `conversation` condition as token ids: a real multi-turn chat, built token-in/token-out, trained as one row.

    user  <question> q </question> <segment> shard 1 </segment> ...    assistant  reply 1   (≤ memory_cap_tokens)
    user  ... shard 2 ...                                               assistant  reply 2
    ...
    user  <question> q </question> ... final instruction                assistant  answer    (≤ response_max_tokens)

(memrl/templates.py holds the two user-message templates.) This is the paper's full-history *training* baseline
(§3.2: "the concatenated chat history of all previous turns"); the `full_history` condition stays the paper's
evaluation condition (§4: all shards so far in one prompt, the model's own replies never shown).

Token-in/token-out: turn t's prompt ids = turn t−1's prompt ids + its reply ids exactly as sampled (stop token
included) + the new user message's ids. Nothing is decoded and re-tokenized, so the policy is trained on exactly
the tokens it conditioned on, and the generator can continue from the conversation's KV cache (memrl/kv_retain.py).

The user message's ids use the chat template's own delimiters, found by RENDERING the template (never hard-coded
per family): `ChatContinuation.from_tokenizer` renders [user U1, assistant A1, user U2] + generation prompt with
sentinel strings and cuts the text at them:
    ... U1 <user_close> A1 <reply_end><user_open> U2 <user_close>
e.g. ChatML (Qwen): reply_end "<|im_end|>", user_open "\\n<|im_start|>user\\n",
     user_close "<|im_end|>\\n<|im_start|>assistant\\n"; Llama 3: "<|eot_id|>", "<|start_header_id|>user...".
reply_end must be the text of one of the tokenizer's stop ids (the token that ends a reply when the model stops);
a reply that ended with it is followed by user_open + text + user_close; a reply cut by its token budget (or
ended by another stop id, e.g. Qwen's <|endoftext|>) gets the template's reply_end first, as a re-render would.
Base models (no chat template) use a plain text convention: the next message follows the reply after a blank line
(RAW_TURN_SEPARATOR), the reply's own stop token kept.

When the ids equal a full render of the same messages (tests/test_conversation.py checks it): whenever the
template renders history verbatim (ChatML, e.g. Qwen2/2.5) and every reply's ids are how the tokenizer encodes its
text. Known exceptions, where the code keeps the model's own tokens (what it actually conditioned on):
  - a reply that stopped on another stop id than reply_end (Qwen's <|endoftext|>) keeps it, then reply_end follows;
  - templates that rewrite history: Qwen3's drops the <think>…</think> block of earlier assistant turns, and
    Qwen3-Thinking's generation prompt opens "<think>\\n", which a re-rendered history lacks; Llama 3's trims
    whitespace around every message;
  - a reply sampled as a non-canonical tokenization of its text (BPE), or bytes that are not valid UTF-8.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from memrl.algo import TurnRecord
from memrl.tokenizer import Tokenizer

RAW_TURN_SEPARATOR = "\n\n"  # base models: a blank line between a reply and the next user message
_SENTINELS = ("MEMRLUSERONE", "MEMRLASSISTANTONE", "MEMRLUSERTWO")  # survive any template unchanged


@dataclass(frozen=True)
class ChatContinuation:
    chat: bool
    reply_end: str = ""  # closes an assistant reply (the text of reply_end_id)
    reply_end_id: int = -1  # the stop id whose text is reply_end; -1 for base models
    user_open: str = ""  # between a closed reply and the next user message's content
    user_close: str = ""  # after a user message's content, up to where the assistant's reply begins

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "ChatContinuation":
        if not tokenizer.chat:
            return cls(chat=False)
        u1, a1, u2 = _SENTINELS
        hf = tokenizer.hf
        full = hf.apply_chat_template([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                       {"role": "user", "content": u2}], add_generation_prompt=True, tokenize=False)
        one = hf.apply_chat_template([{"role": "user", "content": u1}], add_generation_prompt=True, tokenize=False)
        if not all(s in full for s in _SENTINELS) or full.index(a1) > full.index(u2):
            raise ValueError("the chat template does not render a user / assistant / user conversation in order; "
                             "the conversation condition needs one")
        between = full[full.index(a1) + len(a1): full.index(u2)]
        user_close = full[full.index(u2) + len(u2):]
        if not one.endswith(u1 + user_close):
            raise ValueError(f"the chat template ends the last user message differently in a one-message chat "
                             f"({one[one.index(u1) + len(u1):]!r}) and in a longer one ({user_close!r}): a "
                             f"conversation cannot be extended token by token with it")
        ends = [(tokenizer.decode([s], skip_special_tokens=False), s) for s in sorted(tokenizer.stop_ids)]
        ends = [(text, s) for text, s in ends if text and between.startswith(text)]
        if not ends:
            raise ValueError(f"the chat template closes an assistant reply with {between!r}, which starts with none "
                             f"of the stop tokens {sorted(tokenizer.stop_ids)}: a reply that stopped could not be "
                             f"continued token by token")
        reply_end, reply_end_id = max(ends, key=lambda e: len(e[0]))  # the longest stop-token text written there
        return cls(True, reply_end, reply_end_id, between[len(reply_end):], user_close)

    def next_user_text(self, reply_ids: Sequence[int], user_text: str) -> str:
        """What follows a reply's ids before the assistant's next reply, as text (tokenized on its own: it starts
        at a special token or after a stop token, so its tokens are those of a full render)."""
        if not self.chat:
            return RAW_TURN_SEPARATOR + user_text
        closed = len(reply_ids) > 0 and reply_ids[-1] == self.reply_end_id
        return ("" if closed else self.reply_end) + self.user_open + user_text + self.user_close


def conversation_row(turns: Sequence[TurnRecord]) -> TurnRecord:
    """One trajectory's conversation turns (in turn order) -> ONE training record: the whole chat as one sequence,
    prompt = the first user message, response_spans = every assistant reply (the only trained tokens), the sampler's
    log-probs of all replies in order. Checks the token-in/token-out invariant (each turn's prompt extends the
    previous turn's prompt + reply)."""
    first = turns[0]
    P0 = len(first.prompt_ids)
    seq = first.prompt_ids + first.response_ids
    spans, logprobs = [(0, len(first.response_ids))], list(first.logprobs)
    for rec in turns[1:]:
        assert rec.trajectory_id == first.trajectory_id and rec.turn_index > 0, "one trajectory's turns, in order"
        assert rec.prompt_ids[:len(seq)] == seq, (
            f"trajectory {rec.trajectory_id}, turn {rec.turn_index}: the prompt does not extend the previous turn's "
            f"prompt + reply (token-in/token-out broken)")
        start = len(rec.prompt_ids) - P0
        spans.append((start, start + len(rec.response_ids)))
        logprobs += rec.logprobs
        seq = rec.prompt_ids + rec.response_ids
    last = turns[-1]
    return TurnRecord(prompt_ids=list(first.prompt_ids), response_ids=seq[P0:], logprobs=logprobs,
                      trajectory_id=first.trajectory_id, group_id=first.group_id, turn_index=last.turn_index,
                      kind="conversation", finish_reason=last.finish_reason, response_spans=spans)


def conversation_rows(records: Sequence[TurnRecord]) -> list[TurnRecord]:
    """Per-turn records of conversation trajectories -> one row per trajectory, in trajectory order."""
    by_traj: dict[int, list[TurnRecord]] = defaultdict(list)
    for rec in records:
        by_traj[rec.trajectory_id].append(rec)
    return [conversation_row(sorted(by_traj[t], key=lambda r: r.turn_index)) for t in sorted(by_traj)]


class ConversationTurns:
    """The conversation condition's state during one rollout (memrl/rollout.py): each trajectory's next prompt ids
    and the handle of the retained K/V they extend (kv_reuse), the encoded user messages (cached), the window check.

    A conversation of k shards has k + 1 turns: turn t < k answers shard t's user message (a memory-kind turn,
    budget memory_cap_tokens), turn k the final message (budget response_max_tokens)."""

    def __init__(self, tokenizer: Tokenizer, templates, window: int, kv_reuse: bool):
        self.tokenizer, self.templates, self.window, self.kv_reuse = tokenizer, templates, window, kv_reuse
        self.continuation = ChatContinuation.from_tokenizer(tokenizer)
        self.next_ids: dict[int, list[int]] = {}  # trajectory -> its next turn's prompt ids
        self.handles: dict[int, int | None] = {}  # trajectory -> the retained K/V those ids extend
        self._encoded: dict[tuple[bool, str], list[int]] = {}

    def user_text(self, episode, turn: int) -> str:
        if turn < len(episode.shards):
            return self.templates.conversation_shard_turn(episode.question, episode.shards[turn])
        return self.templates.conversation_final_turn(episode.question)

    def _encode(self, text: str, first: bool) -> list[int]:
        key = (first, text)
        if key not in self._encoded:
            self._encoded[key] = self.tokenizer.encode_prompt(text) if first else self.tokenizer.encode(text)
        return self._encoded[key]

    def prompt_ids(self, traj, turn: int) -> list[int]:
        """This turn's prompt: the first user message (turn 0), else the previous prompt + reply + this message."""
        ids = self._encode(self.user_text(traj.episode, 0), True) if turn == 0 else self.next_ids[traj.trajectory_id]
        if len(ids) >= self.window:
            raise ValueError(f"episode {traj.episode.id}: the conversation reaches {len(ids)} tokens at turn {turn}, "
                             f"the model's context window is {self.window}: a conversation cannot be cut (its ids "
                             f"must extend the previous turn's); evaluate documents this long under full_history, "
                             f"or lower the reply budgets")
        return ids

    def extends(self, traj) -> int | None:
        return self.handles.get(traj.trajectory_id)

    def slot_len(self, episodes, memory_cap_tokens: int, response_max_tokens: int) -> int:
        """The longest any conversation of `episodes` can grow (every reply at its budget, each cut one closed by the
        template), capped at the window: the generator keeps one slot layout for the whole rollout."""
        longest = 0
        for ep in episodes:
            k = len(ep.shards)
            n = len(self._encode(self.user_text(ep, 0), True)) + k * memory_cap_tokens + response_max_tokens
            n += sum(len(self._encode(self.continuation.next_user_text((), self.user_text(ep, t)), False))
                     for t in range(1, k + 1))
            longest = max(longest, n)
        return min(longest, self.window)

    def record(self, traj, turn: int, prompt_ids: list[int], completion) -> None:
        """After a turn: the next prompt = this prompt + the reply as sampled + the next user message."""
        ep = traj.episode
        self.handles[traj.trajectory_id] = completion.handle
        if turn < len(ep.shards):
            text = self.continuation.next_user_text(completion.token_ids, self.user_text(ep, turn + 1))
            self.next_ids[traj.trajectory_id] = prompt_ids + list(completion.token_ids) + self._encode(text, False)

    def free(self, generator) -> None:
        """Drop every retained K/V of this rollout (a conversation that ended early, or an error part-way)."""
        if self.kv_reuse:
            generator.free([h for h in self.handles.values() if h is not None])
        self.handles.clear()
