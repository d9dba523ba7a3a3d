"""The generator's KV cache: one contiguous slot per sequence, live rows packed at the front.

Layout: k, v [layers, slots, Hkv, slot_len, D], two views of one flat buffer sized in tokens (a budget, or a share
of free GPU memory: budget_tokens). A generate call picks `slot_len` (its longest prompt + max_new_tokens, rounded
up) and gets `slots = capacity // slot_len` rows; rows beyond that wait (continuous admission, memrl/generate.py).

Invariant: the B live rows of the decode batch occupy slots 0 .. B-1, row b in slot b. When rows finish, the
tail rows move into the holes (`move`, one copy of each moved row's slot); new rows are prefilled into slots
B, B+1, ... So decode reads plain prefixes: the CPU path attends over views `k[layer, :B, :, :max_len]` with no
gather, and the GPU kernel needs no slot table. Moving a row costs one read + write of its slot (~37 MB at
Qwen2.5-1.5B shapes, ~25 us), once per finished row: noise next to the ~8 ms decode steps it saves.

Writes: prefill stores each prompt's k/v into one or several slots (n samples of a prompt share one prefill and
each gets a copy of the prefix: the fork); decode stores one token per row at its position: the Triton decode
kernel does it inside attention (k_new / v_new), the CPU path via a flat index (`slot * Hkv + head) * slot_len +
pos`. Positions past a row's length hold stale data that is never read.

KV continuation (a conversation's next turn, memrl/kv_retain.py): `copy_out` takes a finished row's valid K/V out
of its slot before compaction reuses the slot; `copy_in` puts it back into the slot of the request that extends
the sequence; `extend_attention` then prefills only the new suffix, at positions start.. of that slot, attending
over the restored prefix and the suffix itself (causal).

`decode_fn` / `prefill_fn` / `extend_fn` (end of file) bind these ops into the model's forward: the functions
memrl/model_runner.py compiles and captures. `budget_tokens` sizes the cache from free GPU memory.

The three attention entry points are also registered as torch custom ops (`memrl::decode_attention`,
`memrl::prefill_attention`, `memrl::extend_attention`) so torch.compile can fuse the rest of the model around
them. They find their cache through a registry id, as vLLM does: the compiler never sees the cache tensor, hence
never functionalises (copies) it and never reorders around the in-place write.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention_torch, decode_attention_triton
from memrl.model import ModelConfig, Transformer

_REGISTRY: "weakref.WeakValueDictionary[int, KVCache]" = weakref.WeakValueDictionary()


class KVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, use_triton: bool):
        self.cfg = cfg
        self.layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.q_heads = cfg.num_attention_heads
        self.dtype, self.device = dtype, device
        self.use_triton = use_triton
        self.scale = 1.0 / math.sqrt(self.head_dim)
        elem = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = 2 * self.layers * self.kv_heads * self.head_dim * elem
        self.capacity = 0  # tokens the buffer holds
        self.buffer: torch.Tensor | None = None
        self.k = self.v = None
        self.slots = self.slot_len = 0
        self.host_max_len: int | None = None  # CPU path: the longest live row, so attention reads no further
        self.id = id(self)
        _REGISTRY[self.id] = self

    def budget_tokens(self, rows: int, prefill_tokens: int, memory_fraction: float) -> int:
        """Tokens a call may give the cache: on CPU what it needs (no bound); on GPU `memory_fraction` of the
        memory left after a reserve for prefill activations (a few [tokens, hidden] and [tokens, intermediate]
        tensors live at once), the decode logits and the top-p sort of every row ([rows, vocab] fp32 values + int64
        indices) and graph pools, counting what PyTorch's caching allocator holds unused and this cache itself
        (reused or replaced)."""
        if self.device.type != "cuda":
            return 1 << 62
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        held = self.capacity * self.bytes_per_token
        cfg = self.cfg
        elem = self.bytes_per_token // (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim)
        prefill = prefill_tokens * (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * elem
        sampling = rows * cfg.vocab_size * 24
        reserve = prefill + sampling + (1 << 30)
        return int(memory_fraction * max(0, free + held - reserve)) // self.bytes_per_token

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` tokens of K and V (reallocating only to grow)."""
        if tokens <= self.capacity:
            return
        self.release()
        per_tok = self.layers * self.kv_heads * self.head_dim
        # zeros, not empty: the torch attention multiplies keys past a row's length by probability 0, and 0 * NaN
        # from never-written memory would be NaN (stale entries of earlier rows are always finite)
        self.buffer = torch.zeros(2 * tokens * per_tok, dtype=self.dtype, device=self.device)
        self.capacity = tokens

    def release(self) -> None:
        """Drop the buffer (e.g. to give the memory back to training between rollouts)."""
        self.buffer = self.k = self.v = None
        self.capacity = self.slots = self.slot_len = 0

    def configure(self, slot_len: int) -> int:
        """View the buffer as slots of slot_len tokens; returns the number of slots."""
        assert self.buffer is not None and slot_len <= self.capacity
        S = self.capacity // slot_len
        half = self.buffer.numel() // 2
        shape = (self.layers, S, self.kv_heads, slot_len, self.head_dim)
        n = math.prod(shape)
        self.k = self.buffer[:n].view(shape)
        self.v = self.buffer[half:half + n].view(shape)
        self.slots, self.slot_len = S, slot_len
        return S

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy whole slots src -> dst (disjoint sets): compaction of the live rows."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    # -- attention ------------------------------------------------------------------------------------------

    def prefill_attention(self, layer: int, q, k, v, dst_slots, src_rows) -> torch.Tensor:
        """q [P, Hq, T, D], k/v [P, Hkv, T, D] of right-padded prompts starting at position 0.

        Stores k/v of prefill row src_rows[i] into slot dst_slots[i] (a row may feed several slots: the n-sample
        fork), then causal attention within each prompt. Right padding sits after every real token, so plain
        causal attention is exact for the real positions and SDPA can take its flash kernel (no mask)."""
        T = k.shape[2]
        self.k[layer, dst_slots, :, :T] = k[src_rows]
        self.v[layer, dst_slots, :, :T] = v[src_rows]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_heads != self.kv_heads)

    def copy_out(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of a slot's K and V, as new tensors [layers, Hkv, length, D]."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def copy_in(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Inverse of copy_out: k, v [layers, Hkv, L, D] into positions 0..L-1 of the slot."""
        L = k.shape[2]
        self.k[:, slot, :, :L] = k
        self.v[:, slot, :, :L] = v

    def extend_attention(self, layer: int, q, k, v, dst_slots, starts, lens, key_len: int) -> torch.Tensor:
        """q [P, Hq, T, D], k/v [P, Hkv, T, D]: right-padded suffixes whose first token sits at position starts[p] of
        slot dst_slots[p] (positions 0..starts[p]-1 already hold the sequence's K/V); lens [P] real suffix lengths;
        key_len = max(starts + lens) (a host int: no device sync here).

        Stores the suffix K/V at starts[p] + t, then attention of each suffix token over positions 0..starts[p] + t of
        its slot. Padded columns t >= lens[p] write the K/V of the row's last real token onto its last real position
        (an index_copy_ with duplicate indices is deterministic only when the duplicates carry the same value), so
        they never write past the row's own positions, whatever the slot length; their outputs are discarded."""
        P, Hkv, T, D = k.shape
        dev = k.device
        t = torch.arange(T, device=dev)
        src_t = torch.minimum(t[None, :], (lens - 1)[:, None])  # (P, T): padded columns repeat the last token
        pos = starts[:, None] + src_t  # (P, T)
        heads = torch.arange(Hkv, device=dev)
        flat = (dst_slots[:, None, None] * Hkv + heads[None, :, None]) * self.slot_len + pos[:, None, :]  # (P,Hkv,T)
        gather = src_t[:, None, :, None].expand(P, Hkv, T, D)
        self.k[layer].view(-1, D).index_copy_(0, flat.reshape(-1), k.gather(2, gather).reshape(-1, D))
        self.v[layer].view(-1, D).index_copy_(0, flat.reshape(-1), v.gather(2, gather).reshape(-1, D))
        keys = self.k[layer][dst_slots, :, :key_len]  # (P, Hkv, key_len, D)
        values = self.v[layer][dst_slots, :, :key_len]
        if self.q_heads != self.kv_heads:  # explicit GQA expansion: SDPA's masked (memory-efficient) kernel takes it
            keys = keys.repeat_interleave(self.q_heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.q_heads // self.kv_heads, dim=1)
        visible = torch.arange(key_len, device=dev)[None, None, :] <= (starts[:, None] + t[None, :])[:, :, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None])  # (P, Hq, T, D)

    def decode_attention(self, layer: int, q, k, v, kv_index, lengths) -> torch.Tensor:
        """q [B, Hq, 1, D], k/v [B, Hkv, 1, D] of the rows in slots 0..B-1; kv_index [B, Hkv] flat write rows
        (= slot b, position lengths[b]-1; the Triton kernel computes the same address itself);
        lengths [B] = position + 1 (the new token included). Returns [B, Hq, 1, D]."""
        q1 = q[:, :, 0]
        if self.use_triton:  # the kernel appends the new K/V itself (one launch instead of three)
            out = decode_attention_triton(q1, self.k[layer], self.v[layer], lengths, self.scale,
                                          k_new=k[:, :, 0], v_new=v[:, :, 0])
        else:
            D = self.head_dim
            self.k[layer].view(-1, D).index_copy_(0, kv_index.reshape(-1), k.reshape(-1, D))
            self.v[layer].view(-1, D).index_copy_(0, kv_index.reshape(-1), v.reshape(-1, D))
            out = decode_attention_torch(q1, self.k[layer], self.v[layer], lengths, self.scale, self.host_max_len)
        return out.unsqueeze(2)


# ----------------------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, which fuses the norms / RoPE / SwiGLU / residuals between them


@torch.library.custom_op("memrl::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                        lengths: torch.Tensor, layer: int, cache_id: int) -> torch.Tensor:
    return _REGISTRY[cache_id].decode_attention(layer, q, k, v, kv_index, lengths).contiguous()


@decode_attention_op.register_fake
def _(q, k, v, kv_index, lengths, layer, cache_id):
    return q.new_empty(q.shape)


@torch.library.custom_op("memrl::prefill_attention", mutates_args=())
def prefill_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dst_slots: torch.Tensor,
                         src_rows: torch.Tensor, layer: int, cache_id: int) -> torch.Tensor:
    return _REGISTRY[cache_id].prefill_attention(layer, q, k, v, dst_slots, src_rows).contiguous()


@prefill_attention_op.register_fake
def _(q, k, v, dst_slots, src_rows, layer, cache_id):
    return q.new_empty(q.shape)


@torch.library.custom_op("memrl::extend_attention", mutates_args=())
def extend_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dst_slots: torch.Tensor,
                        starts: torch.Tensor, lens: torch.Tensor, key_len: int, layer: int,
                        cache_id: int) -> torch.Tensor:
    return _REGISTRY[cache_id].extend_attention(layer, q, k, v, dst_slots, starts, lens, key_len).contiguous()


