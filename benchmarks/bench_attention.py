"""Packed-row attention benchmark (issue 11): forward + backward of ONE layer's attention over 16,384-token
micro-batches of real turn lengths, every candidate in the same run.

    python -m benchmarks.bench_attention --out $OUT/bench_attention.json        # one H200: < 3 min
    python -m benchmarks.bench_attention --device cpu --quick --out bench_out/attn.json   # CPU smoke
    options: --candidates ours,flash,padded,loop,sorted,flex   --budget-s 170 (what would not fit is skipped)
On CPU "ours" is the kernel's PyTorch reference unless TRITON_INTERPRET=1 (then Triton's slow interpreter); flash
and flex fail there (no CPU flash kernel, no CPU flex backward) and are reported as failed: the smoke checks the
plumbing, not speed.

Candidates (memrl/attention.py backends, called as the model calls them; bf16 q [1, Hq, T, D], k/v [1, Hkv, T, D]):
    ours     kernels/varlen_attn.py (model.attention="triton"): 1 launch forward, 2 backward
    flash    torch's FlashAttention-2 varlen (aten._flash_attention_forward/_backward, cu_seqlens)
    flex     torch.compile'd flex_attention with a document-causal BlockMask (built once per micro-batch)
    padded   today's layout: right-padded [S, L] and one SDPA call if S*L <= 2T, else one call per sequence
    loop     one causal SDPA call per sequence, always (what real-length rollouts ran before this issue)
    sorted   the same records packed by memrl.algo.pack_turns(by_length=True), then "padded" on each micro-batch:
             near-uniform lengths, so nearly always one padded call
Every candidate sees the same pool of records, packed by pack_turns into 16,384-token micro-batches (record order,
or by length for "sorted"); the time is fwd + bwd summed over all the pool's micro-batches, reported per 16,384
tokens. The layout (cu_seqlens, tile map, block mask, gather indices) is built once per micro-batch, outside the
timed region, and timed apart ("layout ms": the model pays it once per micro-batch, not per layer).

Record lengths ("real" case; a record = prompt + response - 1 rows, as pack_turns packs it), drawn i.i.d.:
    prompt    uniform 100..700 tokens (template + question + memory + shard, or + memory at the final turn)
    response  memory turn (80% of records, ~4 memory turns per final answer): lognormal, median 32, sigma 1.1,
              cut at 256 -> mean ~55, ~3% cut at 256 (what the real Qwen2.5-0.5B produced, issue 11)
              final answer (20%): lognormal, median 117, sigma 0.7, cut at 512 -> mean ~150, ~2% at 512
"uniform" case: every record 512 rows (32 per micro-batch), the forced-full-length benchmarks' regime.
Shapes: Qwen2.5-1.5B attention (12 q heads, 2 kv heads, head dim 128) and Qwen2.5-0.5B (14 / 2 / 64); bf16.

Printed: hardware and versions; the bf16 matmul peak measured here (8192^3 GEMM); per case and candidate: ms per
16k tokens, the floor (causal attention FLOPs / that peak, ms per 16k tokens) and the % of the peak reached, kernel launches per layer
(torch.profiler, one micro-batch fwd + bwd), layout ms, and the output's error vs float64 (one micro-batch).
    FLOPs: forward = 2 matmuls (QK^T, PV) x 2 x Hq x D x sum_s L_s (L_s + 1) / 2 (causal pairs); backward = 2.5x
    forward (5 matmuls: QK^T recomputed, dV, dP, dQ, dK), so fwd + bwd = 3.5x forward. Floor = FLOPs / peak.
A failing candidate (error, OOM, unsupported) is reported with its error and the others still run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memrl import attention as A
from memrl.algo import TurnRecord, pack_turns

CANDIDATES = ("ours", "flash", "padded", "loop", "sorted", "flex")  # flex last: its compile is the slowest
BACKEND = {"ours": "triton", "flash": "flash", "flex": "flex", "padded": "padded", "loop": "padded",
           "sorted": "padded"}
SHAPES = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-0.5b": (14, 2, 64)}  # Hq, Hkv, head_dim
MICRO_BATCH = 16384
POOL_MICRO_BATCHES = 4  # records for ~4 micro-batches: enough that sorting has something to regroup
# seconds a candidate may need (its first call compiles): it starts only if that still fits in --budget-s
RESERVE_S = {"flex": 60.0}
DEFAULT_RESERVE_S = 15.0


# ----------------------------------------------------------------------------------------------------------
# record lengths


def draw_record(rng: random.Random) -> tuple[str, int, int]:
    """(kind, prompt tokens, response tokens) of one turn record from the distribution in the module docstring."""
    prompt = rng.randint(100, 700)
    if rng.random() < 0.8:
        return "memory", prompt, min(256, max(1, round(rng.lognormvariate(math.log(32), 1.1))))
    return "final", prompt, min(512, max(1, round(rng.lognormvariate(math.log(117), 0.7))))


def record_pool(rng: random.Random, tokens: int, uniform: bool = False) -> list[tuple[int, int]]:
    """Records totalling about `tokens` packed rows; uniform: every record 512 rows (prompt 400 + response 113)."""
    pool, total = [], 0
    while total < tokens:
        rec = (400, 113) if uniform else draw_record(rng)[1:]
        pool.append(rec)
        total += rec[0] + rec[1] - 1
    return pool


def realistic_micro_batch(rng: random.Random, budget: int = MICRO_BATCH) -> list[int]:
    """Sequence lengths of one real-length micro-batch: pack_turns' first micro-batch over a fresh pool."""
    return micro_batches(record_pool(rng, 2 * budget), budget)[0]


