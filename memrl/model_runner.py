"""The generator's device side: slot state, forward passes, sampling, torch.compile, CUDA graphs.

memrl/generate.py decides what runs where (requests, slots, admission, compaction: host bookkeeping);
the ModelRunner runs it and holds everything the device reads:

    runner.use_layout(slot_len, max_stop, rows)   # the call's slot state (+ its graphs, if seen before)
    runner.load(entries)                          # admitted rows' sampling params, seeds, budgets
    runner.prefill(...) / prefill_extend(...)     # their prompts (or new suffixes) -> first tokens
    runner.decode_step(B, host_max_len)           # one token for slots 0..B-1
    done, gen = runner.finished(B)                # the one host sync of a round
    runner.save_results(slots, rows); runner.move(dst, src); runner.reset(lo, hi)

The per-slot state lives in static buffers (_SlotState) updated in place, so a CUDA graph captured
once replays for every call with the same layout. Every forward runs under torch.no_grad(): the
attention custom ops have no autograd formula.
CUDA graphs (GPU): one per (row bucket, fused sampling or not) and cache layout (slot length),
captured on first use, replayed: forward, attention over each row's valid KV (kernels/
decode_attention.py, which also appends the step's K/V), sampling (fused Triton sampler; top-k/top-p
rows replay a forward-only graph and sort outside it), state update. Buckets of 32 rows (64 above
256): below ~256 rows a step reads the weights once whatever the batch (flat below 64 rows on H100),
and a layout's graphs are kept across calls (memory and answer turns alternate): a rollout captures
each (bucket, layout) once.
torch.compile (a failure falls back to eager with a warning, or raises with compile_fallback=False):
compile_layers (train.py's default) compiles each layer's work around its attention once for all
layers (memrl/compile.py); else ONE compile of the whole decode step whatever the batch, slots or
lengths (dynamic shapes, no duck sizing, no bucket below 32 rows: a batch of 1 would be specialised).
The prefill stays eager unless compile_prefill (~20% of the prefill, a few % of a rollout, for one
more compile). Inductor caches code on disk (TORCHINDUCTOR_CACHE_DIR); compile_s / capture_s apart.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

from memrl.compile import compile_layers as compile_layers_, compiled_graphs, uncompile_layers
from memrl.kv_cache import KVCache, decode_fn, extend_fn, prefill_fn
from memrl.model import Transformer
from memrl.sampling import row_keys, sample_fused, sample_torch

MIN_BUCKET = 32  # rows; also keeps a batch of 1 (a size the compiler would specialise) out of it
MAX_LAYOUTS = 8  # cache layouts (slot lengths) whose graphs are kept; a rollout alternates a few


def _bucket(n: int, cap: int) -> int:
    """Batch sizes that get their own CUDA graph: 12 up to 512 rows (32, 64, ..., 256, 320, ...).
    A decode step reads every weight once, whatever the batch: its GEMMs stay bandwidth-bound up to
    ~256 rows on H100/H200 (the bf16 ridge point is ~300 FLOP per weight byte), and a padding row
    attends over one key, so padding costs ~nothing there; above 256 rows it adds at most 25%.
    Fewer buckets = fewer captures."""
    step = MIN_BUCKET if n <= 256 else 64 if n <= 512 else 128
    return min(-(-n // step) * step, cap)


class _SlotState:
    """Per-slot decode state, on the device, in static buffers (CUDA graphs read them in place)."""

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
        self.out_tok = torch.zeros(slots, width, **z)  # column width-1 takes finished rows' writes
        self.out_logp = torch.zeros(slots, width, device=device)
        self.rows = torch.arange(slots, **z)
        heads = torch.arange(kv_heads, **z)
        self.kv_base = (self.rows[:, None] * kv_heads + heads[None, :]) * slot_len  # KV row of pos 0
        self.width = width

    def per_slot(self) -> list[torch.Tensor]:
        return [self.cur_tok, self.pos, self.gen, self.max_new, self.top_k, self.key0, self.key1,
                self.temp, self.top_p, self.stop, self.done, self.out_tok, self.out_logp]

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for t in self.per_slot():
            t[dst] = t[src]

    def reset(self, lo: int, hi: int) -> None:
        """Inert padding rows: done (nothing recorded), position 0 of their own (free) slot."""
        for t in (self.cur_tok, self.pos, self.gen, self.max_new):
            t[lo:hi] = 0
        self.done[lo:hi] = True


class ModelRunner:
    def __init__(self, model: Transformer, vocab_size: int, use_triton: bool, cuda_graphs: bool,
                 compile: bool, compile_fallback: bool, compile_prefill: bool, compile_layers: bool):
        weight = model.output_weight()
        self.model, self.cfg, self.vocab_size = model, model.config, vocab_size
        self.device, self.dtype = weight.device, weight.dtype
        self.use_triton, self.cuda_graphs = use_triton, cuda_graphs
        self.compile, self.compile_fallback = compile, compile_fallback
        self.compile_layers = compile and compile_layers
        self.compile_prefill = compile_prefill and not compile_layers
        if self.compile_layers:
            compile_layers_(model)
        self.compile_error: str | None = None
        self.cache = KVCache(self.cfg, self.dtype, self.device, use_triton)
        self.state: _SlotState | None = None
        self.trunc = np.zeros(0, dtype=bool)  # host mirror: the slot's row needs the sorting sampler
        self._layout_key = None
        self._graphs: dict = {}
        self._layouts: dict = {}  # earlier layout key -> (its slot state, its graphs), LRU first
        self._pool = None
        self._decode_fn = self._prefill_fn = self._extend_fn = None
        self.stats: dict = {}  # the current call's (memrl/generate.py resets it per call)
        self.lifetime = dict(compile_s=0.0, compiles=0, capture_s=0.0, captures=0)  # every call
        # test hooks, so the CPU tests walk the GPU schedule: padded buckets, the capture's warm-up
        self.pad_batches, self.rehearse = cuda_graphs, False

    # -- layouts -------------------------------------------------------------------------------

    def use_layout(self, slot_len: int, max_stop: int, rows: int) -> None:
        """Slots of slot_len over the reserved cache, with the slot state (and graphs) of an earlier
        call of this layout: the graphs baked in the addresses of that state, of the cache views
        (configure() rebuilds them identically) and of the weights. Layouts over another buffer or
        other weights never come back: dropped, with their graphs. rows: the call's result rows."""
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        key = (self.cache.buffer.data_ptr(), self.cache.capacity, slot_len, max_stop, weights)
        if key != self._layout_key:
            if self._layout_key is not None:
                self._layouts[self._layout_key] = (self.state, self._graphs)
            for old in [k for k in self._layouts if (k[0], k[1], k[4]) != (key[0], key[1], key[4])]:
                del self._layouts[old]
            slots = self.cache.configure(slot_len)
            kept = self._layouts.pop(key, None)
            if kept is not None:
                self.state, self._graphs = kept
            else:
                self.state = _SlotState(slots, slot_len + 1, max_stop, self.cfg.num_key_value_heads,
                                        slot_len, self.device)
                self._graphs = {}
            while len(self._layouts) >= MAX_LAYOUTS:  # least recently used first
                del self._layouts[next(iter(self._layouts))]
            if self.cuda_graphs and not self._layouts and not self._graphs:
                # one memory pool shared by every graph over this buffer (they never run at once); a
                # new buffer gets a new pool, the old one is freed with the graphs just dropped
                self._pool = torch.cuda.graph_pool_handle()
            self._layout_key = key
        self.res_tok = torch.zeros(rows, self.state.width, dtype=torch.int64, device=self.device)
        self.res_logp = torch.zeros(rows, self.state.width, device=self.device)
        self.trunc = np.zeros(self.cache.slots, dtype=bool)
        self.state.reset(0, self.cache.slots)  # every slot inert, even after a call that raised

    def release(self) -> None:
        self.cache.release()
        self.state, self._layout_key, self._graphs, self._layouts, self._pool = None, None, {}, {}, None

    # -- rows in, rows out (no host sync but `finished`) ----------------------------------------

    def load(self, entries: list) -> None:
        """Admitted samples start: their sampling parameters, noise keys, budgets, stop ids and
        positions into their slots, one host->device copy per tensor. entries: (request, sample
        indices, first slot) of memrl/generate.py, filling consecutive slots."""
        st, lo = self.state, entries[0][2]
        names = ("temp", "top_k", "top_p", "key0", "key1", "max_new", "pos", "stop")
        rows = []  # a value per name, per slot
        for req, take, first in entries:
            p, stops = req.params, sorted(req.params.stop_ids)
            for j, s in zip(take, range(first, first + len(take))):
                rows.append((0.0 if p.is_greedy else p.temperature, p.top_k if p.truncates else 0,
                             p.top_p if p.truncates else 1.0, *row_keys(req.seed, req.stream, j),
                             req.max_new_tokens, len(req.ids) - 1,  # the first sample moves pos on
                             stops + [-1] * (st.stop.shape[1] - len(stops))))
                self.trunc[s] = p.truncates  # sampled by sorting (top-k / top-p), not fused
        per_slot = dict(zip(names, map(list, zip(*rows))))
        hi = lo + len(per_slot["temp"])
        for name, values in per_slot.items():
            t = getattr(st, name)
            t[lo:hi] = torch.tensor(values, dtype=t.dtype).to(self.device, non_blocking=True)
        st.gen[lo:hi] = 0
        st.done[lo:hi] = False

    def finished(self, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(done [B] bool, generated [B]) of slots 0..B-1: the one host sync per round."""
        info = torch.stack([self.state.done[:B].long(), self.state.gen[:B]]).cpu().numpy()
        return info[0].astype(bool), info[1]

    def save_results(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Finished slots' tokens and log-probs into their result rows."""
        slots_t, rows_t = torch.from_numpy(slots).to(self.device), torch.from_numpy(rows).to(self.device)
        self.res_tok.index_copy_(0, rows_t, self.state.out_tok.index_select(0, slots_t))
        self.res_logp.index_copy_(0, rows_t, self.state.out_logp.index_select(0, slots_t))

    def move(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows of slots src into slots dst (compaction): their state and their K/V."""
        dst_t, src_t = torch.from_numpy(dst).to(self.device), torch.from_numpy(src).to(self.device)
        self.state.move(dst_t, src_t)
        self.cache.move(dst_t, src_t)
        self.trunc[dst] = self.trunc[src]

    def reset(self, lo: int, hi: int) -> None:
        self.state.reset(lo, hi)

    def results(self) -> tuple[list[list[int]], list[list[float]]]:
        return self.res_tok.cpu().tolist(), self.res_logp.cpu().tolist()

    # -- prefill ---------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> None:
        """Right-padded prompts in one forward; prompt i's K/V into each of slots[i] (its n samples:
        the fork) and a first token sampled for each from its last logits."""
        P, T = len(prompts), max(len(p) for p in prompts)
        # compiled, a size of 1 would be specialised (one more compile): such a batch, length or fork
        # is padded to 2 (a padding row's logits are never read, a padding position is overwritten
        # by the first decode step, a repeated (slot, row) pair writes the same K/V twice)
        least = 2 if self.compile and self.compile_prefill else 1
        ids = torch.zeros(max(P, least), max(T, least), dtype=torch.int64)
        dst, src = [], []
        for r, (prompt, row_slots) in enumerate(zip(prompts, slots)):
            ids[r, :len(prompt)] = torch.tensor(prompt)
            dst += row_slots
            src += [r] * len(row_slots)
        dev = self.device
        dst_t, src_t = torch.tensor(dst, device=dev), torch.tensor(src, device=dev)
        fork_dst, fork_src = (dst_t, src_t) if len(dst) >= least else (dst_t.repeat(least),
                                                                       src_t.repeat(least))
        last = torch.tensor([len(p) for p in prompts] + [1] * (ids.shape[0] - P), device=dev) - 1
        positions = torch.arange(ids.shape[1], device=dev).expand(ids.shape)
        if self._prefill_fn is None:
            fn = prefill_fn(self.model, self.cache.id)
            self._prefill_fn = self._maybe_compile(fn) if self.compile_prefill else torch.no_grad()(fn)
        logits = self._prefill_fn(ids.to(dev), positions, last, fork_dst, fork_src)[src_t]  # (rows, V)
        self._sample_and_advance(dst_t, logits, self.trunc[dst])
        self.stats["prefill_tokens"] += sum(len(p) for p in prompts)
        self.stats["prefill_padded_tokens"] += ids.numel()

    @torch.no_grad()
    def prefill_extend(self, suffixes: list[list[int]], starts: list[int], slots: list[int]) -> None:
        """KV continuation: each suffix prefilled at its absolute positions starts[i].. in slot
        slots[i] (whose retained K/V was restored there), attending over the prefix and itself."""
        P, T = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.zeros(P, T, dtype=torch.int64)
        for r, suffix in enumerate(suffixes):
            ids[r, :len(suffix)] = torch.tensor(suffix)
        dev, lens = self.device, [len(s) for s in suffixes]
        starts_t, lens_t = torch.tensor(starts, device=dev), torch.tensor(lens, device=dev)
        dst_t = torch.tensor(slots, device=dev)
        positions = starts_t[:, None] + torch.arange(T, device=dev)[None, :]  # pads: never read
        key_len = max(s + n for s, n in zip(starts, lens))
        if self._extend_fn is None:
            self._extend_fn = self._maybe_compile(extend_fn(self.model, self.cache.id))
        logits = self._extend_fn(ids.to(dev), positions, lens_t - 1, dst_t, starts_t, lens_t, key_len)
        self._sample_and_advance(dst_t, logits, self.trunc[slots])
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["prefill_padded_tokens"] += P * T

    # -- one decode step -------------------------------------------------------------------------

    @torch.no_grad()
    def decode_step(self, B: int, host_max_len: int) -> int:
        """One token for slots 0..B-1 (host_max_len: the longest live row, for the CPU attention);
        -> the rows run, padded to the graph bucket."""
        fused = self.use_triton and not self.trunc[:B].any()
        Bb = _bucket(B, self.cache.slots) if self.pad_batches else B
        if self.cuda_graphs:
            graph, logits = self.graph(Bb, fused)
            graph.replay()
        else:
            if not self.use_triton:  # torch attention reads keys up to the longest live row only
                self.cache.host_max_len = min(host_max_len, self.cache.slot_len)
            if self.rehearse and (Bb, fused) not in self._graphs:
                self._warm_up(Bb, fused)
                self._graphs[(Bb, fused)] = None
                self._count("capture", 0.0, 1)
            logits = self.step_body(Bb, fused)
        if not fused:
            self._sample_and_advance(self.state.rows[:Bb], logits, self.trunc[:B])
        return Bb

    @torch.no_grad()
    def step_body(self, Bb: int, fused: bool):
        """Forward of slots 0..Bb-1 (+ fused sampling and state update when `fused`); capturable."""
        st = self.state
        if self._decode_fn is None:
            self._decode_fn = self._maybe_compile(decode_fn(self.model, self.cache.id))
        logits = self._decode_fn(st.cur_tok, st.pos, st.kv_base, Bb)
        if not fused:
            return logits
        token, logp = sample_fused(logits, self.vocab_size, st.temp[:Bb], st.key0[:Bb],
                                   st.key1[:Bb], st.gen[:Bb])
        self._advance(st.rows[:Bb], token, logp)
        return None

    def _sample_and_advance(self, rows: torch.Tensor, logits: torch.Tensor, trunc: np.ndarray) -> None:
        """Sample one token for the given slots from their logits [len(rows), V]; update them.
        trunc: which of them (a prefix of `rows`; the rest are padding) sample by sorting."""
        st = self.state
        truncate_rows = np.flatnonzero(trunc) if trunc.any() else None
        if self.use_triton and truncate_rows is None:
            token, logp = sample_fused(logits, self.vocab_size, st.temp[rows], st.key0[rows],
                                       st.key1[rows], st.gen[rows])
        else:
            tr = None if truncate_rows is None else torch.as_tensor(truncate_rows, device=self.device)
            token, logp = sample_torch(logits, self.vocab_size, st.temp[rows], st.top_k[rows],
                                       st.top_p[rows], st.key0[rows], st.key1[rows], st.gen[rows], tr)
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
        # a row that just finished keeps its position and its last fed token, so while it waits to
        # leave (up to sync_every steps) it only rewrites the K/V it already holds there: it never
        # writes past its slot, and a retained sequence's K/V stays intact (KV continuation)
        st.pos.index_copy_(0, rows, st.pos[rows] + (live & ~finished).long())
        st.cur_tok.index_copy_(0, rows, torch.where(live & ~finished, token, st.cur_tok[rows]))
        st.done.index_copy_(0, rows, done | finished)

    # -- compile and CUDA graphs -----------------------------------------------------------------

    def _maybe_compile(self, fn):
        """fn, compiled when self.compile. Every forward runs under no_grad whatever the caller's
        mode: the attention custom ops have no autograd formula, and a compile traced with grad on
        would fail on them (and keep activations for a backward that never comes). A call that
        compiled adds its time to compile_s."""
        # per layer: fn stays eager, its layers' halves compile themselves on their first decode call
        compiled = fn if self.compile_layers else torch.compile(fn, dynamic=True) if self.compile else None

        @torch.no_grad()
        def call(*args):
            if self.compile and compiled is not None:
                graphs, t0 = compiled_graphs(), time.perf_counter()
                try:
                    # no duck sizing: sizes equal by chance at the first call would be assumed equal
                    # for good, and the first call where they differ would compile the model again
                    with fx_config.patch(use_duck_shape=False):
                        out = compiled(*args)
                except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly, loudly
                    if not self.compile_fallback:
                        raise
                    self.compile_error = f"{type(e).__name__}: {e}"
                    warnings.warn(f"torch.compile failed ({self.compile_error}); continuing eagerly")
                    self.compile = False
                    uncompile_layers(self.model)  # compile_layers' halves, if any
                else:
                    if compiled_graphs() > graphs:
                        self._count("compile", time.perf_counter() - t0, compiled_graphs() - graphs)
                    return out
            return fn(*args)

        return call

    def _count(self, what: str, seconds: float, n: int) -> None:
        """Add to this call's stats and the lifetime totals: compile_s / compiles, capture_s / ..."""
        for d in (self.stats, self.lifetime):
            d[f"{what}_s"] = d.get(f"{what}_s", 0.0) + seconds
            d[f"{what}s"] = d.get(f"{what}s", 0) + n

    @torch.no_grad()
    def graph(self, Bb: int, fused: bool):
        """The CUDA graph of one decode step at bucket size Bb (captured on first use)."""
        key = (Bb, fused)
        if key not in self._graphs:
            t0, compiling0 = time.perf_counter(), self.lifetime["compile_s"]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, inits cuBLAS, uncaptured
                self._warm_up(Bb, fused)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step_body(Bb, fused)
            self._graphs[key] = (graph, out)
            # the warm-up may have compiled the step (the first capture does): that is compile_s
            self._count("capture", time.perf_counter() - t0 - (self.lifetime["compile_s"] - compiling0), 1)
        return self._graphs[key]

    def _warm_up(self, Bb: int, fused: bool) -> None:
        """Run the step twice, then undo its effect on the state. The K/V it wrote are harmless: live
        rows get the same values rewritten by the real step, positions past a row's length are never
        read."""
        saved = [t.clone() for t in self.state.per_slot()]
        for _ in range(2):
            self.step_body(Bb, fused)
        for t, s in zip(self.state.per_slot(), saved):
            t.copy_(s)
