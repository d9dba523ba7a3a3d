"""Generator benchmark: memrl's Generator vs transformers' generate, Qwen2.5-1.5B shapes, random weights.

    python -m benchmarks.bench_generate                  # H100: 64x512/256, 256x512/256, 512x1024/256 (~6 min)
    python -m benchmarks.bench_generate --quick          # one small shape
    python -m benchmarks.bench_generate --attention      # only the decode-attention micro-benchmark (~1 min)
    python -m benchmarks.bench_generate --cpu            # CPU smoke run with a tiny config (automatic without CUDA)
    options: --out DIR (default $OUT, else bench_out/), --no-compile, --no-hf, --no-hf-static, --no-breakdown,
             --budget-s S (skip transformers runs that would end past S seconds; default 340), --rows 256,512 (only
             the shapes with these row counts), --no-attention (skip the attention micro-benchmark),
             --compile-prefill (compile the prefill too; train.py keeps it eager)
             --compile-layers (compile the decode step per layer, train.py's default rollout.compile=layers)

Every number comes from this run, on this machine:
  - the two ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 GEMM;
  - ours: new tokens/s over the whole call (prefill included; second, warm call), decode ms per step against the
    roofline (weight bytes + KV bytes read per step) / copy bandwidth, prefill tokens/s and TFLOP/s (% of the
    GEMM ceiling) from a separate max_new_tokens=1 call;
  - transformers' generate on the same weights (shared, not copied) and prompts: static cache (which transformers
    compiles) at 64 and 256 rows, dynamic cache at 256 rows (at 64 rows static won by 2.5x: dynamic is skipped to
    save its ~35 s), while the time budget allows; warm second call;
  - decode attention alone (rows 64/256/512 x context 640/1,280, and 16 x 4,096 where plan_split splits): our
    kernel inside a CUDA graph (as the generator runs it) vs torch's SDPA on the same padded cache and vs the floor
    (valid K+V read once at the copy bandwidth), plus tile / split variants of our kernel;
  - per shape, after that shape's throughput numbers, one decode step at mid-call broken down by kernel category
    (attention, GEMMs, sampling, inductor's fused pointwise, other) with torch.profiler, and the graph step time:
    the difference is idle time in the graph. It reuses the measured generator (same cache, same graphs).
Our generator runs with compile_fallback=False: a torch.compile failure fails the shape loudly instead of timing
an eager fallback. Results are written after every section, so a timeout keeps what was measured.
Random weights never emit EOS: our calls pass no stop ids; transformers gets eos_token_id=None. Both sample at
temperature 1 with no top-k/top-p, so both run full length.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memrl.generate import Generator, SamplingParams
from memrl.hf_io import to_hf_state_dict
from memrl.model import ModelConfig, Transformer, random_init_

QWEN25_1P5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
QWEN25_TOKENIZER_VOCAB = 151665  # ids above are embedding padding: masked, as in a real run
TINY = dict(
    model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    hidden_act="silu",
)
SHAPES = [(64, 512, 256), (256, 512, 256), (512, 1024, 256)]  # rows, prompt tokens, new tokens
HF_SHAPES = {(64, 512, 256), (256, 512, 256)}  # where the issue sets the 3x target
HF_DYNAMIC_SHAPES = {(256, 512, 256)}  # at 64 rows the static cache won 5,069 vs 2,058 tok/s (H100, 2026-11-21)
# seconds a transformers run takes (both calls; H100, 2026-11-21 run): skipped if it would end past --budget-s
HF_COST_S = {("dynamic", 64): 30, ("dynamic", 256): 32, ("static", 64): 42, ("static", 256): 78}
PREFILL_SHAPE = (64, 1024)  # where the issue sets the 60%-of-GEMM target


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(device, dtype) -> dict:
    n = (1 << 30) if device.type == "cuda" else (1 << 24)  # 2 GiB of bf16 on GPU (far past L2)
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, reps=20)
    elem = src.element_size()
    del src, dst
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    gemm_s = timed(lambda: a @ b, device, reps=20)
    return {"copy_GBps": 2 * elem * n / copy_s / 1e9, "gemm_TFLOPs": 2 * m ** 3 / gemm_s / 1e12,
            "gemm_size": m, "dtype": str(dtype).removeprefix("torch.")}


def build_model(cfg_dict: dict, device, dtype) -> Transformer:
    """Random weights made on the device: N(0, 0.02) matrices and biases, unit norms."""
    cfg = ModelConfig.from_hf_dict(cfg_dict, source="bench config")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    random_init_(model, seed=0)
    model.reset_rope(device)
    return model.eval()


def hf_twin(model: Transformer, cfg_dict: dict, device, dtype):
    """transformers' Qwen2ForCausalLM sharing our weight tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
    with torch.device(device):
        try:
            hf = Qwen2ForCausalLM._from_config(hf_cfg, dtype=dtype)
        except TypeError:  # older transformers
            hf = Qwen2ForCausalLM._from_config(hf_cfg, torch_dtype=dtype)
    # HF names; the split q/k/v and gate/up are views of our fused weights (no copy)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False,
                                             assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


