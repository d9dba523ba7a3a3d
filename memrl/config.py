"""Run configuration: dataclasses with asserted invariants, named presets, `--key=value` overrides, JSON in/out.

    cfg = parse_cli(["--preset=paper-1.5b", "--algo.kl_coef=0.01", "--batch_size=32", "--resume"])
    save_config(cfg, run_dir / RUN_CONFIG_NAME)            # the resolved config, saved with every run
    cfg = load_config(run_dir / RUN_CONFIG_NAME)

Override syntax (one argument each, applied left to right after the preset):
    --section.key=value   canonical, e.g. --algo.kl_coef=0.01, --rollout.group_size=8
    --key=value           accepted when `key` names a field of exactly one section (--kl_coef=0.01)
    --key                 for a bool field: True; `--resume` alone means --train.resume=latest
    --preset=NAME         the base config (first; default "default"); --config=PATH loads a saved JSON as the base
Values are parsed by the field's type (bool: true/false/1/0/yes/no; tuples: comma-separated); a wrong type or an
unknown key raises ConfigError naming the key. Each field's own range is checked on every change (numbers must be
finite: `inf` and `nan` parse as floats, and an infinite learning rate or temperature trains silently on garbage);
rules between fields (Config.check) once all overrides are applied, so their order does not matter.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from memrl.atomic import write_text_atomic
from memrl.attention import ATTENTION_BACKENDS
from memrl.episodes import REWARD_KINDS
from memrl.errors import ConfigError
from memrl.length_profile import PROFILES
from memrl.noise import TRAIN_VARIANTS
# The turn templates (DESIGN §4) live in memrl.templates; here they are data, overridable like any other field.
from memrl.templates import (CONVERSATION_FINAL_TEMPLATE, CONVERSATION_SHARD_TEMPLATE, FINAL_TEMPLATE,
                             MEMORY_TEMPLATE, PLACEHOLDERS, REASONED_FINAL_TEMPLATE, REASONED_SINGLE_TURN_TEMPLATE,
                             INITIAL_MEMORY, SINGLE_TURN_TEMPLATE, without_memory_line)

NO_EVAL = "none"  # data.eval_path=none: no held-out evaluation during training

RUN_CONFIG_NAME = "run_config.json"

# What the model sees at each turn (memrl/rollout.py plays them; README, "Conditions"), in the order of the tables:
# whole problem -> sharded. full_history: the paper's evaluation condition (shards in the prompt); conversation: the
# real multi-turn chat the full-history baseline trains on.
CONDITIONS = ("single_turn", "full_history", "conversation", "memory")
TRAIN_CONDITIONS = ("memory", "conversation", "single_turn")  # rollout.condition; full_history evaluates only
EVAL_CONDITIONS = ("single_turn", "full_history", "memory")  # the paper's three (§4): evaluate.py's default


def in_range(value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> bool:
    """finite and within [lo, hi] (an open end excludes the bound); False for nan and ±inf."""
    if not math.isfinite(value):
        return False
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


# Sampling temperature bounds. Below 0.05 a logit gap of 1 becomes 20 (the runner-up token has probability ~2e-9):
# sampling is greedy in all but name, every sample of a group is the same, every advantage 0, nothing is learned
# (use greedy decoding for that). Above 10 even a gap of 10 becomes 1: the samples approach uniform noise over the
# vocabulary, and the log-probs' gradient shrinks as 1/T. Both ends train silently on nothing.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 10.0


@dataclass
class ModelCfg:
    path: str = ""  # HF checkpoint dir or hub id; "" = the repo's built-in synthetic starting policy
    dtype: str = "float32"  # the COMPUTE dtype. bfloat16 (paper presets): fp32 master weights + AdamW state, bf16
    # forward/backward and rollout (FSDP2 mixed precision, also on one process); float32: everything fp32
    ref_path: str = ""  # frozen KL reference; "" = the starting weights (`path`), as in verl/MemAgent
    gradient_checkpointing: bool = False  # recompute block activations in backward: memory for ~1/3 more compute
    compile_train: bool = False  # torch.compile each block's RMSNorms and SwiGLU MLP for scoring and the update
    # (memrl/compile.py): fused elementwise work; compiles once (seconds to tens of seconds) in the first step
    attention: str = "auto"  # packed micro-batches: auto | triton | flash | flex | padded | dense (memrl/attention.py)

    def __post_init__(self):
        assert self.dtype in ("float32", "bfloat16", "float16"), f"model.dtype: unknown dtype {self.dtype!r}"
        assert self.attention in ATTENTION_BACKENDS, f"model.attention: {self.attention!r} not in {ATTENTION_BACKENDS}"


@dataclass
class RolloutCfg:
    # Not full_history: that is the paper's evaluation condition (shards in the prompt, evaluate.py)
    condition: str = "memory"  # memory (the method) | conversation (full-history baseline: a real chat) | single_turn
    group_size: int = 4  # G trajectories per problem (paper §4: G = 4)
    memory_cap_tokens: int = 256  # paper A.1: the memory buffer cap, enforced as a memory turn's max_new_tokens
    response_max_tokens: int = 512  # paper A.1: final-answer budget (512 for the 1.5B model, 1,024 for the 4B)
    temperature: float = 1.0  # DESIGN §5: sample from the policy itself, so π_old is what generated the tokens
    top_p: float = 1.0  # no truncation, for the same reason
    top_k: int = 0  # 0 = off
    eval_greedy: bool = True  # evaluation decodes greedily: a deterministic accuracy, comparable across runs
    eval_samples: int = 0  # > 0: evaluation also samples k trajectories per problem as training does (seeded)
    ignore_eos: bool = False  # benchmarks only: every turn runs to its full token budget (random weights never stop)
    thinking_budget_tokens: int = 0  # thinking models: room for <think> reasoning on top of each turn's budget;
    # the memory / answer after the reasoning keeps its own cap (memrl/rollout.py says why)
    compile: str = "layers"  # what the generator torch.compiles: layers (each decoder layer's work around its
    # attention in the decode step, one compile shared by all layers, memrl/compile.py: 1.5B on an H200, 4.4 s
    # instead of 41 s in the first step, the same 4.0 ms decode step) | decode (the whole decode step as one graph)
    # | all (decode + prefill) | none. The prefill stays eager but with `all` (memrl/model_runner.py "torch.compile")
    length_profile: str = ""  # benchmarks, with ignore_eos: each request stops at a length drawn from this named
    # distribution (memrl/length_profile.py: a real model's lengths) instead of its full budget; "" = off
    initial_memory: str = INITIAL_MEMORY  # the fixed memory m_0 shown at the first turn ("No previous memory.")
    memory_template: str = MEMORY_TEMPLATE  # paper Figure 4 (memory turn)
    final_template: str = FINAL_TEMPLATE  # paper Figure 4 (final turn); full-history fills {memory} with all shards
    single_turn_template: str = SINGLE_TURN_TEMPLATE  # the single-turn baseline: the whole problem in one prompt
    conversation_shard_template: str = CONVERSATION_SHARD_TEMPLATE  # conversation: a shard's user message
    conversation_final_template: str = CONVERSATION_FINAL_TEMPLATE  # conversation: the final user message

    def generator_options(self) -> dict:
        """The Generator's compile arguments for `compile` (train.py's and evaluate.py's generators)."""
        return dict(compile=None if self.compile != "none" else False, compile_prefill=self.compile == "all",
                    compile_layers=self.compile == "layers")

    def __post_init__(self):
        assert self.condition != "full_history", (
            "rollout.condition: full_history is the paper's evaluation condition (all shards so far in one prompt; "
            "evaluate.py --conditions=full_history); train the full-history baseline with rollout.condition="
            "conversation (a real multi-turn chat)")
        assert self.condition in TRAIN_CONDITIONS, (
            f"rollout.condition must be one of {TRAIN_CONDITIONS}, got {self.condition!r}")
        assert self.group_size >= 1, "rollout.group_size must be >= 1"
        assert self.memory_cap_tokens >= 1 and self.response_max_tokens >= 1, "token budgets must be positive"
        assert self.thinking_budget_tokens >= 0, "rollout.thinking_budget_tokens must be >= 0"
        assert in_range(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE), (
            f"rollout.temperature: must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (colder samples greedily: no "
            f"exploration, no advantage; hotter samples noise), got {self.temperature}")
        assert in_range(self.top_p, 0, 1, lo_open=True), f"rollout.top_p: must be in (0, 1], got {self.top_p}"
        assert self.top_k >= 0, "rollout.top_k must be >= 0"
        assert self.eval_samples >= 0, "rollout.eval_samples must be >= 0"
        assert self.compile in ("decode", "all", "layers", "none"), \
            f"rollout.compile: {self.compile!r} (decode | all | layers | none)"
        assert not self.length_profile or self.ignore_eos, "rollout.length_profile needs rollout.ignore_eos=true"
        assert not self.length_profile or self.length_profile in PROFILES, (
            f"rollout.length_profile: unknown {self.length_profile!r}; known: {sorted(PROFILES)}")
        for kind, keys in PLACEHOLDERS.items():
            missing = ["{" + k + "}" for k in keys if "{" + k + "}" not in getattr(self, f"{kind}_template")]
            assert not missing, f"rollout.{kind}_template lacks the placeholder(s) {missing}"


