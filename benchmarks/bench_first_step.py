"""First-step benchmark (issue 11): from "model on the GPU" to "first RL step done", Qwen2.5-1.5B shapes, random
weights, ONE GPU, train.py's own step, each part printed. Target: <= 60 s.

    # the episodes and tokenizer of benchmarks/bench_step.py `prepare` (CPU, ~15 s), then on one GPU, ~3-4 min:
    python -m benchmarks.bench_first_step --prepared .bench --out $OUT
    options: --batch-size 64 (problems per step, paper-1.5b; x G = 4), --steps 2 (the 2nd is the steady-state
             reference), --no-warm (skip the second run on a warm compile cache), --levers (also measure the
             prefill's compile and its eager / compiled speed in this process, ~1 min), --budget 230 (seconds;
             later parts are skipped when they would not fit), anything after `--` goes to train.py

What runs: bench_step's random 1.5B checkpoint, then `train.py --preset=paper-1.5b --rollout.ignore_eos=true` (every
turn to its full budget: the issue's uniform setting) on one process (bf16 compute over fp32 masters, FSDP2 over a
one-rank group, as train.py runs one GPU), with a FRESH inductor + Triton cache (TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR in a temp dir: a cold start, as on a freshly lent machine). train.py logs the first step's parts in
its first metrics row (`first_step_s`, max over ranks):
    since_model_ready_s  model loaded and wrapped (the checkpoint on the GPU) -> first step done: the target
    step_s               the first step itself: rollout_s + score_s + update_s (+ a little bookkeeping)
    gen_compile_s        torch.compile of the generator's decode step (and prefill with rollout.compile=all), inside
                         rollout_s; gen_compiles = how many graphs (2 with the default rollout.compile=layers: one per
                         layer half; 1 with decode)
    gen_capture_s        CUDA-graph captures (warm-up runs + capture, compile time excluded), inside rollout_s;
                         gen_captures = how many (bucket, layout) graphs
    train_compile_s      model.compile_train's forward compiles (0 unless --compile-train; its backward compiles in
                         the first backward, inside update_s)
The second step (same run) is the steady-state reference: one-off cost = first step - second step. Then, unless
--no-warm, train.py again for one step on the SAME cache directory: what a warm compile cache (a second run on the
machine) saves. --levers adds, in this process: the prefill's cold compile time and its per-call time eager vs
compiled on the first turn's prompts of --batch-size problems (the data behind keeping the prefill eager).

Levers changed for this target (memrl/model_runner.py docstring, "torch.compile") and the effect predicted for the
1.5B first step on one H200, from the code (not measured: this script measures it):
    - prefill eager by default (rollout.compile=layers or decode): one full-model compile fewer, ~20-30 s cold;
      costs ~20% of the prefill (~0.2-0.4 s per step at paper-1.5b, a few % of the rollout) -- --levers prints both sides
    - no size-1 specialisation and no duck sizing in the compiled step: before, a batch of 1 row, a lone prompt
      (P = 1) or sizes equal by chance at the first call each compiled the model again (the 0.5B at real lengths:
      up to 4 compiles, 92-165 s); now gen_compiles = 1 whatever the lengths
    - 32-row graph buckets (12 up to 512 rows, was 20) and graphs kept per cache layout: each (bucket, slot length)
      is captured once per run instead of once per generate() call; a turn sweeping 128 -> 1 live rows captures 4
      graphs instead of 12. Predicted gen_capture_s: a few seconds in step 1, ~0 in step 2
    - warm compile cache (--warm run): the decode compile drops from ~20-30 s to the dynamo trace (~5 s)
    Predicted: step 1 ~= step 2 (~35-40 s at 64 x 4 on one GPU) + one decode compile (~20-30 s cold, ~5 s warm) +
    captures (~2-4 s) + first-use costs (allocator, cuDNN plans: ~5 s) => ~65-75 s cold, ~50 s warm. Where the cold
    figure misses 60 s, gen_compile_s names the cause (the one remaining compile of the 28-layer decode graph).
Writes bench_first_step.json / .md and the train.py logs under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_step  # noqa: E402

PARTS = ("since_model_ready_s", "step_s", "rollout_s", "gen_compile_s", "gen_compiles", "gen_capture_s",
         "gen_captures", "score_s", "update_s", "train_compile_s")


def run_train(spec: dict, ckpt: Path, episodes: Path, work: Path, out: Path, name: str, steps: int, cache: Path,
              flags: list[str], timeout_s: float) -> dict:
    """train.py on one process with the given compile cache; its rows and first-step parts."""
    run_dir = work / f"run_{name}"
    cmd = bench_step.train_command(spec, ckpt, episodes, run_dir, 1, steps, flags, [])
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    t0 = time.perf_counter()
    child = bench_step.launch(cmd, run_dir, steps, timeout_s, out / f"train_{name}.log", env_extra=env)
    rows = child["rows"]
    res = {"name": name, "ended": child["ended"], "wall_s": time.perf_counter() - t0, "command": " ".join(cmd),
           "rows": rows, "first_step": rows[0].get("first_step_s") if rows else None}
    if len(rows) > 1:
        res["steady_step_s"] = statistics.mean(r["step_s"] for r in rows[1:])
        res["steady"] = {k: rows[1].get(k) for k in ("step_s", "rollout_s", "score_s", "update_s", "gen_compile_s",
                                                      "gen_capture_s")}
    if not rows:
        res["error"] = f"no step logged ({bench_step.root_cause(out / f'train_{name}.log')})"
    return res


def levers(episodes_path: Path, tokenizer_dir: Path, batch: int, cache: Path) -> dict:
    """In this process, a fresh cache: the prefill's compile time and its eager vs compiled time per call on the first
    memory turn's prompts of `batch` problems (one prefill each, as the rollout's first turn)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    import torch

    from benchmarks.bench_generate import build_model
    from memrl.config import preset
    from memrl.episodes import load_episodes
    from memrl.generate import Generator, SamplingParams
    from memrl.templates import Templates
    from memrl.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    templates = Templates.from_config(preset("paper-1.5b").rollout)
    eps = load_episodes(episodes_path)[:batch]
    prompts = [tok.encode_prompt(templates.memory_turn(e.question, templates.initial_memory, e.shards[0])) for e in eps]
    model = build_model(bench_step.QWEN25_1P5B, torch.device("cuda"), torch.bfloat16)  # as the checkpoint: V 151,936
    params = SamplingParams(max_new_tokens=1, n=4, seed=0)  # prefill only: the first token comes from its logits
    out = {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts))}
    for name, compile_prefill in (("compiled", True), ("eager", False)):
        gen = Generator(model, tok.vocab_size, compile_prefill=compile_prefill, compile_fallback=False)
        gen.generate(prompts, params)
        out[f"{name}_first_call_compile_s"] = gen.last_stats["compile_s"]
        times = []
        for _ in range(3):
            gen.generate(prompts, params)
            times.append(gen.last_stats["prefill_s"])
        out[f"{name}_prefill_s"] = statistics.median(times)
        gen.release()
    return out