def micro_batches(pool: list[tuple[int, int]], budget: int, by_length: bool = False) -> list[list[int]]:
    """memrl.algo.pack_turns over the pool (dummy token ids): each micro-batch's sequence lengths."""
    records = [TurnRecord([0] * p, [0] * r, [0.0] * r, trajectory_id=0, group_id=0, turn_index=0, kind="final")
               for p, r in pool]
    return [b.seq_lengths for b in pack_turns(records, torch.zeros(1), budget, by_length=by_length)]


def attention_flops(lengths: list[int], hq: int, d: int) -> float:
    """fwd + bwd FLOPs of causal attention over these sequences (module docstring)."""
    forward = 2 * 2 * hq * d * sum(n * (n + 1) / 2 for n in lengths)
    return 3.5 * forward


# ----------------------------------------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device) -> float:
    """Measured bf16 (GPU) / fp32 (CPU) square GEMM FLOP/s: 8192^3 on a GPU, 1024^3 on a CPU."""
    m, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, reps=20, warmup=3)
    return 2 * m ** 3 / s


def layout_for(name: str, lengths: list[int], device, dtype, d: int) -> A.PackedLayout:
    layout = A.packed_layout(lengths, device, BACKEND[name], dtype, d)
    if name == "loop":  # the padded backend's per-sequence branch, forced
        layout.gather = layout.scatter = None
    return layout


