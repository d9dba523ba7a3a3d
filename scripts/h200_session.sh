#!/usr/bin/env bash
# One lease of a lent 2 x H200 machine (no internet, ~30 minutes): the GPU measurements of issues 11-13 and the
# real-model experiment of issue 12, driven from this machine one short call at a time. Each step is one call:
#
#   bash scripts/h200_session.sh setup            # carry .whl .gpu/data .gpu/raw: wheels, data, a repo snapshot;
#                                                 # starts the benchmarks in the background (both GPUs, ~9 min)
#   bash scripts/h200_session.sh part FILE        # carry .gpu/parts/FILE: one <= 58 MiB piece of the GGUF
#   bash scripts/h200_session.sh convert          # join + sha256 + transformers' GGUF reader (background, CPU)
#   bash scripts/h200_session.sh real             # after bench + convert: the experiment (background)
#   NOBENCH=1 bash scripts/h200_session.sh setup; bash scripts/h200_session.sh lease2   # the second lease
#   bash scripts/h200_session.sh status           # what runs, the tails of the logs
#   bash scripts/h200_session.sh collect          # everything into $OUT/results.tgz (one file comes back)
#
# Why background jobs (setsid): a call may last 10 minutes and the machine goes back 30 s after a call; work that
# outlives one call keeps running while the next calls carry pieces or poll. Files live in $HOME (kept while the
# machine is held), not in the repository copy (each call re-syncs it and drops ignored folders not carried).
# The experiment's settings are the variables below (override on the command line: LR=2e-6 bash ... real).
set -u
R=${ROOT:-$HOME}  # everything the lease keeps (/root there; a dry run on a CPU: ROOT=/tmp/h200 MODEL=... NPROC=1 ... real)
export PYTHONUNBUFFERED=1 PYTHONPATH=$R/site${PYTHONPATH:+:$PYTHONPATH}
G=$R/g; REPO=$R/repo; BENCH=$R/bench; REAL=$R/real
MODEL=${MODEL:-$R/models/qwen2.5-coder-1.5b-instruct}
NPROC=${NPROC:-2}
mkdir -p $G/parts $BENCH $REAL

# the memory-RL experiment (README "A real model"; every value that differs from the paper preset is here)
GROUP=${GROUP:-8}            # G: 8 samples (paper 4): at the base model's ~16% memory accuracy, P(a group has mixed
                             # rewards) = 1 - 0.84^8 - 0.16^8 = 75% (G = 4: 50%), so most groups carry a gradient
BATCH=${BATCH:-16}           # problems per RL step (paper 64): 16 x 8 = 128 trajectories, steps short enough for
                             # ~40 of them in the lease
MINI=${MINI:-4}              # optimizer steps per RL step (paper preset 16 = MemAgent's; 4 problems each here)
LR=${LR:-3e-6}               # paper 1e-6: 3x for a run of ~40 RL steps instead of 10 epochs
WARMUP=${WARMUP:-3}          # paper 10 (optimizer steps of the scheduler: here RL steps)
EVAL_N=${EVAL_N:-256}        # held-out problems evaluated during training (greedy + sampled)
TABLE_N=${TABLE_N:-500}      # problems of the three-condition tables before and after
SEG1=${SEG1:-10}             # steps before the first stop; the rest resumes (--resume) in the time left
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-600}

bg() {  # name, command...: run in its own session, survive the call; log to $R/NAME.log; mark done/failed
  local name=$1; shift
  rm -f $R/$name.done $R/$name.failed
  setsid nohup bash -c "$* > $R/$name.log 2>&1 && touch $R/$name.done || touch $R/$name.failed" \
    > /dev/null 2>&1 < /dev/null &
  echo "started $name (pid $!)"
}

case "${1:-status}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $R/site .whl/*.whl
  cp -r .gpu/data .gpu/raw $G/ && cp .gpu/parts/manifest.json $G/parts/
  rm -rf $REPO && mkdir -p $REPO && tar --exclude=./.gpu --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C $REPO
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
    'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
  # benchmarks: packed attention (picks the training backend), issue 11's step / first step / decode, then the
  # conversation rollout; ~9 minutes on both GPUs
  [ -n "${NOBENCH:-}" ] || bg bench "cd $REPO && python3 -m benchmarks.bench_attention --out $BENCH/bench_attention.json --budget-s 150 \
    > $BENCH/bench_attention.log 2>&1; OUT=$BENCH/issue11 TOTAL_S=330 bash benchmarks/h200_issue11.sh \
    $G/raw/train.jsonl > $BENCH/issue11.log 2>&1; CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.bench_conversation \
    --out $BENCH/conversation > $BENCH/conversation.log 2>&1; true"
  ;;