@dataclass
class AlgoCfg:
    advantage: str = "drgrpo"  # drgrpo: r − mean (paper §4); grpo: (r − mean) / (std + 1e-6)
    eps_low: float = 0.2  # PPO clip below 1 (DAPO)
    eps_high: float = 0.28  # clip-higher (DAPO §3.1): more room for low-probability tokens to grow
    clip_c: float = 3.0  # dual-clip bound on the loss for A < 0 (verl default; the DAPO recipe uses 10)
    kl_coef: float = 0.001  # β of the KL penalty to the frozen reference (paper §4 / MemAgent)
    kl_type: str = "k3"  # k3 = exp(k) − k − 1: unbiased and always >= 0 (Schulman, "Approximating KL")
    dynamic_sampling: bool = False  # DAPO: drop all-equal-reward groups and refill (off by default, DESIGN §5)
    max_sampling_rounds: int = 3  # bound on refill rounds (verl's max_num_gen_batches) before giving up loudly
    overlong_shaping: bool = False  # DAPO soft overlong penalty on the final answer (off by default, DESIGN §5)
    overlong_cache_tokens: int = 128  # L_cache: the last quarter of the 512-token answer budget is penalised
    # optimizer steps per RL step, over mini-batches split by problem (memrl/algo.py; MemAgent: 16)
    mini_batches: int = 1  # 1 = one on-policy step: π_old = logp.detach(), ratio ≡ 1, the clips never act (§3.6)
    # rollout correction (memrl/algo.py), off by default; the mismatch metrics are logged either way
    tis_cap: float = 0.0  # C of token-level truncated IS, min(π_train/π_rollout, C) (Yao et al. 2025: 2); 0 = off
    seq_mask: bool = False  # drop sequences whose geometric-mean ratio exp(mean log(π_train/π_rollout)) leaves:
    seq_mask_low: float = 0.999  # [low, high] (verl's geometric rejection sampling: ~1 ± 1e-3)
    seq_mask_high: float = 1.001  # upper bound of the geometric-mean ratio

    def __post_init__(self):
        assert self.advantage in ("drgrpo", "grpo"), f"algo.advantage: {self.advantage!r}"
        assert in_range(self.eps_low, 0, 1, hi_open=True), f"algo.eps_low: must be in [0, 1), got {self.eps_low}"
        assert in_range(self.eps_high, 0, 10), f"algo.eps_high: must be in [0, 10], got {self.eps_high}"
        assert in_range(self.clip_c, 1, 1e6, lo_open=True), f"algo.clip_c: must be finite and > 1, got {self.clip_c}"
        assert in_range(self.kl_coef, 0, 1e6), f"algo.kl_coef: must be finite and >= 0, got {self.kl_coef}"
        assert self.kl_type in ("k1", "k2", "k3"), f"algo.kl_type: k1|k2|k3, got {self.kl_type!r}"
        assert self.max_sampling_rounds >= 1, "algo.max_sampling_rounds must be >= 1"
        assert self.overlong_cache_tokens >= 1, "algo.overlong_cache_tokens must be >= 1"
        assert self.mini_batches >= 1, "algo.mini_batches must be >= 1"
        assert self.tis_cap == 0 or self.tis_cap >= 1, "algo.tis_cap must be 0 (off) or >= 1 (a cap below 1 would "\
            "down-weight on-policy tokens)"
        assert 0 < self.seq_mask_low <= 1 <= self.seq_mask_high, "algo.seq_mask_low <= 1 <= algo.seq_mask_high"

    @property
    def rollout_correction(self) -> bool:
        return self.tis_cap > 0 or self.seq_mask