def write(results: dict, out: Path) -> str:
    (out / "bench_first_step.json").write_text(json.dumps(results, indent=2) + "\n")
    e = results["env"]
    lines = [f"# First RL step (train.py, {results['model']} shapes, random weights, one process)", "",
             f"{e['device']} | torch {e['torch']} (CUDA {e['cuda']}) | triton {e['triton']} | {e['date']} | "
             f"{results['batch_size']} problems x G 4, uniform lengths | flags: {' '.join(results['flags']) or '-'}",
             "", "| run | " + " | ".join(PARTS) + " | steady step s | one-off s |", "|---|" + "---|" * (len(PARTS) + 2)]
    for r in results["runs"]:
        f = r.get("first_step") or {}
        steady = r.get("steady_step_s")
        one_off = f["step_s"] - steady if f.get("step_s") is not None and steady else None
        lines.append(f"| {r['name']} | " + " | ".join(bench_step.fmt(f.get(k)) for k in PARTS) +
                     f" | {bench_step.fmt(steady)} | {bench_step.fmt(one_off)} |")
    for r in results["runs"]:
        if r.get("error"):
            lines.append(f"\n{r['name']}: FAILED: {r['error']}")
    lv = results.get("levers")
    if lv:
        if lv.get("error"):
            lines.append(f"\nlevers: FAILED: {lv['error']}")
        else:
            lines += ["", f"Prefill of the first turn ({lv['prompts']} prompts, {lv['prompt_tokens']:,} tokens, "
                      f"n = 4): compile {lv['compiled_first_call_compile_s']:.1f} s once; per call compiled "
                      f"{lv['compiled_prefill_s']:.3f} s vs eager {lv['eager_prefill_s']:.3f} s."]
    lines += ["", "Target (issue 11): since_model_ready_s <= 60 on the cold run. Parts in seconds (max over ranks); "
              "gen_* are inside rollout_s; one-off = first step - steady step.",
              f"Wall time {results.get('wall_s', 0):.0f} s."]
    text = "\n".join(lines) + "\n"
    (out / "bench_first_step.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_first_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default=".bench", help="bench_step prepare's output (episodes + tokenizer)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--model", choices=("1.5b", "tiny"), default="1.5b", help="tiny: a CPU smoke run of the plumbing")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--levers", action="store_true")
    ap.add_argument("--compile-train", action="store_true")
    ap.add_argument("--generator-compile", choices=("decode", "all", "layers", "none"), default="layers")
    ap.add_argument("--budget", type=float, default=230.0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    prepared = Path(args.prepared).resolve()
    episodes, tokenizer_dir = prepared / bench_step.EPISODES, prepared / bench_step.TOKENIZER
    if not episodes.is_file() or not (tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"{prepared}: run `python -m benchmarks.bench_step prepare --out {args.prepared}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--rollout.ignore_eos=true", f"--train.batch_size={args.batch_size}",
             f"--rollout.compile={args.generator_compile}"] + (
        ["--model.compile_train=true"] if args.compile_train else []) + passthrough
    results = {"env": bench_step.environment(1), "model": args.model, "batch_size": args.batch_size, "flags": flags,
               "runs": []}
    print(" | ".join(f"{k}: {v}" for k, v in results["env"].items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_first_step_"))
    try:
        t = time.perf_counter()
        spec = bench_step.MODELS[args.model]
        shape = dict(spec["shape"])
        if args.model == "tiny":  # CPU smoke run: the tokenizer's vocabulary, rounded up
            from memrl.tokenizer import Tokenizer

            shape["vocab_size"] = -(-Tokenizer.from_pretrained(tokenizer_dir).vocab_size // 64) * 64
        ckpt = bench_step.make_checkpoint(shape, tokenizer_dir, work / "ckpt", spec["dtype"])
        print(f"random {args.model} checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        cache = work / "cache"  # fresh: a cold start
        plan = [("cold", args.steps)] + ([] if args.no_warm else [("warm cache", 1)])
        for name, steps in plan:
            left = args.budget - (time.perf_counter() - t_start)
            if left < 60:
                print(f"[{name}] skipped: {left:.0f} s left of the {args.budget:.0f} s budget", flush=True)
                continue
            print(f"[{name}] train.py, {steps} step(s), cache {cache}", flush=True)
            res = run_train(spec, ckpt, episodes, work, out, name.replace(" ", "_"), steps, cache, flags, left - 5)
            results["runs"].append(res)
            print(f"[{name}] {res['ended']} after {res['wall_s']:.0f} s; first step: {res['first_step']}"
                  + (f"; steady step {res['steady_step_s']:.1f} s" if res.get("steady_step_s") else ""), flush=True)
            write(results, out)
        if args.levers:
            if args.budget - (time.perf_counter() - t_start) < 60:
                print("[levers] skipped: out of budget", flush=True)
            else:
                try:
                    results["levers"] = levers(episodes, tokenizer_dir, args.batch_size, work / "cache_levers")
                except Exception as e:  # noqa: BLE001 - the train.py numbers above still stand
                    results["levers"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"[levers] {results['levers']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    print("\n" + write(results, out))
    return 0 if results["runs"] and all(not r.get("error") for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
