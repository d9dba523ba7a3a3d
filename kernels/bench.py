"""Benchmark memrl's kernels in isolation against eager PyTorch, torch.compile and Liger-Kernel.

    python -m kernels.bench                          # full run on one GPU (< 8 min on an H100)
    python -m kernels.bench --quick                  # one shape: a smoke test
    python -m kernels.bench --quick --device cpu     # tiny shapes on CPU (simple timer, no memory column)

One table per kernel; columns: median ms, % of the floor (floor / time: 100% = at the floor), peak
extra memory (torch.cuda.max_memory_allocated during one call minus what was allocated before it:
the inputs), and max |Δ| against a float64 reference computed on 2 × 64 rows (the first 64 tokens
of the first and of the last sequence) to keep the reference cheap; "rel" = max |Δ| / max |ref|.
Floors are measured in the same run: the HBM copy bandwidth (a 1 GiB device-to-device copy, read +
write bytes counted) for A and B, the cuBLAS lm_head GEMM at the same shape for A'.

Workload (N tokens = N/1,024 sequences × 1,024 tokens, as Liger's [B, L] APIs take them): bf16
logits ~ N(0, 2.5²) (A) or bf16 hidden ~ N(0, 1) and lm_head ~ N(0, 2.5²/H) (A'), random targets;
old/ref log-probs within ±0.05/±0.1 of the true ones (the ratio stays inside the clip band, so every
provider computes the same loss), per-sequence advantages, β = 1e-3 k3, all tokens unmasked.
Liger's logits-based APIs drop the last position of each sequence (they take [B, L+1, V] logits for
L completions), so they score N − N/1,024 of the N rows: 0.1% less work, not corrected for.

Results go to --out (default $OUT if set, else ./bench_out) as bench.md and bench.json.
A --budget-s guard (default 420 s) skips what is left, marked, rather than overrun.
"""
import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import backend
from kernels.ppo_loss import ppo_loss, ppo_loss_torch

GiB = 2**30
LOSS_KW = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=1e-3, kl_type="k3")
REF_ROWS = 64  # per end (first and last sequence)
COPY_BYTES = {"cuda": GiB, "cpu": 64 * 2**20}
PROVIDERS = ("eager", "compile", "liger", "ours", "ours_unfused", "ours_scoring")
LABEL = {"eager": "eager PyTorch", "compile": "torch.compile", "liger": "Liger-Kernel", "ours": "memrl (ours)",
         "ours_unfused": "ours (A'+B unfused)", "ours_scoring": "ours (chunked scoring)"}
ONLY_IN = {"ours_unfused": ("A'_fwd_bwd",), "ours_scoring": ("A'_fwd",)}  # providers that exist for some tables only


def for_table(providers, table: str) -> list[str]:
    return [p for p in providers if table in ONLY_IN.get(p, (table,))]
TABLES = {
    "A_fwd": "A forward (no-grad scoring)",
    "A_fwd_bwd": "A forward+backward with loss B",
    "A'_fwd_bwd": "A' lm_head+logp+loss fwd+bwd",
    "A'_fwd": "A' forward",
    "B": "B forward+backward",
}
FLOOR_NOTE = {
    "A_fwd": "floor = one read of the bf16 logits (N·V·2 bytes) at the measured copy bandwidth. Δ: logp.",
    "A_fwd_bwd": "floor = 3 × N·V·2 bytes (forward read; backward read + write of the bf16 dlogits). Δ: dlogits.",
    "A'_fwd_bwd": "floor = 3 cuBLAS lm_head GEMMs (logits, dH, dW). ours = linear_ppo_loss (A'+B fused: the "
                  "loss gradient is formed in the forward, 3 GEMMs); ours (A'+B unfused) = linear_token_logprobs "
                  "+ ppo_loss (4 GEMMs: its backward recomputes the logits). Δ: dhidden (dW is not checked here: "
                  "it sums over all N rows; tests/ check it against float64).",
    "A'_fwd": "floor = 1 cuBLAS lm_head GEMM. Δ: logp.",
    "B": "floor = max(bytes moved: 38·N (fwd 17·N read, bwd 17·N read + 4·N write) at the copy bandwidth, "
         "2 × one tiny kernel launch). Δ: dlogp. launches: CUDA kernels in one fwd+bwd (torch.profiler).",
}