@dataclass
class OptimCfg:
    lr: float = 1e-6  # paper §4 / MemAgent: small, constant after warmup
    warmup_steps: int = 10  # paper A.1: linear warmup, then constant
    weight_decay: float = 0.01  # DESIGN §5 (verl's AdamW default)
    grad_clip: float = 1.0  # global grad-norm clip (DESIGN §5)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW defaults
    adam_eps: float = 1e-8  # AdamW default

    def __post_init__(self):
        # AdamW moves each weight by about lr per step (|m̂/√v̂| is of order 1): lr > 1 rewrites every weight by
        # more than its own scale each step
        assert in_range(self.lr, 0, 1, lo_open=True), f"optim.lr: must be in (0, 1], got {self.lr}"
        assert self.warmup_steps >= 0, "optim.warmup_steps must be >= 0"
        assert in_range(self.weight_decay, 0, 1), f"optim.weight_decay: must be in [0, 1], got {self.weight_decay}"
        assert in_range(self.grad_clip, 0, 1e6, lo_open=True), f"optim.grad_clip: must be finite and > 0, got " \
                                                               f"{self.grad_clip}"
        assert len(self.betas) == 2 and all(in_range(b, 0, 1, hi_open=True) for b in self.betas), (
            f"optim.betas: must be two values in [0, 1), got {self.betas}")
        # >= 1e-20 keeps lr·grad_clip/adam_eps, the bound on one AdamW step, far below fp32's limit (step_guard.py)
        assert in_range(self.adam_eps, 1e-20, 1), f"optim.adam_eps: must be in [1e-20, 1], got {self.adam_eps}"