@extend_attention_op.register_fake
def _(q, k, v, dst_slots, starts, lens, key_len, layer, cache_id):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- forwards over the cache
# The model's forward with the cache's attention ops bound in: the functions memrl/model_runner.py compiles
# and captures. lm_head runs on one row per sequence (its last token), never on every position.

def decode_fn(model: Transformer, cache_id: int):
    def decode(tok, pos, kv_base, n):
        """Slots 0..n-1: tok, pos [n] -> next-token logits [n, V]; K/V of the new token written at
        kv_base + pos. Takes the whole static buffers and slices inside: torch.compile guards on a
        view's base, so passing views of different lengths would recompile."""
        tok, pos, kv_base = tok[:n], pos[:n], kv_base[:n]
        lengths = pos + 1
        kv_index = kv_base + pos[:, None]  # (B, Hkv)

        def attn(layer, q, k, v):
            return decode_attention_op(q, k, v, kv_index, lengths, layer, cache_id)

        hidden = model(tok[:, None], positions=pos[:, None], attn_fn=attn, return_hidden=True)  # (B, 1, H)
        return F.linear(hidden[:, 0], model.output_weight())

    return decode


def extend_fn(model: Transformer, cache_id: int):
    def extend(ids, positions, last, dst, starts, lens, key_len: int):
        """Right-padded suffixes [P, T] at absolute positions -> logits [P, V] at each suffix's last
        token; their K/V stored into slots dst after the restored prefixes (KV continuation)."""

        def attn(layer, q, k, v):
            return extend_attention_op(q, k, v, dst, starts, lens, key_len, layer, cache_id)

        hidden = model(ids, positions=positions, attn_fn=attn, return_hidden=True)  # (P, T, H)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return F.linear(hidden[rows, last], model.output_weight())

    return extend


def prefill_fn(model: Transformer, cache_id: int):
    def prefill(ids, positions, last, dst, src):
        """Right-padded ids [P, T] -> logits [P, V] at each prompt's last token; K/V into slots dst."""

        def attn(layer, q, k, v):
            return prefill_attention_op(q, k, v, dst, src, layer, cache_id)

        hidden = model(ids, positions=positions, attn_fn=attn, return_hidden=True)  # (P, T, H)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return F.linear(hidden[rows, last], model.output_weight())  # lm_head on P rows, not P*T

    return prefill