@dataclass
class Plan:
    vocab: int
    hiddens: tuple[int, ...]
    ns: tuple[int, ...]
    temps: tuple[float, ...]
    loss_ns: tuple[int, ...]
    seq_len: int


FULL = Plan(151_936, (1536, 2560), (8192, 16384, 32768, 65536), (1.0, 0.7), (8192, 16384, 32768, 65536, 1 << 20), 1024)
QUICK = Plan(151_936, (1536,), (16384,), (1.0,), (65536,), 1024)
CPU_QUICK = Plan(1000, (64,), (256,), (1.0, 0.7), (4096,), 64)  # V = 1,000: ragged against every block size


@dataclass
class Result:
    table: str
    provider: str
    N: int
    H: int | None = None
    T: float | None = None
    ms: float | None = None
    floor_ms: float | None = None
    extra_gib: float | None = None
    max_abs: float | None = None
    rel: float | None = None
    launches: int | None = None
    samples: str = ""
    note: str = ""

    @property
    def pct_floor(self) -> float | None:
        return None if not (self.ms and self.floor_ms) else 100.0 * self.floor_ms / self.ms


# ----------------------------------------------------------------------------- measuring
class Runner:
    def __init__(self, device: str, budget_s: float):
        self.device, self.cuda = device, device == "cuda"
        self.t0, self.budget_s = time.time(), budget_s
        self.results: list[Result] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def wall_ms(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return 1e3 * (time.perf_counter() - t)

    def median_ms(self, fn, est_ms: float) -> tuple[float, str]:
        """Median time of fn. GPU: triton's do_bench (L2 flushed between calls) for calls under 30 ms;
        slower calls get a few CUDA-event samples (their working sets dwarf the 50 MB L2 anyway)."""
        if not self.cuda:
            reps = 1 if est_ms > 1000 else max(3, min(20, int(300 / max(est_ms, 1e-3))))
            return statistics.median(self.wall_ms(fn) for _ in range(reps)), f"{reps} timer samples"
        if est_ms < 30:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"
        reps = 1 if est_ms > 1000 else max(2, min(5, int(600 / est_ms)))
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), f"{reps} event samples"

    def count_launches(self, fn) -> int | None:
        if not self.cuda:
            return None
        try:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile
            self.sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                self.sync()
            return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
                       and not e.name.startswith(("Memcpy", "Memset")))
        except Exception as e:  # the count is informative only
            print(f"    (launch count failed: {type(e).__name__}: {e})", file=sys.stderr)
            return None

    def skip(self, res: Result, note: str) -> Result:
        res.note = note
        self.results.append(res)
        print(f"  {res.table:11s} N={res.N:<8d} H={res.H or '-'!s:5s} T={res.T or '-'!s:4s} "
              f"{LABEL.get(res.provider, res.provider):20s} {note}", flush=True)
        return res

    def measure(self, res: Result, fn, check=None, refill=None, reset=None, launches=False) -> Result:
        """Call 1 warms up (compiles); call 2 gives peak memory, |Δ| and a time estimate; then timing.
        refill() restores inputs that a provider overwrites (Liger's in-place gradient)."""
        if self.elapsed() > self.budget_s:
            return self.skip(res, f"skipped: time budget ({self.budget_s:.0f} s) used")
        try:
            out = fn()
            del out
            if refill:
                refill()
            if reset:
                reset()
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            out = fn()
            self.sync()
            est_ms = 1e3 * (time.perf_counter() - t)
            if self.cuda:
                res.extra_gib = (torch.cuda.max_memory_allocated() - base) / GiB
            if check is not None:
                res.max_abs, res.rel = check(out)
            del out
            if est_ms > 1000 and self.cuda:  # very slow: the measured call is the sample
                res.ms, res.samples = est_ms, "1 wall-clock sample"
            else:
                res.ms, res.samples = self.median_ms(fn, est_ms)
            if launches:
                res.launches = self.count_launches(fn)
        except Exception as e:  # OOM or a provider's failure: record it and go on
            msg = str(e)
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
                res.note = "OOM"
            else:
                res.note = f"error: {type(e).__name__}: {msg.splitlines()[0][:120] if msg else ''}"
                traceback.print_exc()
            res.ms = res.extra_gib = res.max_abs = res.rel = None
        finally:
            try:
                if reset:
                    reset()
                if refill:
                    refill()
            except Exception:
                traceback.print_exc()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.results.append(res)
        pct = res.pct_floor
        print(f"  {res.table:11s} N={res.N:<8d} H={res.H or '-'!s:5s} T={res.T or '-'!s:4s} "
              f"{LABEL.get(res.provider, res.provider):20s} "
              + (f"{res.ms:10.3f} ms" if res.ms is not None else f"{'':13s}")
              + (f"  {pct:5.1f}% of floor" if pct else "")
              + (f"  +{res.extra_gib:.2f} GiB" if res.extra_gib is not None else "")
              + (f"  |Δ| {res.max_abs:.2e}" if res.max_abs is not None else "")
              + (f"  {res.launches} launches" if res.launches is not None else "")
              + (f"  {res.note}" if res.note else "")
              + f"   [{self.elapsed():.0f} s]", flush=True)
        return res