@dataclass
class DataCfg:
    train_path: str = ""  # episodes JSONL (memrl.episodes); "" = the built-in synthetic task
    eval_path: str = ""  # held-out episodes JSONL; "" = the synthetic task's held-out split
    reward_kind: str = "gsm8k"  # memrl.reward.score kind unless an episode's metadata.reward_kind says otherwise
    max_shards: int = 35  # paper A.1: bounds the trajectory length
    max_shard_tokens: int = 1024  # paper A.1
    noise_path: str = ""  # WikiText file for noise shards; "" = no noise
    noise_variant: str = "sharded"  # training variant (paper §3.1): sharded | full_question | mixed
    eval_noise_shards: int = 0  # noisy evaluation: n noise shards between turns (paper: 2, 4)
    eval_limit: int = 0  # evaluate on the first n episodes; 0 = all
    shuffle: bool = True  # reshuffle the training episodes each epoch (seeded: train.seed, epoch)

    def __post_init__(self):
        assert self.reward_kind in REWARD_KINDS, f"data.reward_kind: {self.reward_kind!r} not in {REWARD_KINDS}"
        assert self.max_shards >= 1 and self.max_shard_tokens >= 1, "data.max_shards, max_shard_tokens must be >= 1"
        assert self.noise_variant in TRAIN_VARIANTS, f"data.noise_variant: {self.noise_variant} not in {TRAIN_VARIANTS}"
        assert self.eval_noise_shards >= 0 and self.eval_limit >= 0, "data.eval_noise_shards, eval_limit must be >= 0"


