"""Batched generation with a KV cache: the trainer's own model, in-process, no second engine.

    gen = Generator(model, vocab_size=tokenizer.vocab_size)
    completions = gen.generate(prompts, SamplingParams(max_new_tokens=256, stop_ids=frozenset(tokenizer.stop_ids), n=4))

How a call runs
  1. Requests (prompt x n samples) queue up. A slot of the KV cache holds one sequence (memrl/kv_cache.py); the
     cache has `capacity // slot_len` slots, sized from a token budget or a share of free GPU memory, and work
     that does not fit waits in the queue — never an out-of-memory crash.
  2. Admission: waiting requests are prefilled into free slots, longest prompts first, in right-padded batches of
     at most `prefill_tokens` tokens (causal SDPA, flash kernel on GPU). A prompt is prefilled once; its K/V is
     written into all n of its samples' slots (the fork) and the n first tokens are sampled from its last logits.
  3. Decode: one token for every live row per step. Rows finish on their own (a stop id or their
     max_new_tokens) and then stop costing decode time:
       - compaction: finished rows leave the batch and the last live rows move into their slots, so the batch
         is always slots 0..B-1 and shrinks as rows finish (the step's cost is ~proportional to B);
       - continuous admission: when a quarter of the slots are free (or all waiting work fits), waiting
         requests are prefilled into the free slots and join the running batch.
     Why both: in RL rollouts lengths vary a lot (a few rows run to max_new_tokens, most stop early). Compaction
     alone would leave the GPU decoding a thin tail; admission alone (without moving rows) would need a slot
     table in the attention kernel. Prefill in admission batches rather than per freed slot keeps prefill GEMMs
     large.
  4. On GPU each decode step is a CUDA graph, captured on first use per batch-size bucket (32, 64, 96, ... up to
     the slot count; padding rows are inert) and cache layout (a call's slot length), kept across calls, and
     replayed: forward, attention over each row's valid KV
     (kernels/decode_attention.py), sampling (a fused Triton sampler; rows with top-k/top-p replay a
     forward-only graph and sort outside it) and the state update, all on the device. The attention kernel also
     appends the step's K/V to the cache (no separate cache-write kernels). The host looks at the
     device only every `sync_every` steps (to compact and admit; a finished row idles at most that many steps),
     so the GPU never waits for Python. The model around the attention ops is torch.compile'd (fuses norms,
     RoPE, SwiGLU, residuals; `compile=`), falling back to eager, with a warning, if compilation fails
     (`compile_fallback=False` raises instead). Every forward runs under torch.no_grad(), whatever the caller's
     grad mode: the attention custom ops have no autograd formula.
  5. The first call's cost (issue 11: the first RL step) is compilation and capture; each is kept to one-off work:
       - ONE compile of the decode step, whatever the batch, slot count or lengths: dynamic shapes, no duck sizing
         (two sizes equal by chance would otherwise be assumed equal and recompile later), and no graph bucket
         below 32 rows (a batch of 1 would be specialised: a second compile). The prefill stays eager unless
         `compile_prefill` (its GEMMs are large, so compiling saves ~20% of the prefill, a few % of a rollout, for
         one more full-model compile); compiled, it gets the same treatment (sizes of 1 padded to 2).
       - few graphs: buckets of 32 rows (64 above 256 rows), since below ~256 rows a decode step reads the
         weights once whatever the batch (measured flat below 64 rows on H100; padding rows cost ~nothing), and
         a layout's graphs are kept when the next call uses another slot length (memory vs answer turns
         alternate), so a rollout captures each (bucket, layout) once, not once per call.
       - the compiled code is cached by inductor on disk (TORCHINDUCTOR_CACHE_DIR, default
         /tmp/torchinductor_$USER): a second run on the same machine skips most of the compile.
     `stats` reports compile_s / capture_s (and compiles / captures) apart from prefill_s; `lifetime` sums them
     over all calls. benchmarks/bench_first_step.py measures each part.

KV continuation (a conversation's turns, memrl/kv_retain.py; the rollout's `conversation` condition)
  `retain=True` keeps each finished sequence's K/V (copied out of its slot at compaction) under `Completion.handle`;
  a later request with `extend=[handle]` whose ids start with that sequence (prompt + completion) restores the K/V
  into its slot and prefills only the new ids (`_prefill_extend`: attention over the restored prefix + the suffix,
  at absolute positions). `min_slot_len` keeps the slot layout (and so the CUDA graphs) the same across a
  conversation's turns: the rollout passes the conversation's longest possible length. Greedy tokens equal a fresh
  prefill of the whole ids (up to floating-point reduction order: tests/test_kv_continuation.py checks log-probs
  within 1e-5 on CPU).

Guarantees
  - Greedy = argmax at every step (equal to transformers' greedy generate and to a full-recompute loop, up to
    floating-point ties). Sampling is seeded per request: a request with its own seed samples tokens that depend
    only on (seed, sample index, its prompt, its params, the model) — not on the other requests of the call, their
    order, the KV budget or the scheduling (memrl/sampling.py: the noise is a hash of (row key, step, token id)).
    A seed shared by several requests (one SamplingParams for the whole call) is combined with the prompt index,
    so there a request's tokens also depend on its position in the list. seed=None draws a seed from torch's
    global RNG. On GPU, batched GEMMs may round differently at different batch sizes, so there the guarantee
    holds up to such rounding (a near-tie can flip).
  - `logprobs` are fp32 log-probs of each sampled token under the distribution it was sampled from (temperature,
    top-k, top-p applied and renormalised; greedy rows: the plain softmax), ids >= vocab_size never sampled.
  - The stop token is part of token_ids; finish_reason is "stop" iff the last token is one of the stop ids.
  - A prompt + max_new_tokens beyond the context window is cut at the window (finish "length"); a prompt longer
    than the window, an empty prompt or an id outside the model's vocabulary raise ValueError.
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

from kernels.backend import get_backend
from memrl.compile import compile_layers as compile_layers_, uncompile_layers
from memrl.kv_cache import KVCache, decode_attention_op, extend_attention_op, prefill_attention_op
from memrl.kv_retain import Retained, RetainedKV
from memrl.model import Transformer
from memrl.sampling import SamplingParams, row_keys, sample_fused, sample_torch

__all__ = ["Generator", "SamplingParams", "Completion"]


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]  # fp32 log-prob of each token under the distribution it was sampled from
    finish_reason: str  # "stop" | "length"
    handle: int | None = None  # retain=True: names this sequence's kept K/V, for a later extend=[handle]


@dataclass
class _Request:
    prompt_index: int
    ids: list[int]
    params: SamplingParams
    max_new: int  # after the context-window cut
    seed: int
    stream: int  # mixed into the noise keys: the prompt index when the seed is shared, else -1
    first_row: int  # result row of sample 0
    samples: list[int]  # sample indices not yet admitted
    retain: bool = False  # keep each finished sample's K/V (KV continuation)
    extends: Retained | None = None  # the retained sequence these ids continue: only ids[extends.kv_len:] prefill


MIN_BUCKET = 32  # rows; also keeps a batch of 1 (a size the compiler would specialise) out of the compiled step


def _bucket(n: int, cap: int) -> int:
    """Batch sizes that get their own CUDA graph: 12 up to 512 rows (32, 64, ..., 256, 320, ..., 512, 640, ...).
    A decode step reads every weight once, whatever the batch: its GEMMs stay bandwidth-bound up to ~256 rows on
    H100/H200 (the bf16 ridge point is ~300 FLOP per weight byte), and a padding row attends over one key, so
    padding costs ~nothing there; above 256 rows it adds at most 25%. Fewer buckets = fewer captures."""
    step = MIN_BUCKET if n <= 256 else 64 if n <= 512 else 128
    return min(-(-n // step) * step, cap)


MAX_LAYOUTS = 8  # cache layouts (slot lengths) whose CUDA graphs are kept; a rollout alternates between a few


class _SlotState:
    """Per-slot decode state, on the device, in static buffers (CUDA graphs read and update them in place)."""

    def __init__(self, slots: int, width: int, max_stop: int, kv_heads: int, slot_len: int, device):
        z = dict(device=device, dtype=torch.int64)
        self.cur_tok = torch.zeros(slots, **z)  # the token fed at this step
        self.pos = torch.zeros(slots, **z)  # its position (= KV length before this step)
        self.gen = torch.zeros(slots, **z)  # tokens generated so far (= index of the next one)
        self.max_new = torch.zeros(slots, **z)
        self.top_k = torch.zeros(slots, **z)
        self.key0 = torch.zeros(slots, **z)
        self.key1 = torch.zeros(slots, **z)
        self.temp = torch.ones(slots, device=device)  # 0 = greedy
        self.top_p = torch.ones(slots, device=device)
        self.stop = torch.full((slots, max_stop), -1, **z)  # stop ids, padded with -1
        self.done = torch.ones(slots, device=device, dtype=torch.bool)
        self.out_tok = torch.zeros(slots, width, **z)  # column width-1 takes the writes of finished rows
        self.out_logp = torch.zeros(slots, width, device=device)
        self.rows = torch.arange(slots, **z)
        heads = torch.arange(kv_heads, **z)
        self.kv_base = (self.rows[:, None] * kv_heads + heads[None, :]) * slot_len  # flat KV row of position 0
        self.width = width

    def per_slot(self) -> list[torch.Tensor]:
        return [self.cur_tok, self.pos, self.gen, self.max_new, self.top_k, self.key0, self.key1, self.temp,
                self.top_p, self.stop, self.done, self.out_tok, self.out_logp]

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for t in self.per_slot():
            t[dst] = t[src]

    def reset(self, lo: int, hi: int) -> None:
        """Inert padding rows: done (nothing recorded), position 0 of their own (free) slot."""
        for t in (self.cur_tok, self.pos, self.gen, self.max_new):
            t[lo:hi] = 0
        self.done[lo:hi] = True


class Generator:
    def __init__(self, model: Transformer, vocab_size: int, kv_budget_tokens: int | None = None,
                 kv_memory_fraction: float = 0.5, prefill_tokens: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool | None = None, sync_every: int | None = None,
                 kernels: str | None = None, compile_fallback: bool = True, compile_prefill: bool = False,
                 retain_budget_tokens: int | None = None, compile_layers: bool = False):
        """model: our Transformer (any device/dtype). vocab_size: the tokenizer's real size (ids above it are masked).

        kv_budget_tokens: KV cache size in tokens (all rows x their slot length); default on GPU: kv_memory_fraction
          of the free memory left after a reserve for prefill activations; on CPU: whatever the call needs.
        prefill_tokens: padded tokens per prefill batch (bounds activation memory); default 32k GPU / 8k CPU.
        cuda_graphs / compile: default on when the model is on CUDA. A compiler failure falls back to eager with a
          warning (and sets `compile_error`), or raises with compile_fallback=False (benchmarks: no silent regression).
        compile_prefill: compile the prefill too (with `compile`); off by default: see "first call" above.
        compile_layers: with `compile`, compile each decoder layer's two halves around its attention, once for all
          layers (memrl/compile.py compile_layers), instead of the whole decode step: seconds of compilation instead
          of tens; prefill and continuation then run eagerly.
        sync_every: decode steps between host looks at the device; default 16 on GPU, 1 on CPU (syncs are free).
        kernels: "triton" | "torch" | None (kernels.get_backend(); "auto" = Triton on CUDA, the torch references on
          CPU even under TRITON_INTERPRET, which is for kernel tests — pass "triton" to run the interpreter).
        retain_budget_tokens: bound on the K/V tokens kept for continuation (retain=True); None = no bound.
        """
        cfg = model.config
        if not 0 < vocab_size <= cfg.vocab_size:
            raise ValueError(f"vocab_size must be in [1, {cfg.vocab_size}] (the model's rows), got {vocab_size}")
        self.model, self.cfg, self.vocab_size = model, cfg, vocab_size
        weight = model.output_weight()
        self.device, self.dtype = weight.device, weight.dtype
        on_cuda = self.device.type == "cuda"
        backend = kernels or get_backend()
        self.use_triton = backend == "triton" or (backend == "auto" and on_cuda)
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.compile = on_cuda if compile is None else compile
        self.compile_fallback = compile_fallback
        self.compile_prefill = compile_prefill and not compile_layers
        self.compile_layers = self.compile and compile_layers
        if self.compile_layers:
            compile_layers_(model)
        self.compile_error: str | None = None
        self.kv_budget_tokens = kv_budget_tokens
        self.kv_memory_fraction = kv_memory_fraction
        self.prefill_tokens = prefill_tokens or (32768 if on_cuda else 8192)
        self.sync_every = sync_every or (16 if on_cuda else 1)
        # test hooks, so the CPU tests walk the GPU schedule: padded buckets, the capture's warm-up and undo
        self._pad_batches = self.cuda_graphs
        self._rehearse = False
        self.cache = KVCache(cfg, self.dtype, self.device, self.use_triton)
        self.state: _SlotState | None = None
        self._layout_key = None
        self._graphs: dict = {}
        self._layouts: dict = {}  # earlier layout key -> (its slot state, its graphs), least recently used first
        self._pool = None
        self._decode_fn = self._prefill_fn = self._extend_fn = None
        self.retained = RetainedKV(retain_budget_tokens)  # KV continuation: finished sequences kept by handle
        self.last_stats: dict = {}
        self.stats: dict = {}
        self.lifetime = dict(compile_s=0.0, compiles=0, capture_s=0.0, captures=0)  # over every call

    # -- public ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
                 retain: bool | list[bool] = False, extend: list[int | None] | None = None,
                 min_slot_len: int = 0) -> list[Completion]:
        """Completions ordered by (prompt_index, sample_index); n samples of a prompt share one prefill.

        KV continuation: retain (one flag, or one per prompt) keeps each finished sample's K/V under
        Completion.handle; extend[i] = a handle whose sequence prompts[i] continues (n must be 1). min_slot_len: a
        lower bound on the slot length of this call (keeps one layout over a conversation's turns)."""
        t0 = time.perf_counter()
        requests, results, live = self._start(prompts, params, retain=retain, extend=extend,
                                              min_slot_len=min_slot_len)
        if live:
            self._run(live)
            self._collect(requests, results)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["total_s"] = time.perf_counter() - t0
        self.stats["new_tokens"] = sum(len(c.token_ids) for c in results)
        self.last_stats = self.stats
        return results

    @torch.no_grad()
    def _start(self, prompts, params, retain=False, extend=None, min_slot_len: int = 0):
        """Validate, reset the stats, size the cache: (requests, results, live requests). Also the benchmark's
        entry point for driving single decode steps (benchmarks/bench_generate.py)."""
        requests, results = self._requests(prompts, params, retain, extend)
        self.stats = dict(rows=len(results), prefill_s=0.0, prefill_tokens=0, prefill_padded_tokens=0,
                          decode_steps=0, decode_row_steps=0, padded_row_steps=0, capture_s=0.0, captures=0,
                          compile_s=0.0, compiles=0, admissions=0,
                          reused_kv_tokens=sum(r.extends.kv_len for r in requests if r.extends is not None))
        live = [r for r in requests if r.max_new > 0]
        if live:
            self._prepare(live, len(results), min_slot_len)
        return requests, results, live

    def free(self, handles) -> None:
        """Drop retained sequences that will not be extended (KV continuation)."""
        self.retained.free(handles)

    def release(self) -> None:
        """Free the KV cache, the CUDA graphs and every retained sequence (their memory returns to PyTorch)."""
        self.cache.release()
        self.retained.clear()
        self.state, self._layout_key, self._graphs, self._layouts, self._pool = None, None, {}, {}, None

    # -- validation and planning -------------------------------------------------------------------------------

    def _requests(self, prompts, params, retain=False, extend=None):
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        retain = [retain] * len(prompts) if isinstance(retain, bool) else list(retain)
        extend = [None] * len(prompts) if extend is None else list(extend)
        if len(retain) != len(prompts) or len(extend) != len(prompts):
            raise ValueError(f"retain / extend need one entry per prompt ({len(prompts)}), got {len(retain)} / "
                             f"{len(extend)}")
        handles = [h for h in extend if h is not None]
        if len(set(handles)) != len(handles):
            raise ValueError("two prompts extend the same retained sequence (a handle is used once)")
        window, vocab_rows = self.cfg.max_position_embeddings, self.cfg.vocab_size
        shared = {sd for sd in (p.seed for p in params) if sd is not None}
        shared = {sd for sd in shared if sum(p.seed == sd for p in params) > 1}
        requests, results = [], []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
            if len(ids) > window:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than the context window "
                                 f"(max_position_embeddings={window})")
            if min(ids) < 0 or max(ids) >= vocab_rows:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab_rows})")
            # a request's noise stream: (its own seed, sample); a seed shared by several requests (one params object
            # for the whole call) also takes the prompt index, so different prompts never share noise
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            stream = i if p.seed is None or p.seed in shared else -1
            max_new = min(p.max_new_tokens, window - len(ids))
            extends = None if extend[i] is None else self.retained.check(extend[i], ids, p.n, i)
            requests.append(_Request(i, ids, p, max_new, seed, stream, len(results), list(range(p.n)),
                                     bool(retain[i]), extends))
            results += [Completion(i, j, [], [], "length") for j in range(p.n)]
        for h in handles:  # every prompt passed: the call now owns these sequences' K/V
            self.retained.pop(h)
        return requests, results

    def _prepare(self, requests: list[_Request], rows: int, min_slot_len: int = 0) -> None:
        """Size the cache and the static state for this call; drop CUDA graphs that no longer apply."""
        granule = 128 if self.cuda_graphs else 16  # coarse on GPU: calls with similar lengths reuse their graphs
        longest = max(max(len(r.ids) + r.max_new for r in requests), min_slot_len)
        slot_len = -(-longest // granule) * granule
        need = sum(len(r.samples) for r in requests) * slot_len
        tokens = min(need, self._budget_tokens(rows))
        if tokens < slot_len:
            raise ValueError(f"KV budget of {tokens} tokens cannot hold one sequence of {slot_len} tokens "
                             f"(longest prompt + max_new_tokens); raise kv_budget_tokens / kv_memory_fraction")
        self.cache.reserve(tokens)
        max_stop = max(8, max(len(r.params.stop_ids) for r in requests))
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        key = (self.cache.buffer.data_ptr(), self.cache.capacity, slot_len, max_stop, weights)
        if key != self._layout_key:
            self._switch_layout(key, slot_len, max_stop)
        S = self.cache.slots
        self.res_tok = torch.zeros(rows, self.state.width, dtype=torch.int64, device=self.device)
        self.res_logp = torch.zeros(rows, self.state.width, device=self.device)
        self.res_len = np.zeros(rows, dtype=np.int64)
        # host mirrors of the slots (moved along with the device state)
        self.h_row = np.zeros(S, dtype=np.int64)  # result row
        self.h_gen = np.zeros(S, dtype=np.int64)  # tokens generated, assuming the row has not finished
        self.h_len = np.zeros(S, dtype=np.int64)  # prompt length
        self.h_max_new = np.zeros(S, dtype=np.int64)
        self.h_trunc = np.zeros(S, dtype=bool)  # row needs the top-k/top-p sampler
        self.h_retain = np.zeros(S, dtype=bool)  # KV continuation: copy the row's K/V out when it finishes
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # result row -> its K/V, until _collect
        self.state.reset(0, S)  # every slot inert, even after a call that raised half-way
        self.B = 0
        self.stats.update(slots=S, slot_len=slot_len)

    def _switch_layout(self, key: tuple, slot_len: int, max_stop: int) -> None:
        """Make `key` the current layout: its slot state and graphs from an earlier call if it had this layout (the
        graphs baked in the addresses of that state, of the cache views, which configure() rebuilds identically for
        the same buffer and slot length, and of the weights), else new ones. Layouts over another cache buffer or
        other weights can never come back: dropped, and their graphs' memory with them."""
        if self._layout_key is not None:
            self._layouts[self._layout_key] = (self.state, self._graphs)
        for old in [k for k in self._layouts if (k[0], k[1], k[4]) != (key[0], key[1], key[4])]:
            del self._layouts[old]
        S = self.cache.configure(slot_len)
        kept = self._layouts.pop(key, None)
        if kept is not None:
            self.state, self._graphs = kept
        else:
            self.state = _SlotState(S, slot_len + 1, max_stop, self.cfg.num_key_value_heads, slot_len, self.device)
            self._graphs = {}
        while len(self._layouts) >= MAX_LAYOUTS:  # least recently used first
            del self._layouts[next(iter(self._layouts))]
        if self.cuda_graphs and not self._layouts and not self._graphs:
            # one memory pool shared by every graph over this buffer (they never run concurrently); a new buffer
            # (or the first) gets a new pool, the old one is freed with the graphs that were just dropped
            self._pool = torch.cuda.graph_pool_handle()
        self._layout_key = key

    def _budget_tokens(self, rows: int) -> int:
        if self.kv_budget_tokens is not None:
            return self.kv_budget_tokens
        if self.device.type != "cuda":
            return 1 << 62  # CPU: what the call needs
        free, _ = torch.cuda.mem_get_info(self.device)
        # plus what PyTorch's caching allocator holds unused, and our own cache (reused or replaced)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        held = self.cache.capacity * self.cache.bytes_per_token
        cfg = self.cfg
        elem = self.cache.bytes_per_token // (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim)
        # prefill activations (a few [tokens, hidden] and [tokens, intermediate] tensors live at once), the
        # decode logits and the top-p sort of every row ([rows, vocab] fp32 values + int64 indices), graph pools
        prefill = self.prefill_tokens * (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * elem
        sampling = rows * cfg.vocab_size * 24
        reserve = prefill + sampling + (1 << 30)
        return int(self.kv_memory_fraction * max(0, free + held - reserve)) // self.cache.bytes_per_token

    # -- the loop ------------------------------------------------------------------------------------------------

    def _run(self, requests: list[_Request]) -> None:
        waiting = deque(requests)
        S = self.cache.slots
        while waiting or self.B:
            free = S - self.B
            queued = sum(len(r.samples) for r in waiting)
            if waiting and (self.B == 0 or free >= min(max(1, S // 4), queued)):
                self._admit(waiting)
                self._compact()  # rows that finished on their first token leave at once
                continue
            steps = 1 if self.sync_every <= 1 else int(min(
                self.sync_every, (self.h_max_new[:self.B] - self.h_gen[:self.B]).max()))
            for _ in range(max(1, steps)):
                self._decode_step()
                self.h_gen[:self.B] += 1  # an upper bound until _compact reads the device
            self._compact()

    @torch.no_grad()
    def _admit(self, waiting: deque) -> None:
        t0, compiling0 = self._now(), self.lifetime["compile_s"]
        st, lo = self.state, self.B
        free = self.cache.slots - lo
        entries = []  # (request, sample indices, first slot)
        slot = lo
        while waiting and free > 0:
            req = waiting[0]
            take, req.samples = req.samples[:free], req.samples[free:]
            entries.append((req, take, slot))
            slot, free = slot + len(take), free - len(take)
            if not req.samples:
                waiting.popleft()
        hi = slot
        # per-slot parameters, one host->device copy per tensor
        cols = {name: [] for name in ("temp", "top_k", "top_p", "key0", "key1", "max_new", "pos", "stop")}
        for req, take, first in entries:
            p = req.params
            for j, s in zip(take, range(first, first + len(take))):
                k0, k1 = row_keys(req.seed, req.stream, j)
                cols["temp"].append(0.0 if p.is_greedy else p.temperature)
                cols["top_k"].append(p.top_k if p.truncates else 0)
                cols["top_p"].append(p.top_p if p.truncates else 1.0)
                cols["key0"].append(k0)
                cols["key1"].append(k1)
                cols["max_new"].append(req.max_new)
                cols["pos"].append(len(req.ids) - 1)  # the first sample moves it to len(prompt)
                stops = sorted(p.stop_ids)
                cols["stop"].append(stops + [-1] * (st.stop.shape[1] - len(stops)))
                self.h_row[s], self.h_gen[s], self.h_len[s] = req.first_row + j, 1, len(req.ids)
                self.h_max_new[s], self.h_trunc[s], self.h_retain[s] = req.max_new, p.truncates, req.retain
        for name, values in cols.items():
            t = getattr(st, name)
            t[lo:hi] = torch.tensor(values, dtype=t.dtype).to(self.device, non_blocking=True)
        st.gen[lo:hi] = 0
        st.done[lo:hi] = False

        # prefill, longest prompts first, in batches of at most prefill_tokens padded tokens; continuations prefill
        # only their new ids, after their retained K/V is restored into their slot (their batches are also bounded
        # in keys: each row gathers its whole prefix, expanded to the query heads, for the masked attention)
        fresh = sorted((e for e in entries if e[0].extends is None), key=lambda e: -len(e[0].ids))
        more = sorted((e for e in entries if e[0].extends is not None), key=lambda e: -_suffix_len(e[0]))
        for group, prefill, length in ((fresh, self._prefill, lambda r: len(r.ids)),
                                       (more, self._prefill_extend, _suffix_len)):
            i = 0
            while i < len(group):
                T, keys = length(group[i][0]), len(group[i][0].ids)
                j = i + 1
                while j < len(group) and (j - i + 1) * T <= self.prefill_tokens and (
                        (j - i + 1) * max(keys, len(group[j][0].ids)) <= 4 * self.prefill_tokens):
                    keys = max(keys, len(group[j][0].ids))
                    j += 1
                prefill(group[i:j])
                i = j
        self.B = hi
        self.stats["admissions"] += 1
        self.stats["prefill_s"] += self._now() - t0 - (self.lifetime["compile_s"] - compiling0)  # compile_s apart

    def _prefill(self, entries) -> None:
        P, T = len(entries), len(entries[0][0].ids)
        # compiled, a size of 1 would be specialised (one more compile): such a batch, length or fork is padded to
        # 2 (a padding row's logits are never read, a padding position is overwritten by the first decode step, a
        # repeated (slot, row) pair writes the same K/V twice)
        least = 2 if self.compile and self.compile_prefill else 1
        ids = torch.zeros(max(P, least), max(T, least), dtype=torch.int64)
        lens, dst, src = [], [], []
        for r, (req, take, first) in enumerate(entries):
            ids[r, :len(req.ids)] = torch.tensor(req.ids)
            lens.append(len(req.ids))
            dst += range(first, first + len(take))
            src += [r] * len(take)
        dev = self.device
        dst_t, src_t = torch.tensor(dst, device=dev), torch.tensor(src, device=dev)
        fork_dst, fork_src = (dst_t, src_t) if len(dst) >= least else (dst_t.repeat(least), src_t.repeat(least))
        last = torch.tensor(lens + [1] * (ids.shape[0] - P), device=dev) - 1
        positions = torch.arange(ids.shape[1], device=dev).expand(ids.shape)
        logits = self._prefill_forward(ids.to(dev), positions, last, fork_dst, fork_src)[src_t]  # (rows, V)
        trunc = self.h_trunc[dst]
        self._sample_and_advance(dst_t, logits, np.flatnonzero(trunc) if trunc.any() else None)
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["prefill_padded_tokens"] += ids.numel()

    # -- KV continuation: prefill of a retained sequence's new ids ---------------------------------------------------

    def _prefill_extend(self, entries) -> None:
        """Requests that extend a retained sequence: its K/V back into the request's slot, then a prefill of the new
        ids only, at their absolute positions (attention over the restored prefix + the suffix)."""
        P, T = len(entries), _suffix_len(entries[0][0])
        ids = torch.zeros(P, T, dtype=torch.int64)
        starts, lens, dst = [], [], []
        for r, (req, take, first) in enumerate(entries):
            L = req.extends.kv_len
            self.cache.copy_in(first, req.extends.k, req.extends.v)
            req.extends = None  # its K/V now lives in the slot; drop the copy
            suffix = req.ids[L:]
            ids[r, :len(suffix)] = torch.tensor(suffix)
            starts.append(L)
            lens.append(len(suffix))
            dst.append(first)  # n == 1: one slot per continuing request
        dev = self.device
        starts_t, lens_t = torch.tensor(starts, device=dev), torch.tensor(lens, device=dev)
        dst_t = torch.tensor(dst, device=dev)
        positions = starts_t[:, None] + torch.arange(T, device=dev)[None, :]  # pads run past the row: never read
        key_len = max(s + n for s, n in zip(starts, lens))
        logits = self._extend_forward(ids.to(dev), positions, lens_t - 1, dst_t, starts_t, lens_t, key_len)
        trunc = self.h_trunc[dst]
        self._sample_and_advance(dst_t, logits, np.flatnonzero(trunc) if trunc.any() else None)
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["prefill_padded_tokens"] += P * T

    def _extend_forward(self, ids, positions, last, dst, starts, lens, key_len: int):
        if self._extend_fn is None:
            self._extend_fn = self._maybe_compile(_make_extend_fn(self.model, self.cache.id))
        return self._extend_fn(ids, positions, last, dst, starts, lens, key_len)

    def _keep_finished(self, finished: np.ndarray, gen: np.ndarray) -> None:
        """Copy the K/V of finished rows that retain out of their slots (before compaction reuses them). A row
        that generated g tokens holds K/V for its prompt + g - 1 of them (the last was never fed)."""
        for s in finished[self.h_retain[finished]]:
            length = int(self.h_len[s] + gen[s] - 1)
            try:
                self.kept[int(self.h_row[s])] = self.cache.copy_out(int(s), length)
            except torch.OutOfMemoryError as e:
                raise ValueError(f"out of device memory while retaining finished sequences' K/V for continuation "
                                 f"({len(self.retained) + len(self.kept)} sequences, {self.retained.tokens_held} "
                                 f"tokens held): lower kv_memory_fraction, set retain_budget_tokens, or free "
                                 f"finished conversations") from e

    # -- compaction ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _compact(self) -> None:
        """Finished rows out (results saved), tail rows into the holes: live rows stay in slots 0..B-1."""
        B, st = self.B, self.state
        if B == 0:
            return
        info = torch.stack([st.done[:B].long(), st.gen[:B]]).cpu().numpy()  # the one host sync per round
        done, gen = info[0].astype(bool), info[1]
        self.h_gen[:B] = gen
        finished = np.flatnonzero(done)
        if finished.size == 0:
            return
        if self.h_retain[finished].any():
            self._keep_finished(finished, gen)
        fin_t = torch.from_numpy(finished).to(self.device)
        res_rows = torch.from_numpy(self.h_row[finished]).to(self.device)
        self.res_tok.index_copy_(0, res_rows, st.out_tok.index_select(0, fin_t))
        self.res_logp.index_copy_(0, res_rows, st.out_logp.index_select(0, fin_t))
        self.res_len[self.h_row[finished]] = gen[finished]
        live = np.flatnonzero(~done)
        k = live.size
        holes, movers = finished[finished < k], live[live >= k]
        if movers.size:
            dst, src = torch.from_numpy(holes).to(self.device), torch.from_numpy(movers).to(self.device)
            st.move(dst, src)
            self.cache.move(dst, src)
            for h in (self.h_row, self.h_gen, self.h_len, self.h_max_new, self.h_trunc, self.h_retain):
                h[holes] = h[movers]
        st.reset(k, B)
        self.B = k

    def _collect(self, requests: list[_Request], results: list[Completion]) -> None:
        toks, logps = self.res_tok.cpu().tolist(), self.res_logp.cpu().tolist()
        for req in requests:
            for j in range(req.params.n):
                r = req.first_row + j
                n = int(self.res_len[r])
                c = results[r]
                c.token_ids, c.logprobs = toks[r][:n], logps[r][:n]
                c.finish_reason = "stop" if n and c.token_ids[-1] in req.params.stop_ids else "length"
                if r in self.kept:  # KV continuation: the finished sequence joins the retained store
                    c.handle = self.retained.keep(req.ids + c.token_ids, *self.kept.pop(r))

    # -- one decode step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _decode_step(self) -> None:
        B = self.B
        trunc = self.h_trunc[:B]
        fused = self.use_triton and not trunc.any()
        truncate_rows = np.flatnonzero(trunc) if trunc.any() else None
        self.stats["decode_steps"] += 1
        self.stats["decode_row_steps"] += B
        Bb = _bucket(B, self.cache.slots) if self._pad_batches else B
        self.stats["padded_row_steps"] += Bb - B
        if self.cuda_graphs:
            graph, logits = self._graph(Bb, fused)
            graph.replay()
        else:
            if not self.use_triton:  # torch attention reads keys up to the longest live row only
                self.cache.host_max_len = int(min((self.h_len[:B] + self.h_gen[:B]).max(), self.cache.slot_len))
            if self._rehearse and (Bb, fused) not in self._graphs:
                self._warm_up(Bb, fused)
                self._graphs[(Bb, fused)] = None
                self._count("capture", 0.0, 1)
            logits = self._step_body(Bb, fused)
        if not fused:
            self._sample_and_advance(self.state.rows[:Bb], logits, truncate_rows)

    @torch.no_grad()
    def _step_body(self, Bb: int, fused: bool):
        """Forward of slots 0..Bb-1 (+ fused sampling and state update when `fused`); graph-capturable."""
        st = self.state
        logits = self._decode_forward(st.cur_tok, st.pos, st.kv_base, Bb)
        if not fused:
            return logits
        token, logp = sample_fused(logits, self.vocab_size, st.temp[:Bb], st.key0[:Bb], st.key1[:Bb], st.gen[:Bb])
        self._advance(st.rows[:Bb], token, logp)
        return None

    def _sample_and_advance(self, rows: torch.Tensor, logits: torch.Tensor, truncate_rows) -> None:
        """Sample one token for the given slots from their logits [len(rows), V]; update their state."""
        st = self.state
        if self.use_triton and truncate_rows is None:
            token, logp = sample_fused(logits, self.vocab_size, st.temp[rows], st.key0[rows], st.key1[rows],
                                       st.gen[rows])
        else:
            tr = None if truncate_rows is None else torch.as_tensor(truncate_rows, device=self.device)
            token, logp = sample_torch(logits, self.vocab_size, st.temp[rows], st.top_k[rows], st.top_p[rows],
                                       st.key0[rows], st.key1[rows], st.gen[rows], tr)
        self._advance(rows, token, logp)

    def _advance(self, rows: torch.Tensor, token: torch.Tensor, logp: torch.Tensor) -> None:
        """Record the sampled tokens, detect stops, move live rows one position on. No host sync."""
        st = self.state
        done = st.done[rows]
        live = ~done
        gen = st.gen[rows]
        col = torch.where(live, gen, st.width - 1)  # finished rows write into the spare last column
        st.out_tok[rows, col] = token
        st.out_logp[rows, col] = logp
        stopped = (token[:, None] == st.stop[rows]).any(dim=1)
        gen = gen + live.long()
        finished = live & (stopped | (gen >= st.max_new[rows]))
        st.gen.index_copy_(0, rows, gen)
        # a row that just finished keeps its position and its last fed token, so while it waits to leave (up to
        # sync_every steps) it only rewrites the K/V it already holds there: it never writes past its slot, and a
        # retained sequence's K/V stays intact for continuation (KV continuation)
        st.pos.index_copy_(0, rows, st.pos[rows] + (live & ~finished).long())
        st.cur_tok.index_copy_(0, rows, torch.where(live & ~finished, token, st.cur_tok[rows]))
        st.done.index_copy_(0, rows, done | finished)

    # -- forward passes (optionally compiled) and CUDA graphs ------------------------------------------------------

    def _decode_forward(self, tok, pos, kv_base, n: int):
        if self._decode_fn is None:
            self._decode_fn = self._maybe_compile(_make_decode_fn(self.model, self.cache.id))
        return self._decode_fn(tok, pos, kv_base, n)

    def _prefill_forward(self, ids, positions, last, dst, src):
        if self._prefill_fn is None:
            fn = _make_prefill_fn(self.model, self.cache.id)
            self._prefill_fn = self._maybe_compile(fn) if self.compile_prefill else torch.no_grad()(fn)
        return self._prefill_fn(ids, positions, last, dst, src)

    def _maybe_compile(self, fn):
        """fn, compiled when self.compile. Every forward runs under no_grad whatever the caller's mode: the attention
        custom ops have no autograd formula, and a compile traced with grad on would fail on them (and keep
        activations for a backward that never comes). A call that compiled adds its time to compile_s."""
        # per-layer compilation: fn stays eager, its layers' halves compile themselves on their first decode call
        compiled = fn if self.compile_layers else torch.compile(fn, dynamic=True) if self.compile else None

        @torch.no_grad()
        def call(*args):
            if self.compile and compiled is not None:
                graphs, t0 = _compiled_graphs(), time.perf_counter()
                try:
                    # no duck sizing: sizes equal by chance at the first call would be assumed equal for good, and
                    # the first call where they differ would compile the whole model again
                    with fx_config.patch(use_duck_shape=False):
                        out = compiled(*args)
                except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly, loudly (or raise)
                    if not self.compile_fallback:
                        raise
                    self.compile_error = f"{type(e).__name__}: {e}"
                    warnings.warn(f"torch.compile failed ({self.compile_error}); continuing eagerly")
                    self.compile = False
                    if self.compile_layers:
                        uncompile_layers(self.model)
                else:
                    if _compiled_graphs() > graphs:
                        self._count("compile", time.perf_counter() - t0, _compiled_graphs() - graphs)
                    return out
            return fn(*args)

        return call

    def _count(self, what: str, seconds: float, n: int) -> None:
        """Add to this call's stats and the lifetime totals: compile_s / compiles, capture_s / captures."""
        for d in (self.stats, self.lifetime):
            d[f"{what}_s"] = d.get(f"{what}_s", 0.0) + seconds
            d[f"{what}s"] = d.get(f"{what}s", 0) + n

    @torch.no_grad()
    def _graph(self, Bb: int, fused: bool):
        """The CUDA graph of one decode step at bucket size Bb (captured on first use)."""
        key = (Bb, fused)
        if key not in self._graphs:
            t0, compiling0 = time.perf_counter(), self.lifetime["compile_s"]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, initialises cuBLAS, outside the capture
                self._warm_up(Bb, fused)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step_body(Bb, fused)
            self._graphs[key] = (graph, out)
            # the warm-up may have compiled the step (the first capture does): that time is compile_s, not capture
            self._count("capture", time.perf_counter() - t0 - (self.lifetime["compile_s"] - compiling0), 1)
        return self._graphs[key]

    def _warm_up(self, Bb: int, fused: bool) -> None:
        """Run the step twice, then undo its effect on the state. The K/V it wrote are harmless: live rows get
        the same values rewritten by the real step, positions past a row's length are never read."""
        saved = [t.clone() for t in self.state.per_slot()]
        for _ in range(2):
            self._step_body(Bb, fused)
        for t, s in zip(self.state.per_slot(), saved):
            t.copy_(s)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter): a call that raised it compiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _make_decode_fn(model: Transformer, cache_id: int):
    def decode(tok, pos, kv_base, n):
        """Slots 0..n-1: tok, pos [n] -> next-token logits [n, V]; K/V of the new token written at kv_base + pos.

        Takes the whole static buffers and slices inside: torch.compile guards on a view's base, so passing
        views of different lengths would recompile."""
        tok, pos, kv_base = tok[:n], pos[:n], kv_base[:n]
        lengths = pos + 1
        kv_index = kv_base + pos[:, None]  # (B, Hkv)

        def attn(layer, q, k, v):
            return decode_attention_op(q, k, v, kv_index, lengths, layer, cache_id)

        hidden = model(tok[:, None], positions=pos[:, None], attn_fn=attn, return_hidden=True)  # (B, 1, H)
        return F.linear(hidden[:, 0], model.output_weight())

    return decode


def _suffix_len(req: _Request) -> int:
    """Ids a continuing request prefills: everything past its retained K/V."""
    return len(req.ids) - req.extends.kv_len


def _make_extend_fn(model: Transformer, cache_id: int):
    def extend(ids, positions, last, dst, starts, lens, key_len: int):
        """Right-padded suffixes [P, T] at absolute positions -> logits [P, V] at each suffix's last token; their K/V
        stored into slots dst after the restored prefixes (KV continuation)."""

        def attn(layer, q, k, v):
            return extend_attention_op(q, k, v, dst, starts, lens, key_len, layer, cache_id)

        hidden = model(ids, positions=positions, attn_fn=attn, return_hidden=True)  # (P, T, H)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return F.linear(hidden[rows, last], model.output_weight())

    return extend


def _make_prefill_fn(model: Transformer, cache_id: int):
    def prefill(ids, positions, last, dst, src):
        """Right-padded ids [P, T] -> logits [P, V] at each prompt's last token; K/V stored into slots dst."""

        def attn(layer, q, k, v):
            return prefill_attention_op(q, k, v, dst, src, layer, cache_id)

        hidden = model(ids, positions=positions, attn_fn=attn, return_hidden=True)  # (P, T, H)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return F.linear(hidden[rows, last], model.output_weight())  # lm_head on P rows, not P*T

    return prefill