# rows x mean context of a decode step; 16 x 4096: a thin tail of long rows, the one shape where plan_split splits
ATTN_SHAPES = [(rows, ctx) for rows in (64, 256, 512) for ctx in (640, 1280)] + [(16, 4096)]
# (label, kwargs) variants of our kernel timed beside the default; the default is what the generator runs
ATTN_VARIANTS = [("no append", dict(append=False))] + [
    (f"block {bn} warps {w} stages {st}", dict(block_n=bn, num_warps=w, num_stages=st))
    for bn, w, st in [(128, 4, 2), (64, 8, 3), (128, 8, 3)]] + [
    (f"{n} splits", dict(num_splits=n)) for n in (1, 2, 4, 8)]


def graph_time(calls, device, reps: int = 10) -> tuple[float, bool]:
    """Seconds per call of a list of calls, replayed as ONE CUDA graph (as the generator runs them: no launch
    overhead); (seconds, True). Eager back-to-back launches if capture fails: (seconds, False)."""
    for c in calls:  # compile / autotune outside the capture
        c()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run, graphed = graph.replay, True
    except Exception as e:  # noqa: BLE001 - report eager timings instead
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; eager timing)", flush=True)
        torch.cuda.synchronize(device)

        def run():
            for c in calls:
                c()
        graphed = False
    return timed(run, device, reps=reps) / len(calls), graphed