@dataclass
class TrainCfg:
    run_dir: str = "runs/default"  # metrics.jsonl, run_config.json and checkpoints/ go here
    seed: int = 0  # the one seed; per (step, problem, sample) seeds derive from it (STYLE 10)
    batch_size: int = 64  # problems per step (paper A.1), each with group_size trajectories
    epochs: int = 10  # paper A.1
    max_steps: int = 0  # 0 = as many as `epochs` passes over the data take
    micro_batch_tokens: int = 16384  # packed rows per forward/backward; bounds activation memory
    pack_by_length: bool = False  # micro-batches of similar record lengths (algo.pack_turns); off until measured
    eval_every: int = 0  # steps between held-out evaluations; 0 = only before and after training
    eval_at_start: bool = True  # evaluate the starting policy before step 1 (benchmarks turn it off)
    save_every: int = 50  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted after a successful save)
    log_every: int = 1  # steps between metrics.jsonl lines
    tracker: str = "none"  # none | tensorboard | wandb: also send each metrics row there (memrl/trackers.py)
    tracker_project: str = "memrl"  # the W&B project (the key comes from WANDB_API_KEY, never from the config)
    device: str = "auto"  # auto = cuda when available, else cpu
    resume: str = field(default="", metadata={"flag": "latest"})  # "" | latest | a checkpoint dir
    dump_loss_inputs: str = ""  # tests / debugging: save every micro-batch's loss inputs and outputs in this dir
    allow_config_change: str = ""  # keys (comma-separated) --resume may change beyond run_dir.RESUME_MAY_CHANGE
    max_skipped_steps: int = 3  # stop after this many steps in a row whose update was non-finite (memrl/step_guard.py)
    cpu_threads: int = 0  # torch threads on CPU; 0 = $OMP_NUM_THREADS if set, else 1 (README: why one thread)

    def __post_init__(self):
        assert self.batch_size >= 1 and self.epochs >= 1, "train.batch_size, epochs must be >= 1"
        assert self.max_steps >= 0 and self.eval_every >= 0 and self.save_every >= 0, "step counts must be >= 0"
        assert self.micro_batch_tokens >= 1, "train.micro_batch_tokens must be >= 1"
        assert self.keep_last >= 1 and self.log_every >= 1, "train.keep_last, log_every must be >= 1"
        assert self.tracker in ("none", "tensorboard", "wandb"), f"train.tracker: {self.tracker!r}"
        assert self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"train.device: {self.device}"
        assert self.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1"
        assert self.cpu_threads >= 0, "train.cpu_threads must be >= 0 (0 = automatic)"


