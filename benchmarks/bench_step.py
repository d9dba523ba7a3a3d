"""Step benchmark (issues 6, 11): train.py's real RL step on random weights of the paper's model shapes, timed by phase.

    # 1. on any CPU, ~15 s: episodes (the first 256 GSM8K train problems, rule-sharded by data_tools) and a 32k
    #    byte-level BPE tokenizer trained on GSM8K (+ WikiText-2 test), into .bench/ (git-ignored via .git/info/exclude)
    python -m benchmarks.bench_step prepare --data ../shared/data/gsm8k/train.jsonl --out .bench
    # 2. on 2 GPUs (carry .bench): random checkpoint(s), train.py under torchrun, the table. `both` = 1.5b (3 steps)
    #    then 4b (2 steps), each at uniform then real lengths (below), inside --budget 560 s (what does not fit is
    #    skipped: `--lengths uniform` for the 4B); NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
    #    NVSHMEM_DISABLE_NVLS=1 are set for the child whatever the environment says
    python -m benchmarks.bench_step run --prepared .bench --model both --nproc 2 --out $OUT
    # CPU smoke (gloo, fp32, a tiny Qwen2-shaped model, budgets of 8 tokens); anything after `--` goes to train.py last
    python -m benchmarks.bench_step run --prepared .bench --model tiny --nproc 2 --steps 3 --out bench_out \\
        -- --rollout.memory_cap_tokens=8

    # 3. the same step at real and at uniform lengths, each with and without compiled training blocks (4 launches)
    python -m benchmarks.bench_step run --prepared .bench --model 1.5b --lengths both --compile-train both --steps 2
    # 4. a real checkpoint directory (e.g. the 0.5B converted from ../shared/REAL_MODEL.md's GGUF) on one GPU, at its
    #    own EOS lengths and forced to full length, batch 32 x G 4 as in issue 11
    python -m benchmarks.bench_step run --prepared .bench --model-path /data/qwen2.5-0.5b --nproc 1 \\
        -- --train.batch_size=32

Lengths (`--lengths both`, the default, launches train.py once per length mode and compares them per token):
  uniform  every turn generated to its full budget (--rollout.ignore_eos=true): the packed sequences of a
           micro-batch are about equally long (what every figure before issue 11 measured)
  real     random weights never emit EOS, so each request stops at a length drawn from a named profile
           (--rollout.length_profile, default qwen2.5-0.5b-gsm8k, memrl/length_profile.py: what the real
           Qwen2.5-0.5B produced on sharded GSM8K; memory turns mean 55 tokens with 3% cut at the 256 cap, answers
           mean 150 with 2% at the 512 cap, each a capped lognormal, seeded per request); with --model-path, the
           model's own end tokens
  Per-token cost = scoring s per 1k scored tokens and update s per 1k update tokens (sums over the measured steps);
  the ratio real / uniform is what issue 11 asks to bring to <= 1.3. train.py's logged mean memory / answer length
  and share of memory turns that used the whole cap (memory_full) are printed beside them, to check that the
  profile (or the real model) did what it says.
Compile toggles: --compile-train off|on|both (model.compile_train: each decoder block's norms and MLP
torch.compile'd for scoring and the update, memrl/compile.py) and --generator-compile decode|all|none
(rollout.compile: what the rollout's generator compiles). train.py logs the first step's parts (compile, CUDA-graph
capture, rollout, scoring, update) in its first metrics row; the table prints them under each run.

Writes under --out: bench_step.md (the table), bench_step.json (everything), train_<run>.log (the child's whole
output), <run>_metrics.jsonl and <run>_run_config.json (<run> = model_lengths[_compile_train]). Checkpoints and the run directory live in a temp dir.

What is measured: `run` writes a random-weight checkpoint of the model's shape (bf16; the tokenizer from `prepare`)
and launches `python -m torch.distributed.run --standalone --nproc_per_node N train.py --preset=paper-1.5b|paper-4b
--model.path=CKPT --data.train_path=EPISODES --rollout.ignore_eos=true --train.max_steps=K ...`, so every number is
train.py's own step: rollout (64 problems x G = 4; at uniform lengths every turn generated to its full budget:
memory 256 tokens, answer 512 / 1,024), the reference-model scoring pass, the PPO update (fwd + bwd + AdamW), with
train.py's FSDP.
It reads the per-step timings and token counts train.py writes to metrics.jsonl (rollout_s, score_s, update_s,
step_s, train_tokens, score_tokens, response_tokens, rollout_new_tokens, peak_mem_gib, world_size) and stops the
child once K steps are logged (the end-of-run evaluation and checkpoint are not part of a step). Step 1 is the
warm-up (compilation, CUDA-graph capture, allocator growth): reported apart, the others are averaged.
Data order is not shuffled (--data.shuffle=false), so step k always sees problems 64(k-1) .. 64k-1.

FLOPs (model FLOPs, the usual MFU convention: recomputation under gradient checkpointing is not credited):
    one forward over a packed micro-batch = 2 * N_body * T  +  2 * V * H * R  +  2 * L * Hq * D * sum_s S_s^2
      N_body: parameters except the embedding (every linear layer, biases and norms; negligible besides)
      T: tokens through the model (train_tokens); R: response tokens (the lm_head runs on response rows only,
         memrl.algo.response_logprobs, so a tied lm_head costs 2*V*H per response token, never per prompt token)
      attention: per layer, QK^T and PV are each 2*Hq*D*S^2/2 FLOPs for a causal sequence of S tokens (each packed
         sequence attends to itself only): L layers, Hq query heads, head dim D
    update = 3 x forward (backward = 2 x forward)        scoring (reference and/or old log-probs) = forward only
    MFU = update FLOPs / update_s / world_size / peak, for two peaks: the spec dense bf16 peak (H100/H200 SXM:
    989 TFLOP/s) and a bf16 8192^3 GEMM measured at the start of this run.
sum_s S_s^2 is train.py's metrics field `attn_len_sq` (sum of S^2 over the update's packed sequences). For a train.py
that predates it, it is estimated per step (uniform lengths only) from the same episodes, templates and tokenizer,
every turn at its full budget, memories simulated as the decoded-and-re-encoded text of uniformly random tokens
(what random weights emit); the estimate's sum_s S_s is printed against the measured train_tokens as a check.
10 epochs of sharded GSM8K = 10 x ceil(7,473 / 64) = 1,170 steps (the paper: ~90 s/step on 2 x A100).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
EPISODES = "episodes.jsonl"
TOKENIZER = "tokenizer"
GSM8K_TRAIN_PROBLEMS = 7473
EPOCHS = 10  # paper A.1
PAPER_STEP_S = 90.0  # the paper's 1.5B run: ~30 h for 10 epochs on 2 x A100
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, SXM parts
# NVLink multicast stays off on the lent machines (device README); the child inherits these, never unsets them.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
             "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # update activations vary per micro-batch
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with a fixed system turn, about as long as the one Qwen2.5-Math-Instruct's template adds
CHAT_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Model shapes (random weights). Qwen2.5-(Math-)1.5B(-Instruct) and Qwen3-4B(-Thinking-2507) config.json values.
QWEN25_1P5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",  # qwen2: q/k/v bias always on
)
QWEN3_4B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rope_theta=5e6,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,  # qwen3: qk-norm
)
TINY = dict(
    model_type="qwen2", vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",  # vocab_size: the tokenizer's, rounded up
)
# name -> preset, shape, default steps (incl. the warm-up) and child timeout; `both` must fit ~9 min on 2 x H200
MODELS = {
    "1.5b": dict(preset="paper-1.5b", shape=QWEN25_1P5B, steps=3, timeout_s=210, dtype="bfloat16", extra=[]),
    # 4B: 16k-token micro-batches need activation checkpointing to fit next to the generator's KV cache (measured:
    # without it, OOM in the first update on 2 x H200, 2026-11-21)
    "4b": dict(preset="paper-4b", shape=QWEN3_4B, steps=2, timeout_s=300, dtype="bfloat16",
               extra=["--model.gradient_checkpointing=true"]),
    "tiny": dict(preset="paper-1.5b", shape=TINY, steps=3, timeout_s=600, dtype="float32",
                 extra=["--model.dtype=float32", "--train.device=cpu", "--train.batch_size=4",
                        "--rollout.group_size=2", "--rollout.memory_cap_tokens=8", "--rollout.response_max_tokens=8",
                        "--train.micro_batch_tokens=2048"]),
}
# the contract's metrics.jsonl fields of a train row (train.py, FSDP session)
ROW_FIELDS = ("rollout_s", "score_s", "update_s", "step_s", "train_tokens", "score_tokens", "response_tokens",
              "rollout_new_tokens", "peak_mem_gib", "world_size")
DEFAULT_PROFILE = "qwen2.5-0.5b-gsm8k"  # memrl/length_profile.py
LENGTH_MODES = ("uniform", "real")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One train.py launch: a model at uniform or real lengths, with or without compiled training blocks."""

    model: str  # a MODELS key, or "path" (--model-path)
    lengths: str  # uniform | real
    compile_train: bool

    @property
    def label(self) -> str:
        return f"{self.model} {self.lengths}" + (" +compile_train" if self.compile_train else "")

    def flags(self, profile: str) -> list[str]:
        """train.py overrides of this variant. Random weights never stop on their own: uniform = every turn to its
        budget, real = the length profile's draws; a real checkpoint (model "path") stops at its own EOS."""
        flags = []
        if self.lengths == "uniform" or self.model != "path":
            flags.append("--rollout.ignore_eos=true")
        if self.lengths == "real" and self.model != "path":
            flags.append(f"--rollout.length_profile={profile}")
        if self.compile_train:
            flags.append("--model.compile_train=true")
        return flags


