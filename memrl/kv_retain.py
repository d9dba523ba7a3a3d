"""KV continuation: finished sequences' KV kept between generate() calls, so a conversation's next turn prefills only
what is new (memrl/generate.py's `retain=` and `extend=`).

    first = gen.generate([prompt], params, retain=True)[0]                 # first.handle names the kept KV
    ids = prompt + first.token_ids + next_user_message_ids                 # token-in/token-out: never re-tokenized
    second = gen.generate([ids], params, extend=[first.handle], retain=True)[0]   # prefills next_user_message_ids
    ...
    gen.free([second.handle])                                              # the conversation ended early

Why a store beside the slot cache rather than parked slots: slots are re-laid out by every call (slot_len follows
the call's longest sequence) and rows move during compaction, so a finished row's K/V is copied out of its slot
(only its valid positions) when it finishes, and copied into the slot of the request that extends it. Copying a
sequence costs one read + write of its K/V, a small fraction of prefilling it again (~3·params FLOPs per token).

Invariants
- A retained sequence is `tokens` = prompt + completion (the stop token included). Its K/V covers tokens[:-1]:
  the last sampled token was never fed through the model. A request extends it only with ids that start with all
  of `tokens` (checked: ValueError otherwise), and it prefills ids[len(tokens) - 1:], so the last sampled token's
  K/V is computed then, at its own position. Positions are absolute: position p of the conversation is position p
  of the cache, exactly as a fresh prefill of the whole ids would place it.
- A handle is used once: the call that extends it takes its K/V (a new handle names the extended sequence when that
  call retains again). `free` drops handles that will not be extended (a conversation that ended, an error path).
- Capacity: retained K/V lives outside the slot budget, in ordinary device memory, `tokens_held` tokens of
  bytes_per_token each; `max_tokens` (if set) bounds it and an excess raises ValueError naming the numbers. A
  sequence must still fit the model's context window when extended (the generator's usual prompt check).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Retained:
    tokens: list[int]  # prompt + completion of the finished sequence
    k: torch.Tensor  # [layers, Hkv, len(tokens) - 1, D]
    v: torch.Tensor

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]


class RetainedKV:
    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens
        self._store: dict[int, Retained] = {}
        self._next_handle = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def tokens_held(self) -> int:
        return sum(r.kv_len for r in self._store.values())

    def keep(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> int:
        """Store a finished sequence's K/V; returns its handle."""
        assert k.shape[2] == len(tokens) - 1, (k.shape, len(tokens))
        if self.max_tokens is not None and self.tokens_held + k.shape[2] > self.max_tokens:
            raise ValueError(f"retaining one more sequence ({k.shape[2]} tokens) would hold "
                             f"{self.tokens_held + k.shape[2]} tokens of retained KV, above the limit of "
                             f"{self.max_tokens} (Generator(retain_budget_tokens=...)); free finished conversations")
        handle = self._next_handle
        self._next_handle += 1
        self._store[handle] = Retained(list(tokens), k, v)
        return handle

    def check(self, handle: int, ids: list[int], n: int, prompt_index: int) -> Retained:
        """The retained sequence that prompt `prompt_index` extends (still stored: `pop` takes it once every prompt
        of the call passed). ValueError if the handle is unknown, the request asks for several samples, or the ids
        do not start with the retained tokens."""
        if handle not in self._store:
            raise ValueError(f"prompt {prompt_index}: extend handle {handle} names no retained sequence (never "
                             f"retained, already extended or freed)")
        if n != 1:
            raise ValueError(f"prompt {prompt_index}: a request that extends a retained sequence takes n=1 "
                             f"(got n={n}); fork the conversation's first turn instead")
        ret = self._store[handle]
        L = len(ret.tokens)
        if len(ids) < L or ids[:L] != ret.tokens:
            first = next((i for i, (a, b) in enumerate(zip(ids, ret.tokens)) if a != b), min(len(ids), L))
            raise ValueError(f"prompt {prompt_index} does not extend retained sequence {handle}: its ids differ from "
                             f"the retained {L} tokens at position {first} (a continuation is the previous prompt + "
                             f"its completion + new ids, never re-tokenized)")
        return ret

    def pop(self, handle: int) -> Retained:
        return self._store.pop(handle)

    def free(self, handles: Iterable[int | None]) -> None:
        for h in handles:
            if h is not None:
                self._store.pop(h, None)

    def clear(self) -> None:
        self._store.clear()
