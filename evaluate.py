"""Evaluate checkpoints under the three conditions on one or several datasets; plot training curves
(DESIGN.md §9).

    python evaluate.py --checkpoint=assets/synthetic-policy           # the built-in task's held-out split
    python evaluate.py --checkpoint=base=PATH --checkpoint=trained=runs/paper-1.5b --preset=paper-1.5b \\
        --dataset=gsm8k=$OUT/gsm8k_test.jsonl --dataset=math500=$OUT/math500.jsonl \\
        --dataset=math500-noisy2=$OUT/math500.noisy2.jsonl \\
        --dataset=sqa=../shared/data/leval/scientific_qa.jsonl --out=eval.json --table=eval.md --bar=eval.png
    python evaluate.py --checkpoint=PATH --data.eval_path=math500.jsonl --data.reward_kind=math \\
        --data.noise_path=../shared/data/wikitext2/wiki.test.raw --data.eval_noise_shards=2
    python evaluate.py --plot runs/default/metrics.jsonl               # -> runs/default/metrics.png

A checkpoint is a Hugging Face directory (config.json + safetensors + tokenizer), a train.py run
directory (its newest checkpoint), or a hub id (memrl/paths.py: the rule; a local path that does not
exist is an error, never a download); `--checkpoint=LABEL=PATH` names it in the table. Every
checkpoint, dataset and output path is checked before the first model loads, so a typo in the last
one does not cost the evaluation of the first. A dataset is an episode JSONL (data_tools' output), or
a raw long-document QA file (LongBench or L-Eval JSONL) that is chunked here with
data_tools.chunk_docs' defaults; `--dataset=NAME=PATH` (repeatable), or `--dataset=NAME:KIND=PATH` to
set the reward kind of episodes whose metadata does not say (else data.reward_kind). Without
--dataset: data.eval_path, else the synthetic task.

Conditions: single_turn (the whole problem in one prompt), full_history (the paper's evaluation
condition, §4: all shards so far in place of the memory, one fresh prompt per turn), memory
(question, memory, shard), and conversation (a real multi-turn chat: each shard a user message, the
model's replies kept in the context; the condition the full-history baseline trains under;
--conditions=...,conversation, not in the default set: the paper evaluates the other three, and a
chat longer than the context window cannot be cut, so it raises). Decoding is greedy
(deterministic); the rollout settings (templates, memory cap, answer budget, m_0) come from the
checkpoint's run_config.json when it has one, else from the preset, and any `--section.key=value`
override of memrl.config applies on top (give base and trained the same ones). Every episode of a
file is scored (data.eval_limit: only the first n); the training limits data.max_shards /
max_shard_tokens do not apply. A prompt longer than the context window minus the answer budget is
cut in the middle, as LongBench's pred.py does (the count is reported as truncated_prompts):
single-turn and full-history prompts over a long document fit; the memory condition's prompts are
short by design.

Score: memrl.reward.score against every reference (metadata.answers): exact match for gsm8k / math,
LongBench's qa_f1_score for qa. "accuracy" in the output is the mean score (F1 for QA). The LiC drop
is single-turn minus each multi-turn condition. Output: a markdown table (stdout, --table), JSON with
per-condition scores, LiC drops and every episode's final answer and score (--out), a bar plot per
dataset (--bar), every prompt and response (--trace). Progress (stderr): one bar per checkpoint x
dataset, naming both, the condition and n. Bad input is one `error: ` line (memrl/errors.py; --debug
for the traceback).

The evaluation itself is memrl/evaluation.py, the tables and plots memrl/report.py: this script
parses the command line, checks every input, loads each checkpoint in turn and writes the outputs.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from data_tools.chunk_docs import chunk_raw_documents
from memrl import synthetic
from memrl.atomic import write_text_atomic
from memrl.config import (CONDITIONS, EVAL_CONDITIONS, NO_EVAL, RUN_CONFIG_NAME, Config,
                          apply_overrides, load_config, parse_cli, set_value)
from memrl.distributed import set_cpu_threads
from memrl.episodes import REWARD_KINDS, Episode, is_raw_documents, load_episodes
from memrl.errors import ConfigError, DataError, install_error_handler
from memrl.evaluation import eval_episodes, evaluate_policy, lic_drop
from memrl.paths import REPO, SYNTHETIC_POLICY, resolve_policy, writable_output
from memrl.report import plot_bars, plot_metrics, suite_table
from memrl.tokenizer import Tokenizer

HELP = __doc__ + f"""
Options:
  --checkpoint=[LABEL=]PATH   (repeatable) a checkpoint or run directory; "" = the built-in policy
  --dataset=NAME[:KIND]=PATH  (repeatable) an episode JSONL or a raw LongBench / L-Eval JSONL;
                              KIND = {'|'.join(REWARD_KINDS)}
  --conditions=a,b,c          subset of {','.join(CONDITIONS)}
                              (default: {','.join(EVAL_CONDITIONS)}: the paper's three)
  --out=FILE.json             the results as JSON (per condition, LiC drops, every episode's answer
                              and score)
  --table=FILE.md             the markdown table
  --bar=FILE.png              bar plot comparing the checkpoints, a panel per dataset
  --trace=FILE.jsonl          every turn's prompt and response (large; for inspection)
  --batch_size=N              episodes per rollout batch (default 256)
  --plot METRICS.jsonl        plot training curves to METRICS.png (--plot_out=FILE.png to choose); several runs
                              (seeds) overlaid: --plot A/metrics.jsonl,B/metrics.jsonl
  --preset=NAME / --section.key=value   memrl.config overrides (data.eval_limit, data.reward_kind,
                              rollout.*, ...)
"""
OUTPUTS = ("out", "table", "bar", "trace")


# ----------------------------------------------------------------------------- the command line

def parse_named(value: str) -> tuple[str, str]:
    """"LABEL=PATH" -> (LABEL, PATH); "PATH" -> (PATH, PATH)."""
    label, sep, path = value.partition("=")
    return (label, path) if sep else (value, value)


def parse_dataset(value: str) -> tuple[str, str, str | None]:
    """"NAME=PATH" / "NAME:KIND=PATH" -> (NAME, PATH, KIND or None)."""
    name, sep, path = value.partition("=")
    name, _, kind = name.partition(":")
    if not sep or not name or not path or (kind and kind not in REWARD_KINDS):
        raise ConfigError(f"--dataset={value}: expected NAME=PATH or NAME:KIND=PATH "
                          f"(KIND {'|'.join(REWARD_KINDS)})")
    return name, path, kind or None


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """This script's own options (checked) and the rest: memrl.config overrides."""
    own = {"checkpoint": [], "dataset": [], "conditions": ",".join(EVAL_CONDITIONS), "out": "",
           "table": "", "bar": "", "trace": "", "batch_size": "256"}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if key in own and "=" in a:
            value = a.split("=", 1)[1]
            own[key] = own[key] + [value] if isinstance(own[key], list) else value
        else:
            rest.append(a)
    own["conditions"] = [c for c in own["conditions"].split(",") if c]
    bad = [c for c in own["conditions"] if c not in CONDITIONS]
    if bad or not own["conditions"]:
        raise ConfigError(f"--conditions: unknown condition(s) {bad}; choose from {CONDITIONS}")
    if not own["batch_size"].isdigit() or int(own["batch_size"]) < 1:
        raise ConfigError(f"--batch_size: expected a positive integer, got {own['batch_size']!r}")
    own["batch_size"] = int(own["batch_size"])
    own["dataset"] = [parse_dataset(v) for v in own["dataset"]]
    # a repeated label is evaluated once
    own["checkpoint"] = dict(parse_named(v) for v in own["checkpoint"] or [""])
    return own, rest


def checkpoint_config(path: Path | str, overrides: list[str]) -> Config:
    """The run's own settings (templates, caps) when it has them, else the preset; the command
    line's on top."""
    if (Path(path) / RUN_CONFIG_NAME).is_file():
        rest = [a for a in overrides if not a.startswith("--preset=")]
        return apply_overrides(load_config(Path(path) / RUN_CONFIG_NAME), rest)
    return parse_cli(overrides)


def check_dataset(key: str, path: str) -> None:
    """An evaluation file exists and, when it is an episode file, parses (before any model loads)."""
    if not Path(path).is_file():
        raise DataError(f"{key}: {path}: {'a directory' if Path(path).is_dir() else 'no such file'}")
    if not is_raw_documents(path):
        load_episodes(path)


def check_inputs(own: dict, rest: list[str]) -> tuple[dict[str, Path | str], dict[str, Config]]:
    """Every checkpoint, dataset and output checked before the first model loads: (sources,
    configs) by checkpoint label."""
    from memrl.hf_io import load_config as load_model_config

    sources, configs = {}, {}
    for label, name in own["checkpoint"].items():
        label = label or str(SYNTHETIC_POLICY.relative_to(REPO))
        sources[label] = resolve_policy(name, f"--checkpoint={label}")
        configs[label] = checkpoint_config(sources[label], rest)
        if isinstance(sources[label], Path):  # its config.json (a hub id is fetched in its turn)
            load_model_config(sources[label])
    for name, data_path, _ in own["dataset"]:
        check_dataset(f"--dataset={name}", data_path)
    if not own["dataset"]:  # each checkpoint's own data.eval_path (else the synthetic task)
        for label, cfg in configs.items():
            if cfg.data.eval_path == NO_EVAL:
                raise ConfigError(f"--checkpoint={label}: its data.eval_path is {NO_EVAL}; say what "
                                  f"to evaluate with --dataset=NAME=PATH")
            if cfg.data.eval_path:
                check_dataset(f"data.eval_path of {label}", cfg.data.eval_path)
    for key in OUTPUTS:
        if own[key]:
            writable_output(key, own[key])
    return sources, configs


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    """Errors the user can fix propagate as memrl.errors.MemrlError; `python evaluate.py` prints
    them as one line."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    if "--plot" in argv or any(a.startswith("--plot=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--plot"))
        if "=" not in argv[i] and i + 1 == len(argv):
            raise ConfigError("--plot: needs the metrics.jsonl to plot (--plot PATH)")
        path = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
        out = next((a.split("=", 1)[1] for a in argv if a.startswith("--plot_out=")), None)
        print(f"wrote {plot_metrics(path.split(','), out)}")  # several runs (seeds): comma-separated
        return 0

    own, rest = parse_args(argv)
    sources, configs = check_inputs(own, rest)
    if not torch.cuda.is_available():  # one CPU thread unless asked (README, "CPU threads")
        set_cpu_threads(configs[next(iter(configs))].train.cpu_threads)

    from memrl.generate import Generator
    from memrl.hf_io import load_model

    # dataset -> checkpoint -> {"conditions", "lic_drop", "seconds"}
    results: dict[str, dict[str, dict]] = {}
    about = {"checkpoints": {}, "datasets": {}, "conditions": own["conditions"]}
    trace: list[dict] = []
    loaded: dict[tuple, list[Episode]] = {}  # a file read (or chunked) once for every checkpoint
    for label, path in sources.items():
        cfg = configs[label]
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, dtype=getattr(torch, cfg.model.dtype),
                           device="cuda" if torch.cuda.is_available() else "cpu").eval()
        generator = Generator(model, tokenizer.vocab_size, **cfg.rollout.generator_options())
        about["checkpoints"][label] = {"path": str(path), "preset": cfg.preset, "seed": cfg.train.seed,
                                       "rollout": dict(cfg.rollout.__dict__)}
        # without --dataset: data.eval_path, else the synthetic task, named after the file
        default = Path(cfg.data.eval_path).stem if cfg.data.eval_path else synthetic.SOURCE + "/eval"
        for dataset, data_path, kind in own["dataset"] or [(default, "", None)]:
            dcfg = set_value(cfg, "data.reward_kind", kind) if kind else cfg
            key = (data_path or dcfg.data.eval_path, dcfg.data.eval_limit, dcfg.data.eval_noise_shards,
                   dcfg.data.noise_path, dcfg.train.seed)
            if key not in loaded:
                loaded[key] = eval_episodes(dcfg, tokenizer, path=data_path, limits=False,
                                            chunk_documents=chunk_raw_documents)
            episodes = loaded[key]
            kinds = Counter(e.metadata.get("reward_kind", dcfg.data.reward_kind) for e in episodes)
            about["datasets"][dataset] = {"path": key[0] or default, "episodes": len(episodes),
                                          "noise_shards": dcfg.data.eval_noise_shards,
                                          "reward_kinds": dict(kinds)}
            t0 = time.time()
            turns: list[dict] | None = [] if own["trace"] else None
            acc = evaluate_policy(generator, tokenizer, episodes, dcfg, own["conditions"],
                                  own["batch_size"], window=model.config.max_position_embeddings,
                                  trace=turns, desc=f"{label} on {dataset}")
            trace += [{"checkpoint": label, "dataset": dataset, **t} for t in turns or []]
            results.setdefault(dataset, {})[label] = {"conditions": acc, "lic_drop": lic_drop(acc),
                                                      "seconds": round(time.time() - t0, 1)}
            print(f"{label} on {dataset} (n={len(episodes)}, {time.time() - t0:.1f} s): "
                  + ", ".join(f"{c} {a['accuracy']:.3f}" for c, a in acc.items()), file=sys.stderr)
        generator.release()
        del model, generator
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next checkpoint loads into this one's memory

    table = suite_table(results)
    print(table)
    if own["table"]:
        write_text_atomic(own["table"], table + "\n")
        print(f"wrote {own['table']}")
    if own["out"]:
        text = json.dumps({**about, "results": results}, indent=1, ensure_ascii=False) + "\n"
        print(f"wrote {write_text_atomic(own['out'], text)}")
    if own["bar"]:
        print(f"wrote {plot_bars(results, own['bar'])}")
    if own["trace"]:
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in trace)
        print(f"wrote {write_text_atomic(own['trace'], lines)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(install_error_handler(sys.argv[1:])))