def delta(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got.double() - want).abs().max().item()
    return diff, diff / max(want.abs().max().item(), 1e-300)


# ----------------------------------------------------------------------------- floors
def copy_bandwidth(run: Runner) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    n = COPY_BYTES[run.device]
    src = torch.empty(n, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    ms, _ = run.median_ms(lambda: dst.copy_(src), run.wall_ms(lambda: dst.copy_(src)))
    return 2 * n / (ms * 1e-3)


def tiny_launch_ms(run: Runner) -> float:
    x = torch.zeros(1, device=run.device)
    fn = (lambda: x.add_(1))
    fn()
    return run.median_ms(fn, run.wall_ms(fn))[0]


def gemm_ms(run: Runner, hidden: torch.Tensor, weight: torch.Tensor) -> float:
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    fn = (lambda: torch.mm(hidden.detach(), weight.detach().t(), out=out))
    fn()
    ms = run.median_ms(fn, run.wall_ms(fn))[0]
    del out
    return ms


# ----------------------------------------------------------------------------- providers' building blocks
def logp_eager(logits, targets, temperature):
    """The usual eager recipe: fp32 log_softmax, then gather."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def logp_lse(logits, targets, inv_t):
    """logsumexp + gather: the form torch.compile fuses best. inv_t is a tensor: one graph for all T."""
    z = logits.float() * inv_t
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def a_loss_lse(logits, targets, inv_t, old, ref, adv, mask, num_tokens):
    return ppo_loss_torch(logp_lse(logits, targets, inv_t), old, ref, adv, mask, num_tokens, **LOSS_KW)[0]


def linear_logp_eager(hidden, weight, targets, temperature):
    return logp_eager(hidden @ weight.t(), targets, temperature)


def linear_logp_lse(hidden, weight, targets, inv_t):
    return logp_lse(hidden @ weight.t(), targets, inv_t)


def linear_loss_lse(hidden, weight, targets, inv_t, old, ref, adv, mask, num_tokens):
    return ppo_loss_torch(linear_logp_lse(hidden, weight, targets, inv_t), old, ref, adv, mask, num_tokens,
                          **LOSS_KW)[0]


_COMPILED: dict = {}


def compiled(fn):
    """One torch.compile per function, dynamic in N (dim 0), reused across shapes and temperatures."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def mark_dynamic_rows(*tensors):
    for t in tensors:
        if t is not None and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def import_ours(name: str):
    import kernels
    return getattr(kernels, name)


class Liger:
    """Liger-Kernel 0.8.5 entry points, when its wheel is importable (and runnable: CUDA or TRITON_INTERPRET)."""

    def __init__(self, device: str):
        self.error, self.version = None, None
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
            self.fused_selective_log_softmax = fused_selective_log_softmax
            self.triton_grpo_loss = triton_grpo_loss
            self.FusedLinearGRPOLoss = LigerFusedLinearGRPOLoss
            for dist in ("liger-kernel", "liger_kernel"):
                try:
                    self.version = importlib.metadata.version(dist)
                    break
                except importlib.metadata.PackageNotFoundError:
                    pass
        except Exception as e:
            self.error = f"not importable ({type(e).__name__})"
        if self.error is None and device != "cuda" and not backend.interpreter_on():
            self.error = "needs CUDA or TRITON_INTERPRET=1"


# ----------------------------------------------------------------------------- inputs
def seeded(seed: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def loss_inputs(logp_true: torch.Tensor, seq_len: int, seed: int):
    """old/ref near the true log-probs (ratio inside the clip band), per-sequence advantages, full mask."""
    N, dev = logp_true.numel(), logp_true.device
    g = seeded(seed, dev.type)
    old = logp_true + (torch.rand(N, generator=g, device=dev) - 0.5) * 0.1
    ref = logp_true + (torch.rand(N, generator=g, device=dev) - 0.5) * 0.2
    adv_seq = torch.randn(N // seq_len, generator=g, device=dev)
    adv = adv_seq.repeat_interleave(seq_len)
    mask = torch.ones(N, dtype=torch.bool, device=dev)
    return old, ref, adv_seq, adv, mask, torch.tensor(N, device=dev)


def ref_rows(N: int, seq_len: int, device) -> torch.Tensor:
    r = min(REF_ROWS, seq_len - 1)  # position seq_len-1 is the one Liger's logits APIs drop
    return torch.cat([torch.arange(r), N - seq_len + torch.arange(r)]).to(device)


def reference_from_logits64(z64: torch.Tensor, targets, inv_t: float, old, ref, adv, mask, num_tokens):
    """float64 logp and d(loss)/d(raw logits) for a few rows; z64 = raw logits of those rows (fp64)."""
    z = z64 * inv_t
    logp64 = z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
    with torch.enable_grad():
        lp = logp64.clone().requires_grad_(True)
        loss, _ = ppo_loss_torch(lp, old.double(), ref.double(), adv.double(), mask, num_tokens.double(), **LOSS_KW)
        (dlogp,) = torch.autograd.grad(loss, lp)
    onehot = torch.zeros_like(z).scatter_(-1, targets[:, None], 1.0)
    dz = dlogp[:, None] * (onehot - torch.softmax(z, -1)) * inv_t
    return logp64, dz


# ----------------------------------------------------------------------------- A: logits -> logp
def bench_logprob(run: Runner, plan: Plan, N: int, T: float, providers, liger: Liger, bw: float, slow: dict):
    dev, V, L = run.device, plan.vocab, plan.seq_len
    B = N // L
    dtype = torch.bfloat16
    logits = torch.empty(N, V, dtype=dtype, device=dev)

    def fill():
        with torch.no_grad():
            logits.normal_(0.0, 2.5, generator=seeded(1000 + N, dev))

    fill()
    logits.requires_grad_(True)
    targets = torch.randint(V, (N,), generator=seeded(2000 + N, dev), device=dev)
    with torch.no_grad():  # "true" logp for the loss inputs: chunked fp32, independent of every provider
        logp_true = torch.cat([logp_eager(logits[s:s + 2048], targets[s:s + 2048], T) for s in range(0, N, 2048)])
    old, ref, adv_seq, adv, mask, num_tokens = loss_inputs(logp_true, L, 3000 + N)
    del logp_true
    rows = ref_rows(N, L, dev)
    with torch.no_grad():
        logp64, dz64 = reference_from_logits64(logits[rows].double(), targets[rows], 1.0 / T,
                                               old[rows], ref[rows], adv[rows], mask[rows], num_tokens)
    one = torch.ones((), device=dev)
    inv_t = torch.tensor(1.0 / T, device=dev)
    # Liger's [B, L+1, V] convention: our [N, V] rows viewed as [B, L, V] = L-1 completions per sequence
    lg_logits = logits.view(B, L, V)
    lg_ids = targets.view(B, L)[:, :L - 1].contiguous()
    lg_old = old.view(B, L)[:, :L - 1].contiguous()
    lg_ref = ref.view(B, L)[:, :L - 1].contiguous()
    lg_mask = torch.ones(B, L - 1, dtype=torch.int32, device=dev)
    lg_rows = (rows // L, rows % L)

    def reset():
        logits.grad = None

    floor_fwd = N * V * 2 / bw * 1e3
    for prov in for_table(providers, "A_fwd"):
        res = Result("A_fwd", prov, N, None, T, floor_ms=floor_fwd)
        if slow.get(("A_fwd", N, None, prov)):
            run.skip(res, slow[("A_fwd", N, None, prov)])
            continue
        check = (lambda out: delta(out[rows], logp64))
        if prov == "eager":
            fn = (lambda: _no_grad(logp_eager, logits, targets, T))
        elif prov == "compile":
            mark_dynamic_rows(logits, targets)
            fn = (lambda: _no_grad(compiled(logp_lse), logits, targets, inv_t))
        elif prov == "liger":
            if liger.error:
                run.skip(res, f"Liger {liger.error}")
                continue
            res.note = "fused_selective_log_softmax"
            fn = (lambda: liger.fused_selective_log_softmax(lg_logits.detach(), lg_ids, T))
            check = (lambda out: delta(out[lg_rows], logp64))
        else:
            token_logprobs = import_ours("token_logprobs")
            fn = (lambda: _no_grad(lambda: token_logprobs(logits, targets, T)[0]))
        run.measure(res, fn, check=check)

    floor_fb = 3 * N * V * 2 / bw * 1e3
    for prov in for_table(providers, "A_fwd_bwd"):
        res = Result("A_fwd_bwd", prov, N, None, T, floor_ms=floor_fb)
        if slow.get(("A_fwd_bwd", N, None, prov)):
            run.skip(res, slow[("A_fwd_bwd", N, None, prov)])
            continue
        check = (lambda out: delta(out[rows], dz64))
        refill = None
        if prov == "eager":
            def fn():
                logits.grad = None
                loss, _ = ppo_loss_torch(logp_eager(logits, targets, T), old, ref, adv, mask, num_tokens, **LOSS_KW)
                loss.backward(one)
                return logits.grad
        elif prov == "compile":
            mark_dynamic_rows(logits, targets, old, ref, adv, mask)

            def fn():
                logits.grad = None
                compiled(a_loss_lse)(logits, targets, inv_t, old, ref, adv, mask, num_tokens).backward(one)
                return logits.grad
        elif prov == "liger":
            if liger.error:
                run.skip(res, f"Liger {liger.error}")
                continue
            res.note = "triton_grpo_loss (dlogits in place)"
            refill = fill  # its backward overwrites the logits with their gradient

            def fn():
                logits.grad = None
                loss, _ = liger.triton_grpo_loss(lg_logits, lg_old, lg_ref, lg_ids, adv_seq, lg_mask, temperature=T,
                                                 beta=LOSS_KW["kl_coef"], eps_low=LOSS_KW["eps_low"],
                                                 eps_high=LOSS_KW["eps_high"], inplace=True, loss_type="dapo",
                                                 reduce=True, num_items_in_batch=N)
                loss.backward(one)
                return logits.grad
        else:
            token_logprobs = import_ours("token_logprobs")

            def fn():
                logits.grad = None
                logp, _ = token_logprobs(logits, targets, T)
                loss, _ = ppo_loss(logp, old, ref, adv, mask, num_tokens, **LOSS_KW)
                loss.backward(one)
                return logits.grad
        run.measure(res, fn, check=check, refill=refill, reset=reset)
    del logits


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


# ----------------------------------------------------------------------------- A': hidden, lm_head -> logp
def bench_linear(run: Runner, plan: Plan, N: int, H: int, T: float, providers, liger: Liger, slow: dict,
                 gemm_cache: dict):
    dev, V, L = run.device, plan.vocab, plan.seq_len
    B = N // L
    g = seeded(4000 + N + H, dev)
    hidden = torch.randn(N, H, generator=g, device=dev).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, device=dev) * (2.5 / math.sqrt(H))).to(torch.bfloat16)
    weight.requires_grad_(True)
    targets = torch.randint(V, (N,), generator=g, device=dev)
    with torch.no_grad():
        logp_true = torch.cat([linear_logp_eager(hidden[s:s + 2048], weight, targets[s:s + 2048], T)
                               for s in range(0, N, 2048)])
    old, ref, adv_seq, adv, mask, num_tokens = loss_inputs(logp_true, L, 5000 + N)
    del logp_true
    rows = ref_rows(N, L, dev)
    with torch.no_grad():  # float64 reference for a few rows, lm_head converted to fp64 in vocab chunks
        h64 = hidden[rows].double()
        z64 = torch.cat([h64 @ weight[s:s + 16384].double().t() for s in range(0, V, 16384)], dim=1)
        logp64, dz64 = reference_from_logits64(z64, targets[rows], 1.0 / T, old[rows], ref[rows], adv[rows],
                                               mask[rows], num_tokens)
        dh64 = sum(dz64[:, s:s + 16384] @ weight[s:s + 16384].double() for s in range(0, V, 16384))
        del z64, dz64, h64
    if (N, H) not in gemm_cache and run.elapsed() < run.budget_s:
        gemm_cache[(N, H)] = gemm_ms(run, hidden, weight)
        gc.collect()
        if run.cuda:
            torch.cuda.empty_cache()
    gemm = gemm_cache.get((N, H))
    one = torch.ones((), device=dev)
    inv_t = torch.tensor(1.0 / T, device=dev)

    def reset():
        hidden.grad = weight.grad = None

    for prov in for_table(providers, "A'_fwd_bwd"):
        res = Result("A'_fwd_bwd", prov, N, H, T, floor_ms=3 * gemm if gemm else None)
        if slow.get(("A'_fwd_bwd", N, H, prov)):
            run.skip(res, slow[("A'_fwd_bwd", N, H, prov)])
            continue
        if prov == "eager":
            def fn():
                reset()
                logp = linear_logp_eager(hidden, weight, targets, T)
                ppo_loss_torch(logp, old, ref, adv, mask, num_tokens, **LOSS_KW)[0].backward(one)
                return hidden.grad
        elif prov == "compile":
            mark_dynamic_rows(hidden, targets, old, ref, adv, mask)

            def fn():
                reset()
                compiled(linear_loss_lse)(hidden, weight, targets, inv_t, old, ref, adv, mask,
                                          num_tokens).backward(one)
                return hidden.grad
        elif prov == "liger":
            if liger.error:
                run.skip(res, f"Liger {liger.error}")
                continue
            res.note = "LigerFusedLinearGRPOLoss"
            lg_loss = liger.FusedLinearGRPOLoss(beta=LOSS_KW["kl_coef"], compiled=run.cuda, use_ref_model=True,
                                                epsilon_low=LOSS_KW["eps_low"], epsilon_high=LOSS_KW["eps_high"],
                                                loss_type="dapo", temperature=T)
            lg_mask = torch.ones(B, L, dtype=torch.int64, device=dev)

            def fn():
                reset()
                loss, _ = lg_loss(hidden.view(B, L, H), weight, targets.view(B, L), lg_mask, adv_seq,
                                  ref_per_token_logps=ref.view(B, L), old_per_token_logps=old.view(B, L),
                                  num_items_in_batch=N)
                loss.backward(one)
                return hidden.grad
        elif prov == "ours_unfused":
            linear_token_logprobs = import_ours("linear_token_logprobs")

            def fn():
                reset()
                logp, _ = linear_token_logprobs(hidden, weight, targets, T)
                ppo_loss(logp, old, ref, adv, mask, num_tokens, **LOSS_KW)[0].backward(one)
                return hidden.grad
        else:
            linear_ppo_loss = import_ours("linear_ppo_loss")
            res.note = "linear_ppo_loss (3 GEMMs)"

            def fn():
                reset()
                linear_ppo_loss(hidden, weight, targets, adv, mask, num_tokens, old, ref, T, **LOSS_KW)[0].backward(one)
                return hidden.grad
        run.measure(res, fn, check=lambda out: delta(out[rows], dh64), reset=reset)

    for prov in for_table(providers, "A'_fwd"):
        res = Result("A'_fwd", prov, N, H, T, floor_ms=gemm)
        if slow.get(("A'_fwd", N, H, prov)):
            run.skip(res, slow[("A'_fwd", N, H, prov)])
            continue
        if prov == "eager":
            fn = (lambda: _no_grad(linear_logp_eager, hidden, weight, targets, T))
        elif prov == "compile":
            mark_dynamic_rows(hidden, targets)
            fn = (lambda: _no_grad(compiled(linear_logp_lse), hidden, weight, targets, inv_t))
        elif prov == "liger":
            run.skip(res, "— (LigerFusedLinearGRPOLoss computes its gradients inside the forward; see fwd+bwd)")
            continue
        elif prov == "ours_scoring":  # cuBLAS GEMM per row chunk + kernel A: linear_ppo_loss's numerics
            from kernels.linear_ppo import linear_token_logprobs_scoring
            fn = (lambda: linear_token_logprobs_scoring(hidden, weight, targets, T)[0])
        else:
            linear_token_logprobs = import_ours("linear_token_logprobs")
            fn = (lambda: _no_grad(lambda: linear_token_logprobs(hidden, weight, targets, T)[0]))
        run.measure(res, fn, check=lambda out: delta(out[rows], logp64))
    del hidden, weight


# ----------------------------------------------------------------------------- B: the loss alone
def bench_loss(run: Runner, N: int, providers, bw: float, launch_ms: float):
    dev = run.device
    g = seeded(6000 + N, dev)
    logp = (-3 * torch.rand(N, generator=g, device=dev)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(N, generator=g, device=dev)  # clipping and dual clip really happen
    ref = logp.detach() + 0.2 * torch.randn(N, generator=g, device=dev)
    adv = torch.randn(N, generator=g, device=dev)
    mask = torch.rand(N, generator=g, device=dev) < 0.9
    num_tokens = mask.sum()
    one = torch.ones((), device=dev)
    lp64 = logp.detach().double().requires_grad_(True)
    loss64, _ = ppo_loss_torch(lp64, old.double(), ref.double(), adv.double(), mask, num_tokens, **LOSS_KW)
    (dlogp64,) = torch.autograd.grad(loss64, lp64)
    floor = max(38 * N / bw * 1e3, 2 * launch_ms)

    for prov in for_table(providers, "B"):
        res = Result("B", prov, N, floor_ms=floor)
        if prov == "liger":
            run.skip(res, "— (no standalone loss over [N] vectors; its loss is fused into triton_grpo_loss: table A)")
            continue
        if prov == "compile":
            mark_dynamic_rows(logp, old, ref, adv, mask)
        impl = {"eager": ppo_loss_torch, "compile": compiled(ppo_loss_torch) if prov == "compile" else None,
                "ours": ppo_loss}[prov]

        def fn(impl=impl):
            logp.grad = None
            loss, _ = impl(logp, old, ref, adv, mask, num_tokens, **LOSS_KW)
            loss.backward(one)
            return logp.grad
        run.measure(res, fn, check=lambda out: delta(out, dlogp64), launches=True)


# ----------------------------------------------------------------------------- report
def environment(run: Runner, liger: Liger) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "torch": torch.__version__, "python": platform.python_version(),
           "liger_kernel": liger.version or (liger.error or "absent"), "kernel_backend": backend.get_backend()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    if run.cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   gpu_memory_gib=round(p.total_memory / GiB, 1), sms=p.multi_processor_count)
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()})",
                   triton_interpret=backend.interpreter_on())
    return env