def variants(models: list[str], lengths: str, compile_train: str) -> list[Variant]:
    """Launch order: per model, per compile setting, both length modes back to back (the pair a ratio compares);
    the order of the pair alternates so that a budget cut after any launch still leaves a complete early pair."""
    modes = LENGTH_MODES if lengths == "both" else (lengths,)
    cts = {"off": (False,), "on": (True,), "both": (False, True)}[compile_train]
    out = []
    for model in models:
        for i, ct in enumerate(cts):
            out += [Variant(model, m, ct) for m in (modes if i % 2 == 0 else modes[::-1])]
    return out


# ----------------------------------------------------------------------------- prepare (CPU, seconds)

def shard_episodes(data: Path, n_problems: int) -> list[dict]:
    """The first n_problems GSM8K problems, rule-sharded (data_tools); a one-sentence problem becomes one shard."""
    from data_tools.datasets import load_problems
    from data_tools.shard import rule_outcome

    episodes = []
    for problem in load_problems(data, "gsm8k")[:n_problems]:
        outcome = rule_outcome(problem, unshardable="whole")
        if outcome.episode is not None:
            episodes.append(outcome.episode)
    return episodes


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """A byte-level BPE trained on `texts`, saved as a transformers tokenizer (what memrl.tokenizer loads).

    Digits are split one by one before the byte-level word split, as Qwen's tokenizer does, so numbers cost
    about what they cost Qwen."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def token_stats(tokenizer_dir: Path, episodes: list[dict]) -> dict:
    """Mean tokens per shard, per question and per first memory-turn prompt (the template's text, no chat wrapper)."""
    from memrl.config import preset
    from memrl.templates import Templates
    from memrl.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    templates = Templates.from_config(preset("paper-1.5b").rollout)
    shards = [len(tok.encode(s)) for ep in episodes for s in ep["shards"]]
    questions = [len(tok.encode(ep["question"])) for ep in episodes]
    first = [len(tok.encode(templates.memory_turn(ep["question"], templates.initial_memory, ep["shards"][0])))
             for ep in episodes]
    return {"vocab_size": tok.vocab_size, "shard": statistics.mean(shards), "question": statistics.mean(questions),
            "first_prompt": statistics.mean(first)}


def prepare(args) -> None:
    from memrl.tokenizer import make_byte_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    episodes = shard_episodes(Path(args.data), args.problems)
    with open(out / EPISODES, "w") as f:
        for ep in episodes:
            f.write(json.dumps(ep) + "\n")
    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
             for line in Path(args.data).read_text().splitlines() if line.strip()]
    wikitext = Path(args.wikitext) if args.wikitext else Path(args.data).parents[1] / "wikitext2" / "wiki.test.raw"
    if wikitext.is_file():
        texts += [line for line in wikitext.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    train_tokenizer(texts, args.vocab_size, out / TOKENIZER)
    train_s = time.perf_counter() - t0
    ours = token_stats(out / TOKENIZER, episodes)
    with tempfile.TemporaryDirectory() as tmp:
        byte = token_stats(make_byte_tokenizer(Path(tmp) / "byte"), episodes)
    shards_per = statistics.mean(len(ep["shards"]) for ep in episodes)
    info = {"episodes": len(episodes), "shards_per_episode": shards_per, "tokenizer_texts": len(texts),
            "wikitext": str(wikitext) if wikitext.is_file() else None, "tokenizer_train_s": round(train_s, 1),
            "bpe": ours, "byte": byte}
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{len(episodes)} episodes ({shards_per:.2f} shards each) -> {out / EPISODES}")
    print(f"tokenizer: byte-level BPE, {ours['vocab_size']:,} tokens, trained on {len(texts):,} texts in "
          f"{train_s:.1f} s -> {out / TOKENIZER}")
    for what in ("shard", "question", "first_prompt"):
        print(f"mean tokens per {what:<12}: BPE {ours[what]:6.1f} | byte tokenizer {byte[what]:6.1f} "
              f"({byte[what] / ours[what]:.1f}x)")


# ----------------------------------------------------------------------------- FLOPs

def body_params(shape: dict) -> int:
    """Parameters of everything but the embedding (and lm_head): decoder blocks and the final norm."""
    from memrl.model import ModelConfig

    c = ModelConfig.from_hf_dict(shape, source="bench shape")
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if c.attention_bias else 0) + (2 * c.head_dim if c.qk_norm else 0)
    mlp = 3 * h * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp + 2 * h) + h