class Case:
    """One micro-batch's inputs (q, k, v, dout) and, per candidate, its layout."""

    def __init__(self, lengths, hq, hkv, d, device, dtype, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        T = sum(lengths)
        self.lengths = lengths
        self.q, self.k, self.v, self.dout = (torch.randn(1, h, T, d, generator=g, device=device).to(dtype)
                                             for h in (hq, hkv, hkv, hq))
        self.leaves = [x.clone().requires_grad_() for x in (self.q, self.k, self.v)]

    def fwd_bwd(self, layout):
        for x in self.leaves:
            x.grad = None
        out = A.packed_attention(*self.leaves, layout)
        out.backward(self.dout)
        return out


def kernel_launches(case: Case, layout, device) -> int | None:
    """CUDA kernels launched by one fwd + bwd (the layout is built before)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        case.fwd_bwd(layout)
        sync(device)
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def error_vs_float64(case: Case, layout) -> float:
    """Relative error (norm) of the candidate's output against per-sequence float64 attention."""
    with torch.no_grad():
        out = A.packed_attention(case.q, case.k, case.v, layout).double()
        ref = A.packed_attention(case.q.double(), case.k.double(), case.v.double(),
                                 A.packed_layout(case.lengths, case.q.device, "padded", torch.float64))
    return ((out - ref).norm() / ref.norm()).item()


def run_candidate(name, batches, shape, device, dtype, reps, seed, budget: int = MICRO_BATCH) -> dict:
    hq, hkv, d = shape
    cases = [Case(lengths, hq, hkv, d, device, dtype, seed + i) for i, lengths in enumerate(batches)]
    layouts = [layout_for(name, c.lengths, device, dtype, d) for c in cases]
    for c, layout in zip(cases, layouts):  # warm-up: compilation (Triton, flex), cuBLAS/cuDNN plans
        c.fwd_bwd(layout)
    total = sum(timed(lambda c=c, lay=layout: c.fwd_bwd(lay), device, reps=reps, warmup=0)
                for c, layout in zip(cases, layouts))
    layout_s = timed(lambda: layout_for(name, cases[0].lengths, device, dtype, d), device, reps=reps)
    tokens = sum(sum(c.lengths) for c in cases)
    flops = sum(attention_flops(c.lengths, hq, d) for c in cases)
    return {"ms_per_16k": 1e3 * total * budget / tokens, "tflops": flops / total / 1e12, "flops": flops,
            "seconds": total, "tokens": tokens, "micro_batches": len(cases),
            "sequences": sum(len(c.lengths) for c in cases), "launches": kernel_launches(cases[0], layouts[0], device),
            "layout_ms": 1e3 * layout_s, "rel_err_vs_fp64": error_vs_float64(cases[0], layouts[0])}


# ----------------------------------------------------------------------------------------------------------
# main


def hardware(device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device.type}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/bench_attention.json", help="JSON results file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="skip a candidate that would not end within this many seconds (see RESERVE_S)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 512-token micro-batches, tiny heads, 1 rep")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {CANDIDATES}")
    budget, shapes, reps, dtype = MICRO_BATCH, SHAPES, 5, torch.bfloat16
    if args.quick:
        budget, shapes, reps = 2048, {"tiny": (4, 2, 64)}, 1
    if device.type != "cuda":
        dtype = torch.float32  # CPU SDPA / the interpreter: fp32

    info = hardware(device)
    peak = matmul_peak(device)
    info["matmul_peak_tflops"] = peak / 1e12
    print(f"# packed attention fwd+bwd, {info.get('gpu', info.get('cpu'))}, torch {info['torch']}, triton "
          f"{info['triton']}, {info['date']}; measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s; micro-batches of {budget} tokens, {str(dtype).removeprefix('torch.')}",
          flush=True)
    rng = random.Random(args.seed)
    pools = {"real": record_pool(rng, POOL_MICRO_BATCHES * budget),
             "uniform": record_pool(rng, POOL_MICRO_BATCHES * budget, uniform=True)}
    results = {"hardware": info, "micro_batch_tokens": budget, "rows": []}
    lines = []
    for shape_name, shape in shapes.items():
        for case_name, pool in pools.items():
            plain, by_length = micro_batches(pool, budget), micro_batches(pool, budget, by_length=True)
            lens = [n for b in plain for n in b]
            print(f"\n## {shape_name} (Hq {shape[0]}, Hkv {shape[1]}, D {shape[2]}), {case_name} lengths: "
                  f"{len(lens)} records, {len(plain)} micro-batches ({len(by_length)} sorted), lengths "
                  f"{min(lens)}..{max(lens)}, mean {statistics.mean(lens):.0f}, sequences per micro-batch "
                  f"{len(lens) / len(plain):.0f}", flush=True)
            for name in names:
                row = {"shape": shape_name, "case": case_name, "candidate": name}
                if time.perf_counter() - t0 + RESERVE_S.get(name, DEFAULT_RESERVE_S) > args.budget_s:
                    row["error"] = "skipped (time budget)"
                else:
                    try:
                        row.update(run_candidate(name, by_length if name == "sorted" else plain, shape, device,
                                                 dtype, reps, args.seed, budget))
                        row["pct_of_peak"] = 100 * row["tflops"] * 1e12 / peak
                        row["floor_ms_per_16k"] = 1e3 * row["flops"] / peak * budget / row["tokens"]
                    except Exception as e:  # noqa: BLE001 - report the candidate, keep the others
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                results["rows"].append(row)
                lines.append(_table_line(row))
                print(lines[-1], flush=True)
    table = "\n".join([_TABLE_HEAD, _TABLE_RULE] + lines)
    results["table_md"] = table
    print("\n" + table)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return results


_TABLE_HEAD = ("| shape | lengths | candidate | ms / 16k tok | floor ms | TFLOP/s | % of matmul peak | "
               "launches / layer (fwd+bwd) | layout ms | rel err vs fp64 |")
_TABLE_RULE = "|---|---|---|---|---|---|---|---|---|---|"


def _table_line(row: dict) -> str:
    head = f"| {row['shape']} | {row['case']} | {row['candidate']} |"
    if "error" in row:
        return head + f" {row['error']} | | | | | | |"
    launches = "n/a" if row["launches"] is None else str(row["launches"])
    return head + (f" {row['ms_per_16k']:.2f} | {row['floor_ms_per_16k']:.2f} | {row['tflops']:.3g} | "
                   f"{row['pct_of_peak']:.0f}% | {launches} | {row['layout_ms']:.2f} | {row['rel_err_vs_fp64']:.1e} |")


if __name__ == "__main__":
    main()
