#!/usr/bin/env bash
# Issue 11 measurements on one `nvidia-h200-x2` machine, ~8 minutes, results under $OUT.
#
#   bash benchmarks/h200_issue11.sh GSM8K_TRAIN_JSONL [WIKITEXT_RAW]     # or a prepared dir (bench_step prepare)
#
# The machine has no internet and no ../shared: copy GSM8K's train.jsonl (and optionally WikiText-2's wiki.test.raw,
# extra tokenizer text) into an ignored folder of the checkout and pass the paths. Parts (each may fail alone):
#   0. prepare: rule-sharded episodes + a 32k BPE tokenizer (CPU, ~20 s)            -> $OUT/prepare.log
#   1. GPU 0: first RL step on one GPU, 1.5B shapes, cold compile cache (~2 min; the step alone: its parts say
#      how much is compilation and capture, bench_first_step.py --steps 2 adds a steady step) -> $OUT/first_step/
#      GPU 1, at the same time: decode step % of the byte roofline at 256 / 512 rows -> $OUT/generate/
#   2. both GPUs: the paper-1.5b step under torchrun, uniform vs real lengths (the qwen2.5-0.5b-gsm8k length
#      profile), without then with model.compile_train, 2 steps each (the 1st is the warm-up), in the time left
#      (a launch that would not fit is skipped and says so)                         -> $OUT/step/
#   3. a compact table of the numbers issue 11 asks for                              -> $OUT/summary.md
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${TOTAL_S:-480}  # seconds for everything (the lent machine allows 600 per command)
elapsed() { echo $(( $(date +%s) - START )); }
run_part() {  # name, command...: run it, log it, report its exit code; never stop the script
  local name=$1; shift
  echo "=== [$name] $(elapsed) s: $*"
  "$@"
  local rc=$?
  echo "=== [$name] exit code $rc at $(elapsed) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/hardware.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "$OUT/hardware.txt" 2>&1
cat "$OUT/hardware.txt"

# --- 0. episodes + tokenizer
DATA=${1:-}
if [ -f "$DATA/episodes.jsonl" ]; then
  PREPARED=$DATA
elif [ -f "$DATA" ]; then
  PREPARED=$(mktemp -d /tmp/bench_prepared.XXXX)
  WIKI=()
  if [ -n "${2:-}" ]; then WIKI=(--wikitext "$2"); fi
  run_part prepare python -m benchmarks.bench_step prepare --data "$DATA" --out "$PREPARED" --problems 256 \
    ${WIKI[@]+"${WIKI[@]}"} > "$OUT/prepare.log" 2>&1
  tail -4 "$OUT/prepare.log"
else
  echo "usage: bash benchmarks/h200_issue11.sh GSM8K_TRAIN_JSONL [WIKITEXT_RAW] (or a prepared dir)"; exit 2
fi

# --- 1. first step (GPU 0) and decode roofline (GPU 1), side by side
(export CUDA_VISIBLE_DEVICES=0; run_part first_step timeout 240 python -m benchmarks.bench_first_step \
   --prepared "$PREPARED" --out "$OUT/first_step" --steps 1 --no-warm --budget 200 > "$OUT/first_step.log" 2>&1) &
FIRST=$!
(export CUDA_VISIBLE_DEVICES=1; run_part generate timeout 240 python -m benchmarks.bench_generate --no-hf --no-attention \
   --rows 256,512 --budget-s 200 --out "$OUT/generate" > "$OUT/generate.log" 2>&1) &
GEN=$!
wait $FIRST $GEN
grep -h "=== \[" "$OUT/first_step.log" "$OUT/generate.log"

# --- 2. the 1.5B step on both GPUs: uniform vs real lengths, compile_train off then on, in the time left
LEFT=$(( TOTAL - $(elapsed) - 15 ))
run_part step timeout $(( LEFT + 30 )) python -m benchmarks.bench_step run --prepared "$PREPARED" --model 1.5b \
  --nproc 2 --lengths both --compile-train both --steps 2 --budget "$LEFT" --out "$OUT/step" > "$OUT/step.log" 2>&1
grep -h "=== \[\|FAILED\|skipped" "$OUT/step.log" | head -20

# --- 3. summary
python - "$OUT" > "$OUT/summary.md" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None


def f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


print("# Issue 11 on 2 x H200\n")
print((out / "hardware.txt").read_text() if (out / "hardware.txt").is_file() else "")
step = load("step/bench_step.json")
if step:
    print("## 1.5B step, 2 GPUs (means over the measured steps)\n")
    print("| run | step s | rollout | scoring | update | MFU spec | scoring s/1k tok | update s/1k tok | "
          "memory tok | at cap | answer tok | first step s | gen compile s | gen capture s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in step["models"]:
        w = (m.get("warmup") or {}).get("first_step_s") or {}
        print(f"| {m.get('label')} | {f(m.get('step_s'))} | {f(m.get('rollout_s'))} | {f(m.get('score_s'))} | "
              f"{f(m.get('update_s'))} | {f(m.get('mfu_spec'), '.0%')} | {f(m.get('score_s_per_1k_tokens'), '.4f')} | "
              f"{f(m.get('update_s_per_1k_tokens'), '.4f')} | {f(m.get('memory_tokens'))} | "
              f"{f(m.get('memory_full'), '.1%')} | {f(m.get('answer_tokens'))} | {f(w.get('step_s'))} | "
              f"{f(w.get('gen_compile_s'))} | {f(w.get('gen_capture_s'))} |" + (" FAILED" if m.get("error") else ""))
    for r in step.get("length_ratios", []):
        print(f"\nper-token real / uniform{' +compile_train' if r['compile_train'] else ''}: scoring "
              f"{f(r['score_ratio'], '.2f')}, update {f(r['update_ratio'], '.2f')} (target <= 1.3)")
    print()
first = load("first_step/bench_first_step.json")
if first:
    print("## First step, one GPU, cold compile cache (target: since_model_ready_s <= 60)\n")
    for r in first["runs"]:
        print(f"- {r['name']}: {r.get('first_step')}; steady step {f(r.get('steady_step_s'))} s"
              + (f" FAILED {r['error']}" if r.get("error") else ""))
    print()
gen = load("generate/bench_generate.json")
if gen:
    print("## Decode step vs the byte roofline, one GPU (target >= 70% at 256 rows)\n")
    for r in gen["ours"]:
        b = r.get("breakdown", {}).get("categories_ms", {})
        print(f"- {r['rows']} rows x {r['prompt']}/{r['new']}: {r['decode_ms_per_step']:.2f} ms/step, roofline "
              f"{r['roofline_ms']:.2f} ms = {r['pct_roofline']:.0f}%; " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()))
    for e in gen.get("errors", []):
        print(f"- FAILED: {e}")
EOF
cat "$OUT/summary.md"
echo "=== done at $(elapsed) s"