def forward_flops(shape: dict, tokens: float, response_tokens: float, len_sq: float) -> float:
    """One forward pass over packed sequences (see the module docstring): linear layers on every token, the lm_head
    on response rows, causal attention within each sequence (len_sq = sum of squared sequence lengths)."""
    from memrl.model import ModelConfig

    c = ModelConfig.from_hf_dict(shape, source="bench shape")
    linear = 2 * body_params(shape) * tokens + 2 * c.vocab_size * c.hidden_size * response_tokens
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * len_sq
    return linear + attention


def simulated_lengths(episodes, tokenizer, cfg, seed: int = 0) -> list[int]:
    """Packed-sequence lengths (prompt + response - 1 rows, as memrl.algo.pack_turns packs them) of one step's
    records, every turn at its full budget; memories are random tokens decoded and re-encoded, as random weights
    produce them."""
    from memrl.rollout import decode_response
    from memrl.templates import Templates

    templates = Templates.from_config(cfg.rollout)
    mem_cap, answer = cfg.rollout.memory_cap_tokens, cfg.rollout.response_max_tokens
    rng = random.Random(seed)
    lengths = []
    for ep in episodes:
        for _ in range(cfg.rollout.group_size):
            memory = templates.initial_memory
            for shard in ep.shards:
                prompt = tokenizer.encode_prompt(templates.memory_turn(ep.question, memory, shard))
                lengths.append(len(prompt) + mem_cap - 1)
                memory = decode_response(tokenizer, [rng.randrange(tokenizer.vocab_size) for _ in range(mem_cap)])
            lengths.append(len(tokenizer.encode_prompt(templates.final_turn(ep.question, memory))) + answer - 1)
    return lengths


