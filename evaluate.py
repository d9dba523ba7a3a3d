"""Evaluate checkpoints under the three conditions on one or several datasets; plot training curves (DESIGN §9).

    python evaluate.py --checkpoint=assets/synthetic-policy                    # the built-in task's held-out split
    python evaluate.py --checkpoint=base=PATH --checkpoint=trained=runs/paper-1.5b --preset=paper-1.5b \\
        --dataset=gsm8k=$OUT/gsm8k_test.jsonl --dataset=math500=$OUT/math500.jsonl \\
        --dataset=math500-noisy2=$OUT/math500.noisy2.jsonl --dataset=sqa=../shared/data/leval/scientific_qa.jsonl \\
        --out=eval.json --table=eval.md --bar=eval.png
    python evaluate.py --checkpoint=PATH --data.eval_path=math500.jsonl --data.reward_kind=math \\
        --data.noise_path=../shared/data/wikitext2/wiki.test.raw --data.eval_noise_shards=2
    python evaluate.py --plot runs/default/metrics.jsonl                        # -> runs/default/metrics.png

A checkpoint is a Hugging Face directory (config.json + safetensors + tokenizer), or a train.py run directory (its
newest checkpoint); `--checkpoint=LABEL=PATH` names it in the table. A dataset is an episode JSONL (data_tools'
output), or a raw long-document QA file (LongBench or L-Eval JSONL) that is chunked here with data_tools.chunk_docs'
defaults; `--dataset=NAME=PATH` (repeatable), or `--dataset=NAME:KIND=PATH` to set the reward kind of episodes
whose metadata does not say (else data.reward_kind). Without --dataset: data.eval_path, else the synthetic task.

Conditions: single_turn (the whole problem in one prompt), full_history (all shards so far in place of the memory),
memory (question, memory, shard). Decoding is greedy (deterministic); the rollout settings (templates, memory cap,
answer budget, m_0) come from the checkpoint's run_config.json when it has one, else from the preset, and any
`--section.key=value` override of memrl.config applies on top (give base and trained the same ones). Every episode
of a file is scored (data.eval_limit: only the first n); the training limits data.max_shards / max_shard_tokens do
not apply. A prompt longer than the context window minus the answer budget is cut in the middle, as LongBench's
pred.py does (the count is reported as truncated_prompts): single-turn and full-history prompts over a long document
fit; the memory condition's prompts are short by design.

Score: memrl.reward.score against every reference (metadata.answers): exact match for gsm8k / math, LongBench's
qa_f1_score for qa. "accuracy" in the output is the mean score (F1 for QA). The LiC drop is single-turn minus each
multi-turn condition. Output: a markdown table (stdout, --table), JSON with per-condition scores, LiC drops and
every episode's final answer and score (--out), a bar plot per dataset (--bar), every prompt and response (--trace).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from memrl import synthetic
from memrl.checkpoint import latest_checkpoint
from memrl.config import RUN_CONFIG_NAME, Config, apply_overrides, load_config, parse_cli
from memrl.episodes import Episode, load_episodes, validate_record
from memrl.reward import score
from memrl.rollout import CONDITIONS, Sampling, decode_response, derive_seed, rollout, with_noise
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
SYNTHETIC_POLICY = REPO / "assets" / "synthetic-policy"  # made by scripts/make_synthetic_policy.py
SYNTHETIC_EVAL_SIZE = 256  # held-out coin-sum problems (standard error of an accuracy <= 3.1 points)


# ----------------------------------------------------------------------------- pieces train.py shares

def resolve_policy(path: str) -> Path:
    """"" -> the built-in synthetic policy; a run directory -> its newest checkpoint; else the directory itself."""
    if not path:
        return SYNTHETIC_POLICY
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"{p}: neither a checkpoint (no config.json) nor a run directory with checkpoints")
        return ckpt
    return p


def eval_episodes(cfg: Config, tokenizer: Tokenizer | None = None, path: str = "",
                  limits: bool = True) -> list[Episode]:
    """The held-out set: `path` (else data.eval_path; an episode JSONL or a raw LongBench / L-Eval file), or the
    synthetic task's held-out split; data.eval_limit first episodes; n noise shards after every problem shard when
    data.eval_noise_shards > 0. limits: enforce data.max_shards / max_shard_tokens (training does; evaluate.py
    scores every episode of the file)."""
    path = path or cfg.data.eval_path
    if path and is_raw_documents(path):
        episodes = chunk_raw_documents(path, cfg.data.eval_limit)
    elif path:
        count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None and limits else None
        episodes = load_episodes(path, max_shards=cfg.data.max_shards if limits else None,
                                 max_shard_tokens=cfg.data.max_shard_tokens if count else None, count_tokens=count)
    else:
        episodes = synthetic.make_episodes(SYNTHETIC_EVAL_SIZE, "eval", seed=synthetic.EVAL_SEED)
    if cfg.data.eval_limit:
        episodes = episodes[: cfg.data.eval_limit]
    if cfg.data.eval_noise_shards:
        from data_tools.noise import load_passages

        episodes = with_noise(episodes, load_passages(cfg.data.noise_path), cfg.data.eval_noise_shards,
                              seed=cfg.train.seed)
    return episodes


def episode_score(text: str, episode: Episode, default_kind: str) -> float:
    """The reward of a final answer: against every reference (QA: the max F1, as LongBench scores)."""
    return score(text, episode.references, episode.metadata.get("reward_kind", default_kind))


@torch.no_grad()
def evaluate_policy(generator, tokenizer: Tokenizer, episodes: list[Episode], cfg: Config,
                    conditions=("memory",), batch_size: int = 256, window: int | None = None,
                    trace: list | None = None, samples: int = 0) -> dict[str, dict]:
    """Greedy score per condition: {condition: {"accuracy" (mean score), "n", "memory_tokens", "answer_tokens",
    "truncated_prompts", "episodes": [{"id", "condition", "score", "final_text", "finish_reason", ...}]}}.

    samples > 0: also "sampled_accuracy", the mean score of `samples` trajectories per episode sampled as training
    samples them (rollout.temperature / top_p / top_k). Its seed is fixed (train.seed and the episode ids), so two
    evaluations of the same weights agree and a curve over training compares like with like.
    On the synthetic task the memory condition also reports "facts_kept" (and "sampled_facts_kept"): the share of
    the asked facts its final memories hold (memrl.synthetic.facts_kept), the graded quantity behind the accuracy;
    "facts_asked" is that share's denominator for one trajectory per episode.
    window: fit prompts to this context window (FitToWindow); trace: a list to append every turn to (prompt and
    response text, as built, before any cut)."""
    templates = Templates.from_config(cfg.rollout)
    greedy = Sampling.from_config(cfg.rollout, greedy=True)
    if window is not None:
        generator = FitToWindow(generator, window)
    synthetic_task = all(ep.metadata.get("source") == synthetic.SOURCE for ep in episodes)
    out = {}
    for condition in conditions:
        records, mem_tokens, ans_tokens, cut_before = [], [], [], getattr(generator, "cut", 0)
        kept = [0, 0]  # asked facts held by the final memories, asked facts (synthetic task, memory condition)
        for i in range(0, len(episodes), batch_size):
            res = rollout(generator, tokenizer, episodes[i: i + batch_size], condition, 1, templates, greedy,
                          seed=cfg.train.seed, full_history_notes=False)  # notes do not change the answer
            for t in res.trajectories:
                rec = {"id": t.episode.id, "condition": condition,
                       "score": episode_score(t.final_text, t.episode, cfg.data.reward_kind),
                       "final_text": t.final_text, "finish_reason": t.final_finish_reason,
                       "reward_kind": t.episode.metadata.get("reward_kind", cfg.data.reward_kind)}
                if condition == "memory":
                    rec["memory"] = t.memories[-1] if t.memories else templates.initial_memory
                    if synthetic_task:
                        kept = [a + b for a, b in zip(kept, synthetic.facts_kept(t.episode, rec["memory"]))]
                records.append(rec)
            mem_tokens += [len(r.response_ids) for r in res.records if r.kind == "memory"]
            ans_tokens += [len(r.response_ids) for r in res.records if r.kind == "final"]
            if trace is not None:
                trace += [{"condition": condition, "id": res.trajectories[r.trajectory_id].episode.id,
                           "turn": r.turn_index, "kind": r.kind, "prompt": tokenizer.decode(r.prompt_ids),
                           "response": decode_response(tokenizer, r.response_ids)} for r in res.records]
        out[condition] = {"accuracy": sum(r["score"] for r in records) / len(records), "n": len(records),
                          "memory_tokens": sum(mem_tokens) / max(len(mem_tokens), 1),
                          "answer_tokens": sum(ans_tokens) / max(len(ans_tokens), 1),
                          "truncated_prompts": getattr(generator, "cut", 0) - cut_before, "episodes": records}
        if kept[1]:
            out[condition].update(facts_kept=kept[0] / kept[1], facts_asked=kept[1])
        if samples:
            out[condition].update(sampled_scores(generator, tokenizer, episodes, cfg, condition, samples, batch_size,
                                                 synthetic_task))
    return out


def sampled_scores(generator, tokenizer: Tokenizer, episodes: list[Episode], cfg: Config, condition: str,
                   samples: int, batch_size: int, synthetic_task: bool) -> dict:
    """{"sampled_accuracy", "samples"[, "sampled_facts_kept"]}: `samples` trajectories per episode at the training
    temperature, seeded from (train.seed, "eval-sampled") and the episode ids only."""
    templates, sampling = Templates.from_config(cfg.rollout), Sampling.from_config(cfg.rollout)
    seed = derive_seed(cfg.train.seed, "eval-sampled")
    scores, kept = [], [0, 0]
    per_call = max(1, batch_size // samples)
    for i in range(0, len(episodes), per_call):
        res = rollout(generator, tokenizer, episodes[i: i + per_call], condition, samples, templates, sampling,
                      seed=seed, full_history_notes=False)
        for t in res.trajectories:
            scores.append(episode_score(t.final_text, t.episode, cfg.data.reward_kind))
            if synthetic_task and condition == "memory":
                held = synthetic.facts_kept(t.episode, t.memories[-1] if t.memories else templates.initial_memory)
                kept = [a + b for a, b in zip(kept, held)]
    out = {"sampled_accuracy": sum(scores) / len(scores), "samples": samples}
    if kept[1]:
        out["sampled_facts_kept"] = kept[0] / kept[1]
    return out


def lic_drop(acc: dict[str, dict]) -> dict[str, float]:
    """Lost-in-conversation drop: single-turn accuracy minus each multi-turn condition's."""
    if "single_turn" not in acc:
        return {}
    return {c: acc["single_turn"]["accuracy"] - acc[c]["accuracy"] for c in ("full_history", "memory") if c in acc}