@dataclass
class Config:
    preset: str = "default"  # which preset this config started from (recorded for the run)
    model: ModelCfg = field(default_factory=ModelCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    algo: AlgoCfg = field(default_factory=AlgoCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def check(self) -> "Config":
        """Rules between fields, checked once every override is applied (so `--a=x --b=y` and `--b=y --a=x` agree)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(not self.algo.dynamic_sampling or self.rollout.group_size >= 2,
             "--algo.dynamic_sampling: needs rollout.group_size >= 2 (a group of one always has equal rewards)")
        need(self.algo.overlong_cache_tokens <= self.rollout.response_max_tokens or not self.algo.overlong_shaping,
             "--algo.overlong_cache_tokens: must not exceed rollout.response_max_tokens")
        need(self.data.noise_variant == "sharded" or bool(self.data.noise_path),
             f"--data.noise_variant={self.data.noise_variant}: needs data.noise_path (the WikiText noise file)")
        need(self.data.eval_noise_shards == 0 or bool(self.data.noise_path),
             "--data.eval_noise_shards: > 0 needs data.noise_path (the WikiText noise file)")
        need(self.algo.mini_batches <= self.train.batch_size,
             f"--algo.mini_batches={self.algo.mini_batches}: exceeds train.batch_size={self.train.batch_size} (a "
             f"mini-batch holds whole problems)")
        keys = _all_keys(self)
        for key in filter(None, (k.strip() for k in self.train.allow_config_change.split(","))):
            need(key in keys, f"--train.allow_config_change: {key!r} is not a config key (write them as section.key)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "rollout", "algo", "optim", "data", "train")
# keys that no longer exist, with what replaced them (a saved config or a command line naming one gets this)
RENAMED = {"algo.updates_per_rollout": "algo.mini_batches (optimizer steps per RL step, over mini-batches split by "
                                       "problem; the old key re-ran the whole batch)"}


# ----------------------------------------------------------------------------- presets

def _default() -> Config:
    # The built-in CPU run (issue 14): the shipped 0.6M-parameter policy (assets/synthetic-policy) on the synthetic
    # coin-sum task (memrl/synthetic.py). Every value that differs from the paper is listed, with its reason, in the
    # README's "The default run". Templates: the task's own (shorter than Figure 4; the policy learnt them).
    from memrl import synthetic

    return Config(
        preset="default",
        model=ModelCfg(path="", dtype="float32"),
        rollout=RolloutCfg(group_size=8, memory_cap_tokens=40, response_max_tokens=56, eval_samples=4,
                           memory_template=synthetic.MEMORY_TEMPLATE, final_template=synthetic.FINAL_TEMPLATE,
                           single_turn_template=synthetic.SINGLE_TURN_TEMPLATE),
        # no reference model: half the scoring cost on a CPU; one on-policy optimizer step per RL step (mini_batches
        # 1), the setting the README's default-run numbers were measured with
        algo=AlgoCfg(kl_coef=0.0),
        optim=OptimCfg(lr=8e-4, warmup_steps=5, weight_decay=0.0),
        data=DataCfg(reward_kind="gsm8k", max_shards=8, max_shard_tokens=64, eval_limit=128),
        train=TrainCfg(run_dir="runs/default", batch_size=16, max_steps=20, micro_batch_tokens=2048,
                       eval_every=5, save_every=0),
    )


def _paper_1_5b() -> Config:
    # The paper's 1.5B run (§4, appendix A.1): sharded GSM8K, 10 epochs, batch 64, G = 4, memory 256, answer 512.
    # 16 mini-batches of 4 problems per RL step, as MemAgent (the verl recipe the paper builds on) runs it.
    return Config(
        preset="paper-1.5b",
        model=ModelCfg(path="Qwen/Qwen2.5-Math-1.5B-Instruct", dtype="bfloat16"),
        # final / single-turn prompts that ask for reasoning and \boxed{} (memrl/templates.py says why)
        rollout=RolloutCfg(group_size=4, memory_cap_tokens=256, response_max_tokens=512,
                           final_template=REASONED_FINAL_TEMPLATE, single_turn_template=REASONED_SINGLE_TURN_TEMPLATE,
                           conversation_final_template=without_memory_line(REASONED_FINAL_TEMPLATE)),
        algo=AlgoCfg(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.001, kl_type="k3", mini_batches=16),
        optim=OptimCfg(lr=1e-6, warmup_steps=10),
        data=DataCfg(reward_kind="gsm8k", max_shards=35, max_shard_tokens=1024),
        train=TrainCfg(run_dir="runs/paper-1.5b", batch_size=64, epochs=10, micro_batch_tokens=16384,
                       eval_every=50, save_every=50),
    )


def _paper_4b() -> Config:
    # The paper's 4B run: a thinking model needs the longer 1,024-token answer budget (appendix A.1).
    cfg = _paper_1_5b()
    return dataclasses.replace(
        cfg, preset="paper-4b",
        model=ModelCfg(path="Qwen/Qwen3-4B-Thinking-2507", dtype="bfloat16"),
        # thinking_budget_tokens is ours, not the paper's: room for <think> reasoning before each turn's capped
        # memory / answer (memrl/rollout.py). Without it a 256-token memory turn ends inside its reasoning.
        rollout=dataclasses.replace(cfg.rollout, response_max_tokens=1024, thinking_budget_tokens=1024),
        train=dataclasses.replace(cfg.train, run_dir="runs/paper-4b"),
    )


PRESETS = {"default": _default, "paper-1.5b": _paper_1_5b, "paper-4b": _paper_4b}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().check()


# ----------------------------------------------------------------------------- typed values

def _coerce(key: str, typ, value, from_text: bool):
    """`value` (CLI text or decoded JSON) as `typ`, or ConfigError naming `key`."""
    def bad(why=""):
        return ConfigError(f"--{key}: expected {_type_name(typ)}, got {value!r}{why}")

    origin = typing.get_origin(typ)
    if origin is tuple:
        parts = value.split(",") if from_text and isinstance(value, str) else value
        args = typing.get_args(typ)
        if not isinstance(parts, (list, tuple)) or len(parts) != len(args):
            raise bad(f" ({len(args)} comma-separated values)")
        return tuple(_coerce(key, a, p, from_text) for a, p in zip(args, parts))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no",
                                                                      "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad()
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise ConfigError(f"--{key}: unsupported field type {typ!r}")


def _type_name(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return "comma-separated " + ",".join(a.__name__ for a in typing.get_args(typ))
    return typ.__name__ if isinstance(typ, type) else str(typ)


def _fields(section_obj) -> dict[str, tuple[object, dataclasses.Field]]:
    """name -> (resolved type, Field) of a config section (annotations are strings under __future__ annotations)."""
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_obj)}


def _all_keys(cfg: Config) -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _fields(getattr(cfg, s))]


def _resolve_key(cfg: Config, key: str) -> tuple[str, str]:
    renamed = [new for old, new in RENAMED.items() if key in (old, old.split(".")[1])]
    if renamed:
        raise ConfigError(f"--{key} was replaced by {renamed[0]}")
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in _fields(getattr(cfg, section)):
            return section, name
    else:
        owners = [s for s in SECTIONS if key in _fields(getattr(cfg, s))]
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            raise ConfigError(f"--{key} is ambiguous: say which of {[f'{s}.{key}' for s in owners]}")
    close = difflib.get_close_matches(key, _all_keys(cfg) + [k.split(".")[1] for k in _all_keys(cfg)], n=3)
    raise ConfigError(f"--{key}: unknown config key" + (f" (did you mean {', '.join('--' + c for c in close)}?)"
                                                        if close else ""))


def _replace_checked(obj, key: str, **changes):
    try:
        return dataclasses.replace(obj, **changes)
    except AssertionError as e:  # the invariants' messages mostly start with their own key
        raise ConfigError(f"--{e}" if str(e).startswith(key) else f"--{key}: {e}") from None


def set_value(cfg: Config, key: str, value, from_text: bool = True) -> Config:
    """A new Config with `key` (dotted or unique flat name) set; value parsed and type-checked; invariants rechecked."""
    section, name = _resolve_key(cfg, key)
    sec = getattr(cfg, section)
    typed = _coerce(f"{section}.{name}", _fields(sec)[name][0], value, from_text)
    new_sec = _replace_checked(sec, f"{section}.{name}", **{name: typed})
    return _replace_checked(cfg, f"{section}.{name}", **{section: new_sec})


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"{arg!r}: expected --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # bare flag: a bool field, or a field with a flag value (--resume)
            section, name = _resolve_key(cfg, key)
            typ, f = _fields(getattr(cfg, section))[name]
            if typ is bool:
                value = "true"
            elif "flag" in f.metadata:
                value = f.metadata["flag"]
            else:
                raise ConfigError(f"--{key}: needs a value (--{key}=...)")
        cfg = set_value(cfg, key, value, from_text=True)
    return cfg.check()


def parse_cli(argv: list[str]) -> Config:
    """--preset=NAME / --config=PATH (the base, first), then --key=value overrides in order."""
    base, rest = None, []
    for arg in argv:
        if arg.startswith("--preset="):
            if base is not None:
                raise ConfigError("give one --preset or --config")
            base = preset(arg.split("=", 1)[1])
        elif arg.startswith("--config="):
            if base is not None:
                raise ConfigError("give one --preset or --config")
            base = load_config(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return apply_overrides(base if base is not None else preset("default"), rest)


def describe(cfg: Config) -> str:
    """Every key and its current value, one `--section.key=value` per line (for --help and logs)."""
    lines = []
    for s in SECTIONS:
        sec = getattr(cfg, s)
        for name, (typ, _) in _fields(sec).items():
            v = getattr(sec, name)
            text = ",".join(map(str, v)) if isinstance(v, tuple) else json.dumps(v) if isinstance(v, str) else v
            lines.append(f"--{s}.{name}={text}  ({_type_name(typ)})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- JSON

def config_from_dict(d: dict) -> Config:
    """Inverse of Config.to_dict, type-checked; unknown or missing keys are errors (a config is saved whole)."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(SECTIONS) - {"preset"})
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}")
    defaults = Config()
    sections = {}
    for s in SECTIONS:
        sec_d = d.get(s, {})
        if not isinstance(sec_d, dict):
            raise ConfigError(f"{s}: expected an object, got {type(sec_d).__name__}")
        fields = _fields(getattr(defaults, s))
        extra = sorted(set(sec_d) - set(fields))
        renamed = [f"{s}.{k} was replaced by {RENAMED[f'{s}.{k}']}" for k in extra if f"{s}.{k}" in RENAMED]
        if renamed:
            raise ConfigError("; ".join(renamed))
        if extra:
            raise ConfigError(f"unknown config key(s) {[f'{s}.{k}' for k in extra]}")
        typed = {k: _coerce(f"{s}.{k}", fields[k][0], v, from_text=False) for k, v in sec_d.items()}
        sections[s] = _replace_checked(getattr(defaults, s), s, **typed)
    return Config(preset=_coerce("preset", str, d.get("preset", "default"), from_text=False), **sections).check()


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- rules for a training run

def config_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(section.key, old value, new value) of every field that differs."""
    changes = []
    for s in SECTIONS:
        a, b = getattr(old, s), getattr(new, s)
        changes += [(f"{s}.{k}", getattr(a, k), getattr(b, k)) for k in _fields(a) if getattr(a, k) != getattr(b, k)]
    return changes


def check_for_training(cfg: Config) -> None:
    """Rules that matter only to train.py (evaluate.py reads saved configs of older runs too)."""
    if cfg.data.train_path and not cfg.data.eval_path:
        # without an eval set the held-out evaluation would fall back to the built-in synthetic task: another task
        raise ConfigError(
            f"--data.eval_path: empty while data.train_path={cfg.data.train_path} is set, so evaluation during "
            f"training would use the built-in synthetic task, not yours. Give a held-out set of the same task "
            f"(--data.eval_path=FILE.jsonl), or --data.eval_path={NO_EVAL} to train without evaluation")

