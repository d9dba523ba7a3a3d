"""Batched generation with a KV cache: the trainer's own model, in-process, no second engine.

    gen = Generator(model, vocab_size=tokenizer.vocab_size)
    completions = gen.generate(prompts, SamplingParams(max_new_tokens=256, stop_ids=tokenizer.stop_ids, n=4))

The split (as nano-vllm's scheduler / model_runner): this file is the host side, the scheduling: requests, which
sample in which slot, when to admit, when to compact, the numpy mirrors of the slots, the retained sequences. It
never computes on a device tensor: memrl/model_runner.py holds the device state and runs the model (slot state,
forwards, sampling, torch.compile, CUDA graphs); memrl/kv_cache.py stores the K/V (reserve, move, copy in/out).

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
  4. On GPU a decode step is a CUDA graph replay. The host looks at the device every `sync_every` steps only (to
     compact and admit; a finished row idles at most that long): the GPU never waits for Python. The first call
     compiles and captures: `stats` has compile_s / capture_s apart from prefill_s, `lifetime` sums them.

KV continuation (a conversation's turns, memrl/kv_retain.py; the rollout's `conversation` condition)
  `retain=True` keeps each finished sequence's K/V (copied out of its slot at compaction) under `Completion.handle`;
  a later request with `extend=[handle]` whose ids start with that sequence restores the K/V into its slot and
  prefills only the new ids. `min_slot_len` keeps one slot layout (and CUDA graphs) over a conversation's turns.
  Greedy tokens equal a fresh prefill of the whole ids (tests/test_kv_continuation.py: log-probs within 1e-5).

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
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from kernels.backend import get_backend
from memrl.kv_retain import Retained, RetainedKV
from memrl.model import Transformer
from memrl.model_runner import ModelRunner
from memrl.sampling import SamplingParams

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
    max_new_tokens: int  # params.max_new_tokens after the context-window cut
    seed: int
    stream: int  # mixed into the noise keys: the prompt index when the seed is shared, else -1
    first_row: int  # result row of sample 0
    samples: list[int]  # sample indices not yet admitted
    retain: bool = False  # keep each finished sample's K/V (KV continuation)
    extends: Retained | None = None  # the retained sequence these ids continue: only ids[extends.kv_len:] prefill

    @property
    def new_ids(self) -> int:
        """Ids this request prefills: all of them, or (KV continuation) those past its retained K/V."""
        return len(self.ids) - (self.extends.kv_len if self.extends is not None else 0)


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
        compile_prefill: compile the prefill too (with `compile`); off by default (memrl/model_runner.py says why).
        compile_layers: with `compile`, compile each decoder layer's work around its attention, once for all layers
          (memrl/compile.py compile_layers), instead of the whole decode step: seconds of compilation, not tens.
        sync_every: decode steps between host looks at the device; default 16 on GPU, 1 on CPU (syncs are free).
        kernels: "triton" | "torch" | None (kernels.get_backend(); "auto" = Triton on CUDA, the torch references on
          CPU even under TRITON_INTERPRET, which is for kernel tests — pass "triton" to run the interpreter).
        retain_budget_tokens: bound on the K/V tokens kept for continuation (retain=True); None = no bound.
        """
        cfg = model.config
        if not 0 < vocab_size <= cfg.vocab_size:
            raise ValueError(f"vocab_size must be in [1, {cfg.vocab_size}] (the model's rows), got {vocab_size}")
        self.model, self.cfg, self.vocab_size = model, cfg, vocab_size
        device = model.output_weight().device
        on_cuda = device.type == "cuda"
        backend = kernels or get_backend()
        cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        use_triton = backend == "triton" or (backend == "auto" and on_cuda)
        self.runner = ModelRunner(model, vocab_size, use_triton, cuda_graphs, on_cuda if compile is None else compile,
                                  compile_fallback, compile_prefill, compile_layers)
        self.device, self.cache = device, self.runner.cache
        self.kv_budget_tokens = kv_budget_tokens
        self.kv_memory_fraction = kv_memory_fraction
        self.prefill_tokens = prefill_tokens or (32768 if on_cuda else 8192)
        self.sync_every = sync_every or (16 if on_cuda else 1)
        self.retained = RetainedKV(retain_budget_tokens)  # KV continuation: finished sequences kept by handle
        self.B = 0  # live rows: slots 0..B-1
        self.last_stats: dict = {}
        self.stats: dict = {}
        self.lifetime = self.runner.lifetime  # compile_s, compiles, capture_s, captures over every call

    compile = property(lambda self: self.runner.compile, doc="torch.compile in use (False after a fallback)")
    compile_error = property(lambda self: self.runner.compile_error)

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
        self.runner.stats = self.stats
        live = [r for r in requests if r.max_new_tokens > 0]
        if live:
            self._prepare(live, len(results), min_slot_len)
        return requests, results, live

    def free(self, handles) -> None:
        """Drop retained sequences that will not be extended (KV continuation)."""
        self.retained.free(handles)

    def release(self) -> None:
        """Free the KV cache, the CUDA graphs and every retained sequence (their memory returns to PyTorch)."""
        self.runner.release()
        self.retained.clear()

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
        """Size the cache and the slot layout for this call; reset the host mirrors of the slots."""
        granule = 128 if self.runner.cuda_graphs else 16  # coarse on GPU: similar lengths reuse their graphs
        longest = max(max(len(r.ids) + r.max_new_tokens for r in requests), min_slot_len)
        slot_len = -(-longest // granule) * granule
        need = sum(len(r.samples) for r in requests) * slot_len
        budget = self.kv_budget_tokens if self.kv_budget_tokens is not None else \
            self.cache.budget_tokens(rows, self.prefill_tokens, self.kv_memory_fraction)
        tokens = min(need, budget)
        if tokens < slot_len:
            raise ValueError(f"KV budget of {tokens} tokens cannot hold one sequence of {slot_len} tokens "
                             f"(longest prompt + max_new_tokens); raise kv_budget_tokens / kv_memory_fraction")
        self.cache.reserve(tokens)
        self.runner.use_layout(slot_len, max(8, max(len(r.params.stop_ids) for r in requests)), rows)
        S = self.cache.slots
        self.res_len = np.zeros(rows, dtype=np.int64)
        # host mirrors of the slots (moved along with the device state)
        self.h_row = np.zeros(S, dtype=np.int64)  # result row
        self.h_gen = np.zeros(S, dtype=np.int64)  # tokens generated, assuming the row has not finished
        self.h_len = np.zeros(S, dtype=np.int64)  # prompt length
        self.h_max_new = np.zeros(S, dtype=np.int64)
        self.h_retain = np.zeros(S, dtype=bool)  # KV continuation: copy the row's K/V out when it finishes
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # result row -> its K/V, until _collect
        self.B = 0
        self.stats.update(slots=S, slot_len=slot_len)

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
        """Waiting requests' samples into the free slots, then their prefill, longest first."""
        t0, compiling0 = self._now(), self.lifetime["compile_s"]
        lo, free = self.B, self.cache.slots - self.B
        entries = []  # (request, sample indices, first slot)
        slot = lo
        while waiting and free > 0:
            req = waiting[0]
            take, req.samples = req.samples[:free], req.samples[free:]
            entries.append((req, take, slot))
            slot, free = slot + len(take), free - len(take)
            if not req.samples:
                waiting.popleft()
        for req, take, first in entries:  # the host mirrors of the new rows; their device state: runner.load
            for j, s in zip(take, range(first, first + len(take))):
                self.h_row[s], self.h_gen[s], self.h_len[s] = req.first_row + j, 1, len(req.ids)
                self.h_max_new[s], self.h_retain[s] = req.max_new_tokens, req.retain
        self.runner.load(entries)

        # prefill, longest first, in batches of at most prefill_tokens padded tokens; continuations prefill only
        # their new ids, after their retained K/V is restored into their slot (their batches are also bounded in
        # keys: each row gathers its whole prefix, expanded to the query heads, for the masked attention)
        fresh = sorted((e for e in entries if e[0].extends is None), key=lambda e: -e[0].new_ids)
        more = sorted((e for e in entries if e[0].extends is not None), key=lambda e: -e[0].new_ids)
        for group, prefill in ((fresh, self._prefill), (more, self._prefill_extend)):
            i = 0
            while i < len(group):
                T, keys = group[i][0].new_ids, len(group[i][0].ids)
                j = i + 1
                while j < len(group) and (j - i + 1) * T <= self.prefill_tokens and (
                        (j - i + 1) * max(keys, len(group[j][0].ids)) <= 4 * self.prefill_tokens):
                    keys = max(keys, len(group[j][0].ids))
                    j += 1
                prefill(group[i:j])
                i = j
        self.B = slot
        self.stats["admissions"] += 1
        self.stats["prefill_s"] += self._now() - t0 - (self.lifetime["compile_s"] - compiling0)  # compile_s apart

    def _prefill(self, entries) -> None:
        self.runner.prefill([req.ids for req, _, _ in entries],
                            [list(range(first, first + len(take))) for _, take, first in entries])

    def _prefill_extend(self, entries) -> None:
        """Requests that extend a retained sequence (n == 1: one slot each): its K/V back into the request's
        slot, then a prefill of the new ids only, at their absolute positions."""
        starts = []
        for req, _, first in entries:
            starts.append(req.extends.kv_len)
            self.cache.copy_in(first, req.extends.k, req.extends.v)
        suffixes = [req.ids[start:] for (req, _, _), start in zip(entries, starts)]
        for req, _, _ in entries:
            req.extends = None  # its K/V now lives in the slot; drop the copy
        self.runner.prefill_extend(suffixes, starts, [first for _, _, first in entries])

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

    @torch.no_grad()
    def _compact(self) -> None:
        """Finished rows out (results saved), tail rows into the holes: live rows stay in slots 0..B-1."""
        B = self.B
        if B == 0:
            return
        done, gen = self.runner.finished(B)  # the one host sync per round
        self.h_gen[:B] = gen
        finished = np.flatnonzero(done)
        if finished.size == 0:
            return
        if self.h_retain[finished].any():
            self._keep_finished(finished, gen)
        self.runner.save_results(finished, self.h_row[finished])
        self.res_len[self.h_row[finished]] = gen[finished]
        live = np.flatnonzero(~done)
        k = live.size
        holes, movers = finished[finished < k], live[live >= k]
        if movers.size:
            self.runner.move(holes, movers)
            for h in (self.h_row, self.h_gen, self.h_len, self.h_max_new, self.h_retain):
                h[holes] = h[movers]
        self.runner.reset(k, B)
        self.B = k

    def _collect(self, requests: list[_Request], results: list[Completion]) -> None:
        toks, logps = self.runner.results()
        for req in requests:
            for j in range(req.params.n):
                r = req.first_row + j
                n = int(self.res_len[r])
                c = results[r]
                c.token_ids, c.logprobs = toks[r][:n], logps[r][:n]
                c.finish_reason = "stop" if n and c.token_ids[-1] in req.params.stop_ids else "length"
                if r in self.kept:  # KV continuation: the finished sequence joins the retained store
                    c.handle = self.retained.keep(req.ids + c.token_ids, *self.kept.pop(r))

    @torch.no_grad()
    def _decode_step(self) -> None:
        B = self.B
        rows_run = self.runner.decode_step(B, int((self.h_len[:B] + self.h_gen[:B]).max()))
        self.stats["decode_steps"] += 1
        self.stats["decode_row_steps"] += B
        self.stats["padded_row_steps"] += rows_run - B

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