class FitToWindow:
    """A generator whose prompts are cut in the middle to fit `window` minus the request's answer budget: the first
    and last halves are kept (LongBench pred.py), so the question, the template's head and the answer cue survive."""

    def __init__(self, generator, window: int):
        self.generator, self.window, self.cut = generator, window, 0

    @property
    def last_stats(self) -> dict:
        return self.generator.last_stats

    def generate(self, prompts: list[list[int]], params):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        fitted = []
        for ids, p in zip(prompts, plist):
            keep = self.window - p.max_new_tokens
            assert keep >= 2, f"the answer budget {p.max_new_tokens} leaves no room in a window of {self.window}"
            if len(ids) > keep:
                ids = ids[: keep // 2] + ids[len(ids) - (keep - keep // 2):]
                self.cut += 1
            fitted.append(ids)
        return self.generator.generate(fitted, params)


# ----------------------------------------------------------------------------- raw long-document QA

def is_raw_documents(path: str | Path) -> bool:
    """True for a LongBench / L-Eval JSONL (its first record has no "shards"), False for an episode file."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False  # load_episodes reports it with its line number
    return isinstance(obj, dict) and "shards" not in obj and ("context" in obj or "instructions" in obj)


def chunk_raw_documents(path: str | Path, limit: int = 0) -> list[Episode]:
    """LongBench / L-Eval questions (the first `limit`, 0 = all) chunked exactly as `python -m data_tools.chunk_docs
    --input PATH` does by default (regex token count, 12 shards per document)."""
    from data_tools.chunk_docs import TokenCounter, load_documents, make_processor

    questions = load_documents(path)
    outcomes = make_processor(TokenCounter())(questions[: limit or None])
    failed = [f"{o.id}: {o.reason} {o.detail}" for o in outcomes if o.episode is None]
    if failed:
        raise ValueError(f"{path}: {len(failed)} question(s) could not be chunked (python -m data_tools.chunk_docs "
                         f"records them and goes on):\n" + "\n".join(failed[:10]))
    episodes = []
    for o in outcomes:
        problems = validate_record(o.episode)
        assert not problems, f"{path}: chunked episode {o.id}: {problems}"
        episodes.append(Episode(**o.episode))
    return episodes


# ----------------------------------------------------------------------------- plots

def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(path: str | Path, out: str | Path | None = None) -> Path:
    """Training curves of a run's metrics.jsonl: reward, held-out accuracy, KL, entropy, lengths, step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels = [("train reward (sampled)", ["reward"]), ("held-out (dashed: share of facts kept)", None),
              ("KL to reference / PPO KL", ["kl", "ppo_kl"]), ("entropy", ["entropy"]),
              ("response tokens", ["memory_tokens", "answer_tokens"]), ("step time (s)", ["step_s"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        if keys is None:  # eval lines: accuracy per condition, greedy and sampled; facts kept (synthetic task)
            names = sorted({k for r in evals for k in r if "/" in k and k != "eval_s"})
            for name in names:
                metric, cond = name.split("/", 1)
                pts = [(r["step"], r[name]) for r in evals if name in r]
                label = f"{cond} {'sampled' if metric.startswith('sampled') else 'greedy'}"
                ax.plot(*zip(*pts), marker="o", ls="--" if "facts_kept" in metric else "-",
                        color="C1" if metric.startswith("sampled") else "C0",
                        label=label + (" (facts)" if "facts_kept" in metric else ""))
            ax.set_ylim(-0.02, 1.02)
        else:
            for k in keys:
                pts = [(r["step"], r[k]) for r in train if r.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(str(path), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else Path(path).with_suffix(".png")
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_bars(by_dataset: dict[str, dict[str, dict]], out: str | Path) -> Path:
    """One panel per dataset: grouped bars of the score per condition, one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(by_dataset), 3)
    rows = -(-len(by_dataset) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 + 4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (dataset, results) in zip(axes.flat, by_dataset.items()):
        names = list(results)
        conds = [c for c in CONDITIONS if any(c in results[k]["conditions"] for k in names)]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            accs = [results[name]["conditions"].get(c, {}).get("accuracy", 0.0) for c in conds]
            bars = ax.bar([j + i * width for j in range(len(conds))], accs, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(conds))], conds, fontsize=8)
        ax.set_ylim(0, 1.08)
        n = sorted({c["n"] for r in results.values() for c in r["conditions"].values()})
        ax.set_title(f"{dataset} (n={'/'.join(map(str, n))})", fontsize=10)
        ax.set_ylabel(metric_name(results), fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(by_dataset):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return Path(out)


def save_figure(fig, out: str | Path) -> None:
    """savefig to a temp file beside `out`, then rename: a reader never sees half a PNG."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=80, format=out.suffix.lstrip(".") or "png")
    os.replace(tmp, out)


def metric_name(results: dict[str, dict]) -> str:
    """"F1" when every scored episode is QA (LongBench's qa_f1_score), else "accuracy"."""
    kinds = {e["reward_kind"] for r in results.values() for c in r["conditions"].values()
             for e in c.get("episodes", [])}
    return "F1" if kinds == {"qa"} else "accuracy"


def markdown_table(results: dict[str, dict]) -> str:
    """One dataset: a row per checkpoint, the score per condition and the LiC drops."""
    conds = [c for c in CONDITIONS if any(c in r["conditions"] for r in results.values())]
    drops = [f"LiC drop ({c})" for c in ("full_history", "memory") if c in conds and "single_turn" in conds]
    lines = ["| checkpoint | " + " | ".join(conds + drops) + " |", "|---" * (1 + len(conds) + len(drops)) + "|"]
    for name, r in results.items():
        cells = [f"{r['conditions'][c]['accuracy']:.3f}" for c in conds]
        cells += [f"{r['lic_drop'][d.split('(')[1][:-1]]:+.3f}" for d in drops]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def suite_table(by_dataset: dict[str, dict[str, dict]]) -> str:
    """Several datasets: one markdown table, a row per (dataset, checkpoint), with the metric and n."""
    parts = []
    for dataset, results in by_dataset.items():
        table = markdown_table(results).splitlines()
        n = {c["n"] for r in results.values() for c in r["conditions"].values()}
        lead = f"{dataset} | {metric_name(results)} | {'/'.join(map(str, sorted(n)))}"
        if not parts:
            parts += ["| dataset | metric | n " + table[0], "|---|---|---" + table[1]]
        parts += [f"| {lead} " + row for row in table[2:]]
    return "\n".join(parts)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Temp file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- main

HELP = __doc__ + """
Options:
  --checkpoint=[LABEL=]PATH   (repeatable) a checkpoint or run directory; "" = the built-in synthetic policy
  --dataset=NAME[:KIND]=PATH  (repeatable) an episode JSONL or a raw LongBench / L-Eval JSONL; KIND = gsm8k|math|qa
  --conditions=a,b,c          subset of single_turn,full_history,memory (default: all three)
  --out=FILE.json             the results as JSON (per condition, LiC drops, every episode's answer and score)
  --table=FILE.md             the markdown table
  --bar=FILE.png              bar plot comparing the checkpoints, a panel per dataset
  --trace=FILE.jsonl          every turn's prompt and response (large; for inspection)
  --batch_size=N              episodes per rollout batch (default 256)
  --plot METRICS.jsonl        plot training curves to METRICS.png (--plot_out=FILE.png to choose)
  --preset=NAME / --section.key=value   memrl.config overrides (data.eval_limit, data.reward_kind, rollout.*, ...)
"""


def parse_named(value: str) -> tuple[str, str]:
    """"LABEL=PATH" -> (LABEL, PATH); "PATH" -> (PATH, PATH)."""
    label, sep, path = value.partition("=")
    return (label, path) if sep else (value, value)


def parse_dataset(value: str) -> tuple[str, str, str | None]:
    """"NAME=PATH" / "NAME:KIND=PATH" -> (NAME, PATH, KIND or None)."""
    name, sep, path = value.partition("=")
    name, _, kind = name.partition(":")
    if not sep or not name or not path or kind not in ("", "gsm8k", "math", "qa"):
        raise ValueError(f"--dataset={value}: expected NAME=PATH or NAME:KIND=PATH (KIND gsm8k|math|qa)")
    return name, path, kind or None


def checkpoint_config(path: Path, overrides: list[str]) -> Config:
    """The run's own settings (templates, caps) when it has them, else the preset; the command line's on top."""
    if (path / RUN_CONFIG_NAME).is_file():
        return apply_overrides(load_config(path / RUN_CONFIG_NAME), [a for a in overrides
                                                                     if not a.startswith("--preset=")])
    return parse_cli(overrides)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    if "--plot" in argv or any(a.startswith("--plot=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--plot"))
        path = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
        out = next((a.split("=", 1)[1] for a in argv if a.startswith("--plot_out=")), None)
        print(f"wrote {plot_metrics(path, out)}")
        return 0

    own = {"checkpoint": [], "dataset": [], "conditions": ",".join(CONDITIONS), "out": "", "table": "", "bar": "",
           "trace": "", "batch_size": "256"}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if key in own and "=" in a:
            value = a.split("=", 1)[1]
            own[key] = own[key] + [value] if isinstance(own[key], list) else value
        else:
            rest.append(a)
    conditions = [c for c in own["conditions"].split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        print(f"error: unknown condition(s) {bad}; choose from {CONDITIONS}", file=sys.stderr)
        return 2
    try:
        datasets = [parse_dataset(v) for v in own["dataset"]]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checkpoints = dict(parse_named(v) for v in own["checkpoint"] or [""])  # a repeated label is evaluated once
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from memrl.config import set_value
    from memrl.generate import Generator
    from memrl.hf_io import load_model

    results: dict[str, dict[str, dict]] = {}  # dataset -> checkpoint -> {"conditions", "lic_drop", "seconds"}
    about = {"checkpoints": {}, "datasets": {}, "conditions": conditions}
    trace: list[dict] = []
    loaded: dict[tuple, list[Episode]] = {}  # a file read (or chunked) once for every checkpoint with its settings
    for label, name in checkpoints.items():
        label = label or str(SYNTHETIC_POLICY.relative_to(REPO))
        path = resolve_policy(name)
        cfg = checkpoint_config(path, rest)
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, dtype=getattr(torch, cfg.model.dtype),
                           device="cuda" if torch.cuda.is_available() else "cpu").eval()
        generator = Generator(model, tokenizer.vocab_size)
        about["checkpoints"][label] = {"path": str(path), "preset": cfg.preset, "seed": cfg.train.seed,
                                       "rollout": dict(cfg.rollout.__dict__)}
        # without --dataset: data.eval_path, else the synthetic task, named after the file
        default = Path(cfg.data.eval_path).stem if cfg.data.eval_path else synthetic.SOURCE + "/eval"
        for dataset, data_path, kind in datasets or [(default, "", None)]:
            dcfg = set_value(cfg, "data.reward_kind", kind) if kind else cfg
            key = (data_path or dcfg.data.eval_path, dcfg.data.eval_limit, dcfg.data.eval_noise_shards,
                   dcfg.data.noise_path, dcfg.train.seed)
            if key not in loaded:
                loaded[key] = eval_episodes(dcfg, tokenizer, path=data_path, limits=False)
            episodes = loaded[key]
            kinds = Counter(e.metadata.get("reward_kind", dcfg.data.reward_kind) for e in episodes)
            about["datasets"][dataset] = {"path": key[0] or default, "episodes": len(episodes),
                                          "noise_shards": dcfg.data.eval_noise_shards, "reward_kinds": dict(kinds)}
            t0 = time.time()
            turns: list[dict] | None = [] if own["trace"] else None
            acc = evaluate_policy(generator, tokenizer, episodes, dcfg, conditions, int(own["batch_size"]),
                                  window=model.config.max_position_embeddings, trace=turns)
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
    sys.exit(main(sys.argv[1:]))