part)  # FILE under .gpu/parts (the 1.5B) or .gpu05/parts (the 0.5B, `lease2`)
  case "$2" in .gpu05/*) DEST=$G/parts05 ;; .gpu/*) DEST=$G/parts ;; *) DEST=$G/parts; set -- "$1" ".gpu/parts/$2" ;; esac
  mkdir -p $DEST && cp "$2" $DEST/ && echo "$(ls $DEST | wc -l) files in $DEST"
  tail -n 2 $BENCH/*.log 2>/dev/null | tail -n 4
  ;;
convert)
  bg convert "cd $REPO && python3 scripts/gguf_to_hf.py --model qwen2.5-coder-1.5b-instruct --parts $G/parts \
    --out $MODEL --dtype bfloat16"
  ;;
real)
  if [ -n "${REFRESH:-}" ]; then  # take this call's code (a fix made after setup)
    tar --exclude=./.gpu --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C $REPO
  fi
  D=$G/data; RUN=$REAL/run
  COMMON="--preset=paper-1.5b --model.path=$MODEL --data.eval_path=$D/gsm8k_test.jsonl"
  TRAIN="torchrun --nproc_per_node $NPROC train.py $COMMON --train.run_dir=$RUN --data.train_path=$D/gsm8k_train.jsonl \
    --data.eval_limit=$EVAL_N ${SAMPLED---rollout.eval_samples=2} --algo.mini_batches=$MINI --rollout.group_size=$GROUP \
    --train.batch_size=$BATCH --optim.lr=$LR --optim.warmup_steps=$WARMUP --train.eval_every=10 \
    --train.save_every=5 --train.keep_last=2 ${EXTRA:-}"
  EVAL="python3 evaluate.py $COMMON ${EVAL_EXTRA:-} --data.eval_limit=$TABLE_N --batch_size=512 --dataset=gsm8k=$D/gsm8k_test.jsonl"
  bg real "cd $REPO && set -x && date && \
    (CUDA_VISIBLE_DEVICES=0 $EVAL --checkpoint=base=$MODEL --conditions=memory --out=$REAL/base_memory.json \
       > $REAL/base_memory.log 2>&1 & \
     CUDA_VISIBLE_DEVICES=$((NPROC - 1)) $EVAL --checkpoint=base=$MODEL --conditions=single_turn,full_history \
       --out=$REAL/base_other.json > $REAL/base_other.log 2>&1; wait) && date && \
    T0=\$(date +%s) && $TRAIN --train.max_steps=$SEG1 > $REAL/train1.log 2>&1 && date && \
    STEPS=\$(python3 scripts/steps_that_fit.py $RUN/metrics.jsonl \$(( $TRAIN_BUDGET_S - \$(date +%s) + T0 )) $SEG1) && \
    echo resume to \$STEPS && $TRAIN --train.max_steps=\$STEPS --resume > $REAL/train2.log 2>&1 && date && \
    (CUDA_VISIBLE_DEVICES=0 $EVAL --checkpoint=trained=$RUN --conditions=memory --out=$REAL/after_memory.json \
       > $REAL/after_memory.log 2>&1 & \
     CUDA_VISIBLE_DEVICES=$((NPROC - 1)) $EVAL --checkpoint=trained=$RUN --conditions=single_turn,full_history \
       --out=$REAL/after_other.json > $REAL/after_other.log 2>&1; wait) && date && \
    python3 evaluate.py --plot $RUN/metrics.jsonl --plot_out=$REAL/curves.png"
  ;;
lease2)  # the second lease (after setup; the parts of both models follow, one call each): issue 11's first step with
  # the per-layer decode compile (cold and warm cache, vs the whole-step compile, GPU 0) and the decode step both
  # ways (GPU 1); the real 0.5B's step at real vs uniform lengths (GPU 1, once its parts are in); issue 12's
  # memory-RL run on the 1.5B again with seeds 1 and 2 (one GPU each, as the GPUs free up), seed 0's settings
  cp .gpu05/parts/manifest.json $G/parts05/ 2>/dev/null || { mkdir -p $G/parts05 && cp .gpu05/parts/manifest.json $G/parts05/; }
  M05=$R/models/qwen2.5-coder-0.5b-instruct; P=$R/prepared
  waitfor() { until [ -e $R/$1.done ] || [ -e $R/$1.failed ]; do sleep 5; done; }
  allparts() {  # folder: every piece the manifest lists is there at its size
    python3 -c "import json,os,sys; m=json.load(open('$1/manifest.json')); sys.exit(any(not os.path.exists('$1/'+p['name']) or os.path.getsize('$1/'+p['name'])!=p['size'] for p in m['pieces']))"
  }
  export -f waitfor allparts; export R G P M05 MODEL REPO BENCH
  bg prep "cd $REPO && python3 -m benchmarks.bench_step prepare --data $G/raw/train.jsonl \
    --wikitext $G/raw/wiki.test.raw --out $P --problems 256"
  bg first "waitfor prep; cd $REPO && for c in layers decode; do \
    CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m benchmarks.bench_first_step --prepared $P --out $BENCH/first_\$c \
    --generator-compile \$c --steps 2 --budget 400; done"
  bg gen "cd $REPO && for c in --compile-layers ''; do CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m \
    benchmarks.bench_generate --no-hf --no-attention --rows 256,512 --budget-s 250 \$c \
    --out $BENCH/generate\${c:+_layers}; done"
  bg convert05 "until allparts $G/parts05; do sleep 5; done; cd $REPO && python3 scripts/gguf_to_hf.py \
    --model qwen2.5-coder-0.5b-instruct --parts $G/parts05 --out $M05 --dtype bfloat16"
  bg convert15 "until allparts $G/parts; do sleep 5; done; waitfor convert05; cd $REPO && python3 \
    scripts/gguf_to_hf.py --model qwen2.5-coder-1.5b-instruct --parts $G/parts --out $MODEL --dtype bfloat16"
  bg step05 "waitfor gen; waitfor prep; waitfor convert05; cd $REPO && CUDA_VISIBLE_DEVICES=1 timeout 480 \
    python3 -m benchmarks.bench_step run --prepared $P --model-path $M05 --nproc 1 --lengths both --steps 2 \
    --budget 450 --out $BENCH/step05"
  if [ -f .gpu/synth.tar ]; then  # issue 14's starting policy (the synthetic-task branch's script), on GPU 0
    mkdir -p $R/synth && tar -xf .gpu/synth.tar -C $R/synth
    bg synth "waitfor first; cd $R/synth && CUDA_VISIBLE_DEVICES=0 python3 scripts/make_synthetic_policy.py \
      --device=cuda --steps=${SYNTH_STEPS:-3000} --save_every=500 --out=$R/synth-policy/policy"
  fi
  D=$G/data
  for s in 1 2; do
    gpu=$((s - 1)); after=$([ $s = 1 ] && echo first || echo step05)
    bg seed$s "waitfor $after; waitfor convert15; cd $REPO && CUDA_VISIBLE_DEVICES=$gpu torchrun --standalone \
      --nproc_per_node 1 train.py --preset=paper-1.5b --model.path=$MODEL \
      --data.eval_path=$D/gsm8k_test.jsonl --train.run_dir=$REAL/seed$s --data.train_path=$D/gsm8k_train.jsonl \
      --data.eval_limit=$EVAL_N --rollout.eval_samples=2 --algo.mini_batches=$MINI --rollout.group_size=$GROUP \
      --train.batch_size=$BATCH --optim.lr=$LR --optim.warmup_steps=$WARMUP --train.eval_every=10 \
      --train.save_every=13 --train.keep_last=1 --train.seed=$s --train.max_steps=13 && \
      python3 evaluate.py --plot $REAL/seed$s/metrics.jsonl --plot_out=$REAL/seed$s/curves.png"
  done
  ;;
status)
  ls $R/*.done $R/*.failed 2>/dev/null; ls $G/parts | wc -l; ls $MODEL 2>/dev/null | head -3
  for f in $R/*.log $BENCH/*.log $REAL/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 3 "$f"; }; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  ;;
synthout)  # issue 14's starting policies (small) into $OUT
  mkdir -p "$OUT/synth" && cp -r $R/synth-policy/* $R/synth.log "$OUT/synth/" 2>/dev/null; ls "$OUT/synth"
  ;;
collect)
  tar --exclude='*.safetensors' --exclude='*.pt' --exclude='*.gguf' --exclude='parts' -czf "$OUT/results.tgz" \
    $R/*.log $BENCH $REAL 2>/dev/null
  ls -la "$OUT"
  ;;
esac