# ----------------------------------------------------------------------------- run (GPU box)

def measure_gemm(device) -> float:
    """bf16 (GPU) / fp32 (CPU) square GEMM TFLOP/s: 8192^3 on a GPU, 1024^3 on a CPU; median of 20."""
    import torch

    cuda = device.type == "cuda"
    m, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return 2 * m ** 3 / statistics.median(times) / 1e12


def make_checkpoint(shape: dict, tokenizer_dir: Path, out_dir: Path, dtype_name: str) -> Path:
    """Random weights of `shape` (N(0, 0.02) matrices and biases, unit norms), built on the GPU when there is one,
    written with memrl.hf_io.save_model next to the prepared tokenizer."""
    import torch

    from memrl.hf_io import save_model
    from memrl.model import ModelConfig, Transformer, random_init_

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_hf_dict(shape, source="bench shape")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(getattr(torch, dtype_name)).to_empty(device=device)  # no fp32 copy of a 4B model
    random_init_(model, seed=0)
    save_model(model, out_dir, tokenizer_dir=tokenizer_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def train_rows(metrics_path: Path) -> list[dict]:
    """The train rows of a metrics.jsonl written so far (a torn last line is skipped)."""
    if not metrics_path.is_file():
        return []
    rows = []
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            rows.append(row)
    return rows


def train_command(spec: dict, ckpt: Path, episodes: Path, run_dir: Path, nproc: int, steps: int,
                  flags: list[str], passthrough: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), f"--preset={spec['preset']}", f"--model.path={ckpt}",
           f"--data.train_path={episodes}", f"--data.eval_path={episodes}",
           f"--data.eval_limit={max(2, nproc)}",  # train.py evaluates before step 1: keep that short
           "--data.shuffle=false", f"--train.max_steps={steps}", "--train.eval_every=0", "--train.save_every=0",
           "--train.log_every=1", "--train.eval_at_start=false", f"--train.run_dir={run_dir}"]
    return cmd + flags + spec["extra"] + passthrough


def launch(cmd: list[str], run_dir: Path, steps: int, timeout_s: float, log_path: Path,
           env_extra: dict | None = None) -> dict:
    """Run train.py under torchrun with output streamed to log_path; stop it once `steps` train rows are logged
    (the final evaluation and checkpoint are no part of a step) or at the timeout. Returns rows and how it ended.
    env_extra: more environment for the child (e.g. TORCHINDUCTOR_CACHE_DIR)."""
    env = {**os.environ, **CHILD_ENV, **(env_extra or {})}
    t0 = time.perf_counter()
    seen = 0
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: we stop exactly what we started
        ended = "exited"
        while proc.poll() is None:
            rows = train_rows(run_dir / "metrics.jsonl")
            for row in rows[seen:]:
                print(f"  step {row['step']}: " + ", ".join(f"{k} {row[k]}" for k in ROW_FIELDS if k in row) +
                      f" [{time.perf_counter() - t0:.0f}s]", flush=True)
            seen = len(rows)
            if seen >= steps:
                ended = "stopped after the last step"
                break
            if time.perf_counter() - t0 > timeout_s:
                ended = f"timeout ({timeout_s:.0f} s)"
                break
            time.sleep(1.0)
        if proc.poll() is None:
            stop_group(proc)
    rows = train_rows(run_dir / "metrics.jsonl")
    return {"rows": rows, "ended": ended, "returncode": proc.returncode, "wall_s": time.perf_counter() - t0}