def fmt(x, spec) -> str:
    return "—" if x is None else format(x, spec)


def markdown(env: dict, floors: dict, results: list[Result], plan: Plan) -> str:
    lines = ["# memrl kernel benchmark", "",
             " · ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Floors (same run): HBM copy {floors['copy_TBps']:.2f} TB/s "
             f"(read+write of a {floors['copy_MiB']} MiB copy); "
             f"one tiny kernel {floors['tiny_launch_ms'] * 1e3:.1f} µs; V = {plan.vocab:,}, "
             f"N = sequences × {plan.seq_len:,} tokens."]
    for (N, H), ms in sorted(floors["gemm_ms"].items()):
        lines.append(f"- cuBLAS lm_head GEMM N={N:,} H={H:,} V={plan.vocab:,}: {ms:.3f} ms "
                     f"({2 * N * H * plan.vocab / ms / 1e9:.0f} TFLOP/s)")
    for key, title in TABLES.items():
        rows = [r for r in results if r.table == key]
        if not rows:
            continue
        linear, loss = key.startswith("A'"), key == "B"
        head = ["N"] + (["H"] if linear else []) + ([] if loss else ["T"]) + \
               ["provider", "median ms", "% of floor", "floor ms", "peak extra GiB", "max abs Δ", "rel Δ"] + \
               (["launches"] if loss else []) + ["note"]
        lines += ["", f"## {title}", "", FLOOR_NOTE[key], "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        order = {p: i for i, p in enumerate(PROVIDERS)}
        for r in sorted(rows, key=lambda r: (r.H or 0, -(r.T or 0), r.N, order.get(r.provider, 9))):
            cells = [f"{r.N:,}"] + ([f"{r.H:,}"] if linear else []) + ([] if loss else [f"{r.T:g}"]) + \
                    [LABEL.get(r.provider, r.provider), fmt(r.ms, ".3f"), fmt(r.pct_floor, ".1f"),
                     fmt(r.floor_ms, ".3f"), fmt(r.extra_gib, ".2f"), fmt(r.max_abs, ".1e"), fmt(r.rel, ".1e")] + \
                    ([fmt(r.launches, "d")] if loss else []) + [r.note]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    ap.add_argument("--providers", default=None, help=f"comma list from {','.join(PROVIDERS)} "
                                                      "(default: all; on CPU without compile)")
    ap.add_argument("--tables", default="A,A',B", help="comma list from A, A', B")
    args = ap.parse_args(argv)

    if args.device == "cpu" and not args.quick:
        ap.error("--device cpu needs --quick (the full shapes need a GPU)")
    plan = (QUICK if args.quick else FULL) if args.device == "cuda" else CPU_QUICK
    providers = tuple(args.providers.split(",")) if args.providers else \
        (PROVIDERS if args.device == "cuda" else ("eager", "liger", "ours", "ours_unfused", "ours_scoring"))
    assert all(p in PROVIDERS for p in providers), providers
    tables = set(args.tables.split(","))
    if args.device == "cuda":
        backend.set_backend("triton")  # "ours" must be the kernels, whatever MEMRL_KERNELS says
    run = Runner(args.device, args.budget_s)
    liger = Liger(args.device)
    env = environment(run, liger)
    print(" · ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    bw, launch_ms = copy_bandwidth(run), tiny_launch_ms(run)
    floors = {"copy_TBps": bw / 1e12, "copy_MiB": COPY_BYTES[run.device] // 2**20, "tiny_launch_ms": launch_ms,
              "gemm_ms": {}}
    print(f"HBM copy bandwidth {bw / 1e12:.3f} TB/s; one tiny kernel {launch_ms * 1e3:.1f} µs", flush=True)

    slow: dict = {}  # (table, N, H, provider) -> note: temperature-independent and too slow to repeat at T != 1

    def note_slow(T):
        for r in run.results:
            if r.T == T and r.ms is not None and r.ms > 500:
                slow[(r.table, r.N, r.H, r.provider)] = \
                    f"skipped at T≠{T:g}: cost is temperature-independent ({r.ms:.0f} ms at T={T:g})"

    if "B" in tables:
        print("B: fused PPO loss", flush=True)
        for N in plan.loss_ns:
            bench_loss(run, N, providers, bw, launch_ms)
    for i, T in enumerate(plan.temps):
        if "A" in tables:
            print(f"A: logp from logits, T={T:g}", flush=True)
            for N in plan.ns:
                bench_logprob(run, plan, N, T, providers, liger, bw, slow)
        if "A'" in tables:
            print(f"A': fused lm_head + logp, T={T:g}", flush=True)
            for H in plan.hiddens:
                for N in plan.ns:
                    bench_linear(run, plan, N, H, T, providers, liger, slow, floors["gemm_ms"])
        if i == 0:
            note_slow(T)

    md = markdown(env, floors, run.results, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(md)
    payload = {"env": env, "plan": asdict(plan),
               "floors": {**floors, "gemm_ms": {f"N={n},H={h}": v for (n, h), v in floors["gemm_ms"].items()}},
               "results": [{**asdict(r), "pct_floor": r.pct_floor} for r in run.results]}
    (out / "bench.json").write_text(json.dumps(payload, indent=1))
    print("\n" + md)
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'} in {run.elapsed():.0f} s")


if __name__ == "__main__":
    main()