def bench_decode_attention(cfg: ModelConfig, device, ceil: dict) -> list[dict]:
    """One layer's decode attention at Qwen2.5-1.5B heads, rows x mean context, timed inside a CUDA graph of one
    call per layer (28 caches, so L2 never serves the reads), vs SDPA on the same padded cache (the peer) and the
    floor: one read of each row's valid K and V at the measured copy bandwidth."""
    import torch.nn.functional as F

    from kernels.decode_attention import decode_attention_triton, plan_split

    out = []
    Hq, Hkv, D, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    for rows, ctx in ATTN_SHAPES:
        g = torch.Generator(device=device).manual_seed(rows + ctx)
        T = -(-(ctx * 6 // 5) // 128) * 128  # slot length: the generator's slots are longer than the mean context
        layer_bytes = 2 * rows * Hkv * T * D * 2
        n = max(1, min(layers, -(-(1 << 30) // layer_bytes)))  # >= 1 GiB of caches in rotation (L2 is 50 MB)
        k = torch.randn(n, rows, Hkv, T, D, device=device, generator=g, dtype=torch.bfloat16)
        v = torch.randn(n, rows, Hkv, T, D, device=device, generator=g, dtype=torch.bfloat16)
        q = torch.randn(rows, Hq, D, device=device, generator=g, dtype=torch.bfloat16)
        k_new = torch.randn(rows, Hkv, D, device=device, generator=g, dtype=torch.bfloat16)
        v_new = torch.randn_like(k_new)
        lengths = torch.randint(ctx - 64, ctx + 65, (rows,), device=device, generator=g)  # ragged rows
        floor_us = 1e6 * int(lengths.sum()) * Hkv * D * 2 * 2 / (ceil["copy_GBps"] * 1e9)
        split = plan_split(rows, Hkv, T, device)
        row = dict(rows=rows, context=ctx, slot_len=T, split_size=split, programs=rows * Hkv * -(-T // split),
                   floor_us=floor_us, variants={})

        def ours(append=True, **kw):
            extra = dict(k_new=k_new, v_new=v_new) if append else {}
            return [lambda i=i: decode_attention_triton(q, k[i % n], v[i % n], lengths, D ** -0.5, **extra, **kw)
                    for i in range(layers)]

        sec, graphed = graph_time(ours(), device)
        row.update(us=1e6 * sec, pct_floor=100 * floor_us / (1e6 * sec), graphed=graphed)
        for label, kw in ATTN_VARIANTS:
            try:
                row["variants"][label] = 1e6 * graph_time(ours(**kw), device)[0]
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a tile config
                print(f"  variant {label} failed: {type(e).__name__}: {e}", flush=True)
        mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (rows, T)
        mask = mask[:, None, None, :]
        q4 = q[:, :, None]

        def sdpa(i):
            return F.scaled_dot_product_attention(q4, k[i], v[i], attn_mask=mask, enable_gqa=True)

        try:
            row["sdpa_us"] = 1e6 * graph_time([lambda i=i: sdpa(i % n) for i in range(layers)], device)[0]
        except Exception as e:  # noqa: BLE001
            row["sdpa_us"] = None
            print(f"  SDPA failed: {type(e).__name__}: {e}", flush=True)
        best = min(row["variants"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
        sd = f"{row['sdpa_us']:.0f}" if row["sdpa_us"] else "-"
        print(f"decode attention {rows} rows x {ctx} ctx (slot {T}): ours {row['us']:.1f} us = "
              f"{row['pct_floor']:.0f}% of floor {floor_us:.1f} us [{split} keys/program, {row['programs']} programs"
              f"{'' if graphed else ', EAGER'}] | SDPA {sd} us | best variant: {best[0]} {best[1]:.1f} us",
              flush=True)
        print("    " + " | ".join(f"{lab} {t:.1f}" for lab, t in row["variants"].items()), flush=True)
        out.append(row)
        del k, v
        torch.cuda.empty_cache()
    return out


def _kernel_category(name: str) -> str:
    low = name.lower()
    if "decode_attn" in low:
        return "attention"
    if "sample_kernel" in low:
        return "sampling"
    if any(t in low for t in ("gemm", "nvjet", "cutlass", "xmma", "splitk", "gemv", "cublas")):
        return "gemm"
    if low.startswith("triton_"):
        return "inductor (norms, rope, swiglu, residual)"
    return "other"


def step_breakdown(gen: Generator, prompts, new: int, out_dir: Path, steps: int = 6) -> dict:
    """Where one decode step's time goes, at the middle of a call (context = prompt + new/2): the step's CUDA graph
    timed with events, and its kernels (torch.profiler, per kernel name, summed per category)."""
    from collections import deque

    from memrl.model_runner import _bucket

    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    try:
        _, _, live = gen._start(prompts, params)
        gen._admit(deque(live))
        gen._compact()
        for _ in range(new // 2):
            gen._decode_step()
        dev = gen.device
        torch.cuda.synchronize(dev)
        Bb = _bucket(gen.B, gen.cache.slots)
        graph, _ = gen.runner.graph(Bb, True)
        step_ms = 1e3 * timed(graph.replay, dev, reps=steps, warmup=1)
        res = {"rows": gen.B, "bucket": Bb, "graph_step_ms": step_ms}
        kernels = None
        for how, fn in (("graph replay", graph.replay), ("eager step", lambda: gen.runner.step_body(Bb, True))):
            try:
                from torch.profiler import ProfilerActivity, profile

                fn()
                torch.cuda.synchronize(dev)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        fn()
                    torch.cuda.synchronize(dev)
                out_dir.mkdir(parents=True, exist_ok=True)
                trace = out_dir / f"trace_{gen.B}rows.json"
                prof.export_chrome_trace(str(trace))
                events = json.loads(trace.read_text()).get("traceEvents", [])
                trace.unlink()
                kernels = [e for e in events if str(e.get("cat", "")).lower() == "kernel" and "dur" in e]
                res["profiled"] = how
                if len(kernels) >= 20 * steps:  # graph kernels may not be traced: then profile the eager step
                    break
            except Exception as e:  # noqa: BLE001 - the step time above still stands
                print(f"  profiler ({how}) failed: {type(e).__name__}: {e}", flush=True)
                kernels = None
    finally:  # leave no live rows behind, whatever failed
        if gen.runner.state is not None:
            gen.runner.reset(0, gen.cache.slots)
        gen.B = 0
    if not kernels:
        return res
    per_name: dict = {}
    for e in kernels:
        t = per_name.setdefault(e["name"], [0.0, 0])
        t[0] += e["dur"] / steps / 1e3  # ms per step
        t[1] += 1 / steps
    cats: dict = {}
    for name, (ms, _) in per_name.items():
        c = _kernel_category(name)
        cats[c] = cats.get(c, 0.0) + ms
    res["kernel_ms"] = sum(cats.values())
    res["categories_ms"] = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
    res["kernels_per_step"] = round(sum(c for _, c in per_name.values()))
    res["top_kernels"] = [(name[:90], round(ms, 4), round(cnt, 1)) for name, (ms, cnt) in
                          sorted(per_name.items(), key=lambda kv: -kv[1][0])[:15]]
    return res


def print_breakdown(b: dict) -> None:
    line = f"step breakdown {b['rows']} rows (bucket {b['bucket']}): graph step {b['graph_step_ms']:.2f} ms"
    if "kernel_ms" in b:
        line += (f" | kernels {b['kernel_ms']:.2f} ms ({b['kernels_per_step']} per step, {b['profiled']}), gaps "
                 f"{b['graph_step_ms'] - b['kernel_ms']:.2f} ms | " +
                 " | ".join(f"{c} {ms:.2f}" for c, ms in b["categories_ms"].items()))
    print(line, flush=True)
    for name, ms, cnt in b.get("top_kernels", []):
        print(f"    {ms * 1e3:8.1f} us  x{cnt:<5} {name}", flush=True)


def run_ours(gen: Generator, prompts, new: int) -> dict:
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    gen.generate(prompts, params)  # warm: CUDA graphs captured, kernels compiled
    compile_s = gen.last_stats.get("compile_s", 0.0)
    out = gen.generate(prompts, params)
    s = gen.last_stats
    assert all(len(c.token_ids) == new for c in out)
    decode_s = s["total_s"] - s["prefill_s"] - s["capture_s"] - s["compile_s"]
    return {"total_s": s["total_s"], "new_tok_per_s": len(prompts) * new / s["total_s"],
            "prefill_s": s["prefill_s"], "decode_s": decode_s,
            "decode_ms_per_step": 1e3 * decode_s / max(1, s["decode_steps"]), "capture_s_warm_call": s["capture_s"],
            "compile_s_first_call": compile_s}


def run_prefill(gen: Generator, prompts) -> dict:
    params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0)
    gen.generate(prompts, params)
    gen.generate(prompts, params)
    return {"prefill_s": gen.last_stats["prefill_s"], "tokens": gen.last_stats["prefill_tokens"]}


def run_hf(hf, prompts, new: int, static: bool) -> dict:
    ids = torch.tensor(prompts, device=hf.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              max_new_tokens=new, min_new_tokens=new)
    if static:
        kw["cache_implementation"] = "static"
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, **kw)
    sync(hf.device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, **kw)
    sync(hf.device)
    total = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new
    return {"total_s": total, "new_tok_per_s": len(prompts) * new / total, "first_call_s": first}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-hf-static", action="store_true")
    ap.add_argument("--attention", action="store_true", help="only the decode-attention micro-benchmark")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-step profiler breakdown")
    ap.add_argument("--budget-s", type=float, default=340.0, help="skip transformers runs that would end later")
    ap.add_argument("--rows", default="", help="comma-separated row counts: only those shapes (e.g. 256,512)")
    ap.add_argument("--no-attention", action="store_true", help="skip the decode-attention micro-benchmark")
    ap.add_argument("--compile-prefill", action="store_true", help="compile the prefill too (default: eager)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="compile the decode step per layer (rollout.compile=layers) instead of whole")
    args = ap.parse_args()
    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cfg_dict = QWEN25_1P5B if on_gpu else TINY
    vocab = QWEN25_TOKENIZER_VOCAB if on_gpu else cfg_dict["vocab_size"]
    shapes = SHAPES if on_gpu and not args.quick else [(64, 128, 64)] if on_gpu else [(8, 32, 16)]
    if args.rows:
        shapes = [sh for sh in shapes if str(sh[0]) in args.rows.split(",")] or shapes
    prefill_shape = PREFILL_SHAPE if on_gpu and not args.quick else shapes[0][:2]

    import transformers
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "compile": not args.no_compile and on_gpu, "compile_prefill": args.compile_prefill,
        "compile_layers": args.compile_layers,
    }
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    ceil = ceilings(device, dtype)
    print(f"copy {ceil['copy_GBps']:.0f} GB/s | {ceil['dtype']} GEMM {ceil['gemm_size']}^3 "
          f"{ceil['gemm_TFLOPs']:.3g} TFLOP/s",
          flush=True)

    model = build_model(cfg_dict, device, dtype)
    cfg = model.config
    results = {"env": env, "ceilings": ceil, "params": 0, "ours": [], "prefill": None, "hf": [], "attention": []}
    out_dir = Path(args.out)
    if on_gpu and not args.quick and not args.no_attention:  # one layer's decode attention (28 of these per step)
        results["attention"] = bench_decode_attention(cfg, device, ceil)
        write(results, out_dir, t_start, echo=args.attention)
        if args.attention:
            return
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the lm_head read once
    embed = cfg.vocab_size * cfg.hidden_size
    # compile_fallback=False: a compiler failure must fail the shape, not time an eager fallback as "ours"
    gen = Generator(model, vocab_size=vocab, kv_memory_fraction=0.85, compile=env["compile"], compile_fallback=False,
                    compile_prefill=args.compile_prefill, compile_layers=args.compile_layers)
    kv_bpt = gen.cache.bytes_per_token
    g = torch.Generator().manual_seed(0)

    def prompts_for(rows, plen):
        return torch.randint(0, vocab, (rows, plen), generator=g).tolist()

    results["params"] = params
    for rows, plen, new in shapes:
        prompts = prompts_for(rows, plen)
        try:
            r = run_ours(gen, prompts, new)
        except Exception as e:  # noqa: BLE001 - loud, and the other sections still run
            fail(results, f"ours {rows}x{plen}/{new}", e)
            continue
        kv_bytes = rows * (plen + new / 2) * kv_bpt  # mean context over the decode steps
        roof_ms = 1e3 * (weight_bytes + kv_bytes) / (ceil["copy_GBps"] * 1e9)
        r.update(rows=rows, prompt=plen, new=new, roofline_ms=roof_ms,
                 pct_roofline=100 * roof_ms / r["decode_ms_per_step"])
        results["ours"].append(r)
        print(f"ours {rows}x{plen}/{new}: {r['new_tok_per_s']:,.0f} new tok/s | decode {r['decode_ms_per_step']:.2f} "
              f"ms/step, roofline {roof_ms:.2f} ({r['pct_roofline']:.0f}%) | prefill {r['prefill_s']:.2f}s | "
              f"first call "
              f"compiled {r['compile_s_first_call']:.1f}s "
              f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        # after this shape's measurements, on the same generator (its cache and graphs): nothing new to allocate
        if on_gpu and not args.no_breakdown:
            try:
                r["breakdown"] = step_breakdown(gen, prompts, new, out_dir)
                print_breakdown(r["breakdown"])
            except Exception as e:  # noqa: BLE001 - the throughput numbers above still stand
                fail(results, f"step breakdown {rows} rows", e)
        write(results, out_dir, t_start)

    rows, plen = prefill_shape
    try:
        p = run_prefill(gen, prompts_for(rows, plen))
        flops = rows * (2 * (params - embed) * plen  # GEMMs of every layer
                        + 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * plen * plen / 2
                        + 2 * cfg.hidden_size * cfg.vocab_size)  # causal attention; lm_head on the last token only
        p.update(rows=rows, prompt=plen, tok_per_s=p["tokens"] / p["prefill_s"], TFLOPs=flops / p["prefill_s"] / 1e12)
        p["pct_gemm_peak"] = 100 * p["TFLOPs"] / ceil["gemm_TFLOPs"]
        results["prefill"] = p
        print(f"prefill {rows}x{plen}: {p['tok_per_s']:,.0f} tok/s, {p['TFLOPs']:.3g} TFLOP/s "
              f"({p['pct_gemm_peak']:.0f}% of GEMM) [{time.perf_counter() - t_start:.0f}s]", flush=True)
    except Exception as e:  # noqa: BLE001
        fail(results, f"prefill {rows}x{plen}", e)
    gen.release()
    del gen
    if on_gpu:
        torch.cuda.empty_cache()
    write(results, out_dir, t_start)

    if not args.no_hf:
        try:
            run_transformers(results, model, cfg_dict, device, dtype, vocab, shapes, on_gpu, args, g, t_start)
        except Exception as e:  # noqa: BLE001 - our numbers above still get written
            fail(results, "transformers baseline", e)
    write(results, out_dir, t_start, echo=True)


def fail(results: dict, what: str, e: Exception) -> None:
    """A failed section: printed loudly and listed at the top of the report."""
    msg = f"{what} FAILED: {type(e).__name__}: {str(e)[:500]}"
    print(f"!!! {msg}", flush=True)
    results.setdefault("errors", []).append(msg)


def run_transformers(results, model, cfg_dict, device, dtype, vocab, shapes, on_gpu, args, g, t_start):
    """transformers' generate on the same weights and prompt shapes: static cache (compiled by transformers), then
    dynamic, each run only if its expected cost (HF_COST_S) fits in the time budget."""

    def prompts_for(rows, plen):
        return torch.randint(0, vocab, (rows, plen), generator=g).tolist()

    hf = hf_twin(model, cfg_dict, device, dtype)
    probe = torch.randint(0, vocab, (2, 64), generator=g).to(device)
    with torch.no_grad():
        a, b = model(probe).float(), hf(probe).logits.float()
    results["hf_logits_rel_err"] = ((a - b).norm() / b.norm()).item()
    print(f"transformers twin: logits rel. err vs ours {results['hf_logits_rel_err']:.1e}", flush=True)
    full = on_gpu and not args.quick
    for static in (True, False):  # static first: it is the stronger peer
        if static and (args.no_hf_static or not on_gpu):
            continue
        cache = "static" if static else "dynamic"
        for rows, plen, new in shapes:
            if full and (rows, plen, new) not in (HF_SHAPES if static else HF_DYNAMIC_SHAPES):
                continue
            elapsed = time.perf_counter() - t_start
            if full and elapsed + HF_COST_S.get((cache, rows), 60) > args.budget_s:
                print(f"skip transformers {cache} {rows}x{plen}/{new}: would end past the {args.budget_s:.0f}s budget "
                      f"(now {elapsed:.0f}s)", flush=True)
                continue
            try:
                r = run_hf(hf, prompts_for(rows, plen), new, static)
            except Exception as e:  # noqa: BLE001 - report, keep the rest of the benchmark
                fail(results, f"transformers {cache} {rows}x{plen}/{new}", e)
                continue
            r.update(rows=rows, prompt=plen, new=new, cache="static+compile" if static else "dynamic")
            results["hf"].append(r)
            print(f"transformers {r['cache']} {rows}x{plen}/{new}: {r['new_tok_per_s']:,.0f} new tok/s "
                  f"(first call {r['first_call_s']:.0f}s) [{time.perf_counter() - t_start:.0f}s]", flush=True)
            write(results, Path(args.out), t_start, echo=False)
            if on_gpu:
                torch.cuda.empty_cache()


def write(res: dict, out: Path, t_start: float, echo: bool = False) -> None:
    """bench_generate.json + .md with everything measured so far (called after every section); echo prints the md."""
    res["wall_s"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_generate.json").write_text(json.dumps(res, indent=2) + "\n")
    e, c = res["env"], res["ceilings"]
    lines = [
        "# Generator benchmark", "",
        *[f"**{msg}**" for msg in res.get("errors", [])], *([""] if res.get("errors") else []),
        f"{e['device']} | torch {e['torch']} (CUDA {e['cuda']}) | triton {e['triton']} | transformers "
        f"{e['transformers']} | {e['date']} | compile={e['compile']} | compile_prefill={e.get('compile_prefill')} | "
        f"compile_layers={e.get('compile_layers')}", "",
        f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s (read + write), {c['dtype']} GEMM "
        f"{c['gemm_size']}^3 {c['gemm_TFLOPs']:.3g} TFLOP/s. Model: {res['params'] / 1e6:,.1f}M params, random.", "",
        "| rows x prompt/new | ours new tok/s | best transformers | x | decode ms/step | roofline ms | % roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["ours"]:
        hf = [h for h in res["hf"] if (h["rows"], h["prompt"], h["new"]) == (r["rows"], r["prompt"], r["new"])]
        best = max(hf, key=lambda h: h["new_tok_per_s"]) if hf else None
        best_s = f"{best['new_tok_per_s']:,.0f} ({best['cache']})" if best else "-"
        ratio = f"{r['new_tok_per_s'] / best['new_tok_per_s']:.1f}" if best else "-"
        lines.append(f"| {r['rows']} x {r['prompt']}/{r['new']} | {r['new_tok_per_s']:,.0f} | {best_s} | {ratio} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['roofline_ms']:.2f} | {r['pct_roofline']:.0f}% |")
    p = res["prefill"]
    if p:
        lines += ["", f"Prefill {p['rows']} x {p['prompt']}: {p['tok_per_s']:,.0f} tok/s, {p['TFLOPs']:.3g} TFLOP/s "
                      f"= {p['pct_gemm_peak']:.0f}% of the measured GEMM ceiling.", ""]
    bds = [r["breakdown"] for r in res["ours"] if r.get("breakdown", {}).get("kernel_ms")]
    if bds:
        cats = sorted({c for b in bds for c in b["categories_ms"]})
        lines += ["Decode step at mid-call (ms; kernel times from torch.profiler, gaps = graph step - kernels):", "",
                  "| rows | graph step | kernels | gaps | " + " | ".join(cats) + " |",
                  "|---|---|---|---|" + "---|" * len(cats)]
        lines += [f"| {b['rows']} | {b['graph_step_ms']:.2f} | {b['kernel_ms']:.2f} | "
                  f"{b['graph_step_ms'] - b['kernel_ms']:.2f} | "
                  + " | ".join(f"{b['categories_ms'].get(c, 0.0):.2f}" for c in cats) + " |" for b in bds]
        lines += [""]
    if res["hf"]:
        lines += ["| transformers | rows x prompt/new | new tok/s | first call s |", "|---|---|---|---|"]
        lines += [f"| {h['cache']} | {h['rows']} x {h['prompt']}/{h['new']} | {h['new_tok_per_s']:,.0f} | "
                  f"{h['first_call_s']:.1f} |" for h in res["hf"]]
    if res["attention"]:
        labels = [lab for lab, _ in ATTN_VARIANTS]
        lines += ["", "Decode attention alone (one layer, Qwen2.5-1.5B heads, ragged rows around the mean context, "
                  "timed in a CUDA graph; floor = valid K+V read once at the copy bandwidth; SDPA = torch's, padded "
                  "mask, GQA):", "",
                  "| rows x ctx | keys/program | ours us | % floor | floor us | SDPA us | " + " | ".join(labels) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(labels)]
        for a in res["attention"]:
            sd = f"{a['sdpa_us']:.1f}" if a.get("sdpa_us") else "-"
            lines.append(f"| {a['rows']} x {a['context']} | {a['split_size']} | {a['us']:.1f} | {a['pct_floor']:.0f}% | "
                         f"{a['floor_us']:.1f} | {sd} | "
                         + " | ".join(f"{a['variants'][lab]:.1f}" if lab in a["variants"] else "-" for lab in labels)
                         + " |")
    lines += ["", f"Wall time {res['wall_s']:.0f} s."]
    text = "\n".join(lines) + "\n"
    (out / "bench_generate.md").write_text(text)
    if echo:
        print("\n" + text)


if __name__ == "__main__":
    main()