def process_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc/PID/stat; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def child_pids(pid: int) -> dict[int, int]:
    """Direct children of `pid` -> their start times: torchrun's workers, which it puts in process groups of their
    own. The start time tells a worker from a later process that reuses its pid."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        info = process_start(int(stat.parent.name))
        if info is not None and info[0] == pid:
            out[int(stat.parent.name)] = info[1]
    return out


def stop_group(proc: subprocess.Popen) -> None:
    """Stop what we launched: SIGTERM to torchrun's process group (torchrun then stops its workers), SIGKILL after
    15 s; workers still alive after that (their own process groups) get SIGKILL by pid."""
    workers = child_pids(proc.pid)
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(1.0)
    for pid, started in workers.items():
        info = process_start(pid)
        if info is not None and info[1] == started:  # the same worker, still alive
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def summarize(model: str, shape: dict, rows: list[dict], episodes, tokenizer, cfg, nproc: int, peaks: dict) -> dict:
    """Per-phase means over the measured steps (all but the first; the first alone, flagged, when it is the only
    one logged), throughput, MFU, memory, sizes."""
    batch = cfg.train.batch_size
    measured = rows[1:] or rows[:1]
    out = {"model": model, "preset": cfg.preset, "steps_logged": len(rows), "steps_measured": len(measured),
           "warmup_only": len(rows) == 1, "warmup": rows[0] if rows else None,
           "missing_fields": sorted({k for r in rows for k in ROW_FIELDS if r.get(k) is None})}
    if not measured:
        return out
    world = measured[0].get("world_size") or nproc
    phases = {k: mean_of(measured, k) for k in ("step_s", "rollout_s", "score_s", "update_s")}
    known = [phases[k] for k in ("rollout_s", "score_s", "update_s")]
    phases["other_s"] = phases["step_s"] - sum(known) if None not in known and phases["step_s"] else None
    out.update(phases)
    out["step_s_min"] = min(r["step_s"] for r in measured)
    out["step_s_max"] = max(r["step_s"] for r in measured)
    out["world_size"] = world

    # per-token cost (issue 11): sums over the measured steps, so a step with more tokens weighs more
    for phase, tokens_key in (("score", "score_tokens"), ("update", "train_tokens")):
        secs = [r[f"{phase}_s"] for r in measured if r.get(f"{phase}_s") is not None and r.get(tokens_key)]
        toks = [r[tokens_key] for r in measured if r.get(f"{phase}_s") is not None and r.get(tokens_key)]
        out[f"{phase}_s_per_1k_tokens"] = 1000 * sum(secs) / sum(toks) if toks else None
    for key in ("memory_tokens", "memory_full", "answer_tokens"):  # what the lengths actually were
        out[key] = mean_of(measured, key)

    # sum of S^2: train.py's attn_len_sq; else simulated, which only knows uniform lengths (every turn at its budget)
    uniform = cfg.rollout.ignore_eos and not cfg.rollout.length_profile
    len_sq, sim_tokens = [], []
    for r in measured:
        if r.get("attn_len_sq") is not None:
            len_sq.append(r["attn_len_sq"])
            continue
        if not uniform:
            break
        end = r.get("cursor", r["step"] * batch)  # the problems of the step: cursor after it - batch (unshuffled)
        step_eps = [episodes[i % len(episodes)] for i in range(end - batch, end)]
        lengths = simulated_lengths(step_eps, tokenizer, cfg, seed=r["step"])
        len_sq.append(sum(s * s for s in lengths))
        sim_tokens.append(sum(lengths))
    out["attn_len_sq"] = statistics.mean(len_sq) if len(len_sq) == len(measured) else None
    tokens, resp = mean_of(measured, "train_tokens"), mean_of(measured, "response_tokens")
    out.update(train_tokens=tokens, response_tokens=resp, score_tokens=mean_of(measured, "score_tokens"),
               rollout_new_tokens=mean_of(measured, "rollout_new_tokens"))
    if sim_tokens and tokens:
        out["simulated_tokens_vs_measured"] = statistics.mean(sim_tokens) / tokens
    if tokens and resp and out["attn_len_sq"] is not None:
        fwd = forward_flops(shape, tokens, resp, out["attn_len_sq"])
        out["update_flops"] = 3 * fwd
        out["score_flops"] = fwd * (out["score_tokens"] or 0) / tokens  # one forward per scored copy of the batch
        if out["update_s"]:
            out["train_tokens_per_s_per_gpu"] = tokens / out["update_s"] / world
            out["update_tflops_per_gpu"] = out["update_flops"] / out["update_s"] / world / 1e12
            for name, peak in peaks.items():
                out[f"mfu_{name}"] = out["update_tflops_per_gpu"] / peak
        if out["score_s"] and out["score_flops"]:
            out["score_tflops_per_gpu"] = out["score_flops"] / out["score_s"] / world / 1e12
            for name, peak in peaks.items():
                out[f"score_mfu_{name}"] = out["score_tflops_per_gpu"] / peak
    if out["rollout_new_tokens"] and out["rollout_s"]:
        out["rollout_tokens_per_s_per_gpu"] = out["rollout_new_tokens"] / out["rollout_s"] / world
    mems = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None]
    out["peak_mem_gib"] = max(mems) if mems else None
    steps_per_epoch = math.ceil(GSM8K_TRAIN_PROBLEMS / batch)
    out["ten_epochs_h"] = EPOCHS * steps_per_epoch * phases["step_s"] / 3600
    out["steps_per_epoch"] = steps_per_epoch
    return out


def length_ratios(results: list[dict]) -> list[dict]:
    """Per-token cost at real over uniform lengths, for each (model, compile_train) that has both measured."""
    out = []
    for real in results:
        if real.get("lengths") != "real":
            continue
        uniform = next((u for u in results if u.get("lengths") == "uniform" and u["model"] == real["model"]
                        and u.get("compile_train") == real.get("compile_train")), None)
        if uniform is None:
            continue
        row = {"model": real["model"], "compile_train": real.get("compile_train", False)}
        for phase in ("score", "update"):
            a, b = real.get(f"{phase}_s_per_1k_tokens"), uniform.get(f"{phase}_s_per_1k_tokens")
            row[f"{phase}_ratio"] = a / b if a and b else None
        out.append(row)
    return out


def environment(nproc: int) -> dict:
    import torch
    import transformers
    import triton

    cuda = torch.cuda.is_available()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
            "gpus": torch.cuda.device_count() if cuda else 0, "nproc": nproc, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run(args, passthrough: list[str]) -> int:
    import torch

    from memrl.config import parse_cli
    from memrl.episodes import load_episodes
    from memrl.tokenizer import Tokenizer

    t_start = time.perf_counter()
    prepared = Path(args.prepared).resolve()
    episodes_path, tokenizer_dir = prepared / EPISODES, prepared / TOKENIZER
    if not episodes_path.is_file() or not (tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"{prepared}: run `python -m benchmarks.bench_step prepare --out {args.prepared}` first")
    real_ckpt = Path(args.model_path).resolve() if args.model_path else None
    if real_ckpt is not None and not (real_ckpt / "config.json").is_file():
        sys.exit(f"--model-path {real_ckpt}: no config.json (an HF checkpoint directory is expected)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.nproc)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gemm = measure_gemm(device)
    peaks = {"gemm": gemm}
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in env["device"]), None)
    if spec is not None:
        peaks["spec"] = spec
    print(f"{'bf16 GEMM 8192^3' if device.type == 'cuda' else 'fp32 GEMM 1024^3'}: {gemm:.3g} TFLOP/s"
          + (f" | spec dense bf16 peak {spec:.0f} TFLOP/s" if spec else ""), flush=True)
    if real_ckpt is not None:  # a real model: its own shape, tokenizer and end tokens
        models = ["path"]
        specs = {"path": dict(preset=args.preset, shape=json.loads((real_ckpt / "config.json").read_text()), steps=3,
                              timeout_s=420, dtype="bfloat16", extra=[])}
        tokenizer = Tokenizer.from_pretrained(real_ckpt)
    else:
        models = ["1.5b", "4b"] if args.model == "both" else [args.model]
        specs = MODELS
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    results = {"env": env, "peaks_tflops": peaks, "models": [], "profile": args.profile,
               "model_path": str(real_ckpt) if real_ckpt else None}
    episodes = load_episodes(episodes_path)
    checkpoints: dict[str, Path] = {}  # one random checkpoint per model, shared by its variants
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))  # checkpoints and run dirs stay out of --out
    try:
        for v in variants(models, args.lengths, args.compile_train):
            spec_m = specs[v.model]
            steps = args.steps or spec_m["steps"]
            shape = dict(spec_m["shape"])
            if v.model == "tiny":
                shape["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
            tag = v.label.replace(" +", "_").replace(" ", "_")
            res = {"model": v.model, "label": v.label, "lengths": v.lengths, "compile_train": v.compile_train}
            try:
                if v.model not in checkpoints:
                    t = time.perf_counter()
                    checkpoints[v.model] = real_ckpt or make_checkpoint(shape, tokenizer_dir, work / f"ckpt_{v.model}",
                                                                        spec_m["dtype"])
                    print(f"[{v.model}] checkpoint ready in {time.perf_counter() - t:.0f} s", flush=True)
                flags = v.flags(args.profile) + [f"--rollout.compile={args.generator_compile}"]
                run_dir = work / f"run_{tag}"
                cmd = train_command(spec_m, checkpoints[v.model], episodes_path, run_dir, args.nproc, steps, flags,
                                    passthrough)
                cfg = parse_cli(cmd[cmd.index(str(REPO / "train.py")) + 1:])
                log_path = out / f"train_{tag}.log"
                left = args.budget - (time.perf_counter() - t_start) - 10  # 10 s to stop the child and write
                if left < 60:
                    raise RuntimeError(f"skipped: {left:.0f} s left of the {args.budget:.0f} s budget")
                print(f"[{v.label}] launching train.py (nproc {args.nproc}, {steps} steps)", flush=True)
                child = launch(cmd, run_dir, steps, min(args.timeout or spec_m["timeout_s"], left), log_path)
                rc = f" (exit code {child['returncode']})" if child["ended"] == "exited" else ""
                print(f"[{v.label}] train.py {child['ended']}{rc} after {child['wall_s']:.0f} s; log {log_path}",
                      flush=True)
                for name in ("metrics.jsonl", "run_config.json"):
                    if (run_dir / name).is_file():
                        shutil.copy2(run_dir / name, out / f"{tag}_{name}")
                res.update(summarize(v.model, shape, child["rows"], episodes, tokenizer, cfg, args.nproc, peaks))
                res.update(label=v.label, ended=child["ended"], returncode=child["returncode"],
                           child_wall_s=child["wall_s"], command=" ".join(cmd),
                           sizes=sizes(cfg, child["rows"], episodes))
                if not child["rows"]:
                    why = "before the timeout" if child["ended"].startswith("timeout") else f"({root_cause(log_path)})"
                    res["error"] = f"no step logged {why}; see {log_path}"
            except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others' results
                res["error"] = repr(e)
            finally:
                shutil.rmtree(work / f"run_{tag}", ignore_errors=True)
            if res.get("error"):
                print(f"[{v.label}] FAILED: {res['error']}", flush=True)
            results["models"].append(res)
            results["length_ratios"] = length_ratios(results["models"])
            write(results, out)  # after every launch, so a later crash keeps the earlier table
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    print("\n" + write(results, out))
    return 0 if all(not m.get("error") and m.get("steps_measured") for m in results["models"]) else 1


def sizes(cfg, rows: list[dict], episodes) -> dict:
    """Problems x G per step and the mean shards of the problems the logged steps used."""
    batch = cfg.train.batch_size
    used = [episodes[i % len(episodes)] for r in rows
            for i in range(r.get("cursor", r["step"] * batch) - batch, r.get("cursor", r["step"] * batch))]
    return {"problems": batch, "group_size": cfg.rollout.group_size, "memory_cap": cfg.rollout.memory_cap_tokens,
            "response_max": cfg.rollout.response_max_tokens, "micro_batch_tokens": cfg.train.micro_batch_tokens,
            "kl_coef": cfg.algo.kl_coef, "shards_per_problem": statistics.mean(len(e.shards) for e in used)
            if used else None}


def root_cause(path: Path) -> str:
    """The first exception line a worker printed (torchrun's own report comes after it), else the log's last line."""
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines() if path.is_file() else []
    for line in lines:
        if re.match(r"^[\w.]*(Error|Exception)\b", line) and not line.startswith("torch.distributed.elastic"):
            return line.strip()
    return lines[-1].strip() if lines else "(empty log)"


def fmt(v, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def write(results: dict, out: Path) -> str:
    """bench_step.json + bench_step.md under out; returns the markdown."""
    (out / "bench_step.json").write_text(json.dumps(results, indent=2) + "\n")
    e, p = results["env"], results["peaks_tflops"]
    lines = ["# Step benchmark (train.py" + (f", {results['model_path']}" if results.get("model_path") else
                                              ", random weights") + ")", "",
             f"{e['nproc']} x {e['device']} ({e['gpus']} visible) | torch {e['torch']} (CUDA {e['cuda']}) | triton "
             f"{e['triton']} | transformers {e['transformers']} | {e['date']}", "",
             f"Peaks: measured GEMM {p['gemm']:.3g} TFLOP/s" + (f", spec {p['spec']:.0f} TFLOP/s" if "spec" in p
                                                                  else "") + ".", "",
             "| run | steps | step s | rollout | scoring | update | other | train tok/s/GPU | rollout tok/s/GPU | "
             "update TFLOP/s/GPU | MFU spec | MFU GEMM | peak GiB/GPU | 10 epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        label = m.get("label", m["model"])
        if not m.get("steps_measured"):
            lines.append(f"| {label} | {m.get('steps_logged', 0)} logged, none measured | " + " | ".join(
                ["-"] * 12) + " |")
            continue
        steps = "warm-up only" if m["warmup_only"] else m["steps_measured"]
        lines.append(
            f"| {label} | {steps} | {fmt(m['step_s'])} ({fmt(m['step_s_min'])}-{fmt(m['step_s_max'])}) | "
            f"{fmt(m['rollout_s'])} | {fmt(m['score_s'])} | {fmt(m['update_s'])} | "
            f"{fmt(m['other_s'])} | {fmt(m.get('train_tokens_per_s_per_gpu'), ',.0f')} | "
            f"{fmt(m.get('rollout_tokens_per_s_per_gpu'), ',.0f')} | {fmt(m.get('update_tflops_per_gpu'), '.3g')} | "
            f"{fmt(m.get('mfu_spec'), '.0%')} | {fmt(m.get('mfu_gemm'), '.0%')} | {fmt(m['peak_mem_gib'])} | "
            f"{fmt(m['ten_epochs_h'])} h |")
    lines += ["", "Times in seconds, means over the measured steps (step 1 is the warm-up, below); other = step - "
              "rollout - scoring - update. MFU = update model FLOPs / update s / GPUs / peak (docstring: 6N on "
              f"linear layers, lm_head on response rows, causal attention per sequence). 10 epochs = "
              f"{EPOCHS} x ceil({GSM8K_TRAIN_PROBLEMS:,} / problems) steps at the mean step time; the paper: "
              f"~{PAPER_STEP_S:.0f} s/step, ~30 h on 2 x A100.", ""]
    measured = [m for m in results["models"] if m.get("steps_measured")]
    if measured:
        lines += ["Per token (sums over the measured steps; lengths as train.py logged them; real = "
                  + ("the model's own EOS" if results.get("model_path") else
                     f"length profile {results.get('profile')}") + "):", "",
                  "| run | update tokens/step | scoring s / 1k tok | update s / 1k tok | memory turn tokens | "
                  "memory turns at the cap | answer tokens |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m.get('label', m['model'])} | {fmt(m.get('train_tokens'), ',.0f')} | "
                  f"{fmt(m.get('score_s_per_1k_tokens'), '.4f')} | {fmt(m.get('update_s_per_1k_tokens'), '.4f')} | "
                  f"{fmt(m.get('memory_tokens'), '.1f')} | {fmt(m.get('memory_full'), '.1%')} | "
                  f"{fmt(m.get('answer_tokens'), '.1f')} |" for m in measured]
        for r in results.get("length_ratios", []):
            lines.append(f"\n**{r['model']}{' +compile_train' if r['compile_train'] else ''}: per-token cost real / "
                         f"uniform = scoring {fmt(r['score_ratio'], '.2f')}, update {fmt(r['update_ratio'], '.2f')}** "
                         f"(issue 11 target <= 1.3)")
        lines.append("")
    for m in results["models"]:
        s = m.get("sizes") or {}
        lines.append(f"**{m.get('label', m['model'])}** ({m.get('preset', '')}): " + (
            f"{s.get('problems')} problems x G = {s.get('group_size')}, {fmt(s.get('shards_per_problem'), '.2f')} "
            f"shards per problem, memory {s.get('memory_cap')}, answer {s.get('response_max')}, micro-batch "
            f"{s.get('micro_batch_tokens')} tokens, kl_coef {s.get('kl_coef')}; per step: "
            f"{fmt(m.get('train_tokens'), ',.0f')} tokens through the update ({fmt(m.get('response_tokens'), ',.0f')} "
            f"response), {fmt(m.get('score_tokens'), ',.0f')} scored, {fmt(m.get('rollout_new_tokens'), ',.0f')} "
            f"generated; scoring {fmt(m.get('score_tflops_per_gpu'), '.3g')} TFLOP/s/GPU "
            f"({fmt(m.get('score_mfu_spec'), '.0%')} of spec); attention length estimate sum S / measured tokens "
            f"{fmt(m.get('simulated_tokens_vs_measured'), '.3f')}" if s else ""))
        w = m.get("warmup")
        if w:
            lines.append(f"  warm-up step: {w.get('step_s')} s (rollout {w.get('rollout_s')}, scoring "
                         f"{w.get('score_s')}, update {w.get('update_s')}), peak {w.get('peak_mem_gib')} GiB.")
            if w.get("first_step_s"):
                lines.append("  first step parts (train.py first_step_s): " + ", ".join(
                    f"{k} {v}" for k, v in w["first_step_s"].items()) + ".")
        if m.get("ended"):
            rc = f", exit code {m.get('returncode')}" if m["ended"] == "exited" else ""
            lines.append(f"  train.py {m['ended']}{rc}, {fmt(m.get('child_wall_s'), '.0f')} s from launch.")
        if m.get("missing_fields"):
            lines.append(f"  metrics.jsonl lacks {', '.join(m['missing_fields'])} (train.py predates the contract).")
        if m.get("error"):
            lines.append(f"  FAILED: {m['error'].splitlines()[0]}")
        lines.append("")
    if "wall_s" in results:
        lines.append(f"Wall time {results['wall_s']:.0f} s.")
    text = "\n".join(lines) + "\n"
    (out / "bench_step.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="episodes + tokenizer (CPU, seconds)")
    p.add_argument("--data", required=True, help="GSM8K train JSONL (../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--out", default=".bench")
    p.add_argument("--problems", type=int, default=256, help="first N problems, rule-sharded")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--wikitext", default="", help="extra tokenizer text (default: DATA/../../wikitext2/wiki.test.raw)")
    r = sub.add_parser("run", help="random checkpoint + train.py under torchrun + the table")
    r.add_argument("--prepared", default=".bench")
    r.add_argument("--model", choices=("1.5b", "4b", "both", "tiny"), default="both")
    r.add_argument("--model-path", default="", help="a real HF checkpoint directory (config.json, safetensors, "
                   "tokenizer) instead of random weights: real lengths = its own EOS; replaces --model")
    r.add_argument("--preset", default="paper-1.5b", help="train.py preset for --model-path")
    r.add_argument("--lengths", choices=("both", "uniform", "real"), default="both",
                   help="uniform: every turn to its budget; real: the length profile (random weights) or EOS")
    r.add_argument("--profile", default=DEFAULT_PROFILE, help="rollout.length_profile of the real-length runs")
    r.add_argument("--compile-train", choices=("off", "on", "both"), default="off",
                   help="model.compile_train: torch.compile each decoder block for scoring and the update")
    r.add_argument("--generator-compile", choices=("decode", "all", "layers", "none"), default="layers",
                   help="rollout.compile: what the rollout's generator compiles")
    r.add_argument("--nproc", type=int, default=2)
    r.add_argument("--steps", type=int, default=0, help="steps incl. the warm-up (default: 1.5b 3, 4b 2, tiny 3)")
    r.add_argument("--timeout", type=float, default=0, help="seconds per train.py (default: 1.5b 220, 4b 280)")
    r.add_argument("--budget", type=float, default=560, help="seconds for the whole command: a later model's "
                   "train.py gets what is left (the device allows 10 minutes per command)")
    r.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return run(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
