"""Evaluate checkpoints under the three conditions, and plot training curves (DESIGN §9).

    python evaluate.py --checkpoint=assets/synthetic-policy                    # the built-in task's held-out split
    python evaluate.py --checkpoint=assets/synthetic-policy --checkpoint=runs/default --out=eval.json --bar=eval.png
    python evaluate.py --checkpoint=PATH --data.eval_path=gsm8k_test.episodes.jsonl --data.reward_kind=gsm8k
    python evaluate.py --checkpoint=PATH --data.eval_path=math500.jsonl --data.reward_kind=math \\
        --data.noise_path=../shared/data/wikitext2/wiki.test.raw --data.eval_noise_shards=2
    python evaluate.py --plot runs/default/metrics.jsonl                        # -> runs/default/metrics.png

A checkpoint is a Hugging Face directory (config.json + safetensors + tokenizer), or a train.py run directory (its
newest checkpoint). Conditions: single_turn (the whole problem in one prompt), full_history (all shards so far in
place of the memory), memory (question, memory, shard). Decoding is greedy (deterministic); the rollout settings
(templates, memory cap, answer budget, m_0) come from the checkpoint's run_config.json when it has one, else from the
preset, and any `--section.key=value` override of memrl.config applies on top. Output: a markdown table of accuracy
per condition with the LiC drop (single-turn minus each multi-turn condition), and the same as JSON (--out).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from memrl import synthetic
from memrl.checkpoint import latest_checkpoint
from memrl.config import RUN_CONFIG_NAME, Config, apply_overrides, load_config, parse_cli
from memrl.episodes import Episode, load_episodes
from memrl.reward import score
from memrl.rollout import CONDITIONS, Sampling, rollout, with_noise
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
SYNTHETIC_POLICY = REPO / "assets" / "synthetic-policy"  # made by scripts/make_synthetic_policy.py
SYNTHETIC_EVAL_SIZE = 256  # held-out coin-tally problems (standard error of an accuracy <= 3.1 points)


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


def eval_episodes(cfg: Config, tokenizer: Tokenizer | None = None) -> list[Episode]:
    """The held-out set: data.eval_path (episode JSONL), or the synthetic task's held-out split; data.eval_limit
    first episodes; n noise shards after every problem shard when data.eval_noise_shards > 0."""
    if cfg.data.eval_path:
        count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else None
        episodes = load_episodes(cfg.data.eval_path, max_shards=cfg.data.max_shards,
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


@torch.no_grad()
def evaluate_policy(generator, tokenizer: Tokenizer, episodes: list[Episode], cfg: Config,
                    conditions=("memory",), batch_size: int = 256) -> dict[str, dict]:
    """Greedy accuracy per condition: {condition: {"accuracy", "n", "memory_tokens", "answer_tokens"}}."""
    templates = Templates.from_config(cfg.rollout)
    sampling = Sampling.from_config(cfg.rollout, greedy=True)
    out = {}
    for condition in conditions:
        rewards, mem_tokens, ans_tokens = [], [], []
        for i in range(0, len(episodes), batch_size):
            res = rollout(generator, tokenizer, episodes[i: i + batch_size], condition, 1, templates, sampling,
                          seed=cfg.train.seed, full_history_notes=False)  # notes do not change the answer
            rewards += [score(t.final_text, t.episode.answer, t.episode.metadata.get("reward_kind",
                                                                                     cfg.data.reward_kind))
                        for t in res.trajectories]
            mem_tokens += [len(r.response_ids) for r in res.records if r.kind == "memory"]
            ans_tokens += [len(r.response_ids) for r in res.records if r.kind == "final"]
        out[condition] = {"accuracy": sum(rewards) / len(rewards), "n": len(rewards),
                          "memory_tokens": sum(mem_tokens) / max(len(mem_tokens), 1),
                          "answer_tokens": sum(ans_tokens) / max(len(ans_tokens), 1)}
    return out


def lic_drop(acc: dict[str, dict]) -> dict[str, float]:
    """Lost-in-conversation drop: single-turn accuracy minus each multi-turn condition's."""
    if "single_turn" not in acc:
        return {}
    return {c: acc["single_turn"]["accuracy"] - acc[c]["accuracy"] for c in ("full_history", "memory") if c in acc}


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
    panels = [("train reward (sampled)", ["reward"]), ("held-out accuracy (greedy)", None),
              ("KL to reference / PPO KL", ["kl", "ppo_kl"]), ("entropy", ["entropy"]),
              ("response tokens", ["memory_tokens", "answer_tokens"]), ("step time (s)", ["step_s"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        if keys is None:  # eval lines: one curve per condition
            conds = sorted({k.split("/", 1)[1] for r in evals for k in r if k.startswith("accuracy/")})
            for c in conds:
                pts = [(r["step"], r[f"accuracy/{c}"]) for r in evals if f"accuracy/{c}" in r]
                ax.plot(*zip(*pts), marker="o", label=c)
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
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_bars(results: dict[str, dict], out: str | Path) -> Path:
    """Grouped bars: accuracy per condition for each checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    conds = [c for c in CONDITIONS if any(c in results[n]["conditions"] for n in names)]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(conds), 3.5))
    for i, name in enumerate(names):
        accs = [results[name]["conditions"].get(c, {}).get("accuracy", 0.0) for c in conds]
        bars = ax.bar([j + i * width for j in range(len(conds))], accs, width, label=Path(name).name or name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(conds))], conds)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def markdown_table(results: dict[str, dict]) -> str:
    conds = [c for c in CONDITIONS if any(c in r["conditions"] for r in results.values())]
    drops = [f"LiC drop ({c})" for c in ("full_history", "memory") if c in conds and "single_turn" in conds]
    lines = ["| checkpoint | " + " | ".join(conds + drops) + " |", "|---" * (1 + len(conds) + len(drops)) + "|"]
    for name, r in results.items():
        cells = [f"{r['conditions'][c]['accuracy']:.3f}" for c in conds]
        cells += [f"{r['lic_drop'][d.split('(')[1][:-1]]:+.3f}" for d in drops]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

HELP = __doc__ + """
Options:
  --checkpoint=PATH       (repeatable) a checkpoint or run directory; "" = the built-in synthetic policy
  --conditions=a,b,c      subset of single_turn,full_history,memory (default: all three)
  --out=FILE.json         write the results as JSON
  --bar=FILE.png          bar plot comparing the checkpoints
  --batch_size=N          episodes per rollout batch (default 256)
  --plot METRICS.jsonl    plot training curves to METRICS.png (--plot_out=FILE.png to choose)
  --preset=NAME / --section.key=value   memrl.config overrides (data.eval_path, data.eval_limit, rollout.*, ...)
"""


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

    own = {"checkpoint": [], "conditions": ",".join(CONDITIONS), "out": "", "bar": "", "batch_size": "256"}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if key in own and "=" in a:
            value = a.split("=", 1)[1]
            own[key] = own[key] + [value] if key == "checkpoint" else value
        else:
            rest.append(a)
    checkpoints = own["checkpoint"] or [""]
    conditions = [c for c in own["conditions"].split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        print(f"error: unknown condition(s) {bad}; choose from {CONDITIONS}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from memrl.generate import Generator
    from memrl.hf_io import load_model

    results = {}
    for name in checkpoints:
        path = resolve_policy(name)
        # the run's own settings (templates, caps) when it has them, then the command line's overrides
        cfg = (apply_overrides(load_config(path / RUN_CONFIG_NAME), [a for a in rest if not a.startswith(
            "--preset=")]) if (path / RUN_CONFIG_NAME).is_file() else parse_cli(rest))
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, dtype=getattr(torch, cfg.model.dtype),
                           device="cuda" if torch.cuda.is_available() else "cpu").eval()
        generator = Generator(model, tokenizer.vocab_size)
        episodes = eval_episodes(cfg, tokenizer)
        t0 = time.time()
        acc = evaluate_policy(generator, tokenizer, episodes, cfg, conditions, int(own["batch_size"]))
        results[name or str(SYNTHETIC_POLICY.relative_to(REPO))] = {
            "path": str(path), "conditions": acc, "lic_drop": lic_drop(acc), "seconds": round(time.time() - t0, 1),
            "data": cfg.data.eval_path or "synthetic:coin-tally/eval", "noise_shards": cfg.data.eval_noise_shards}
    print(markdown_table(results))
    if own["out"]:
        Path(own["out"]).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {own['out']}")
    if own["bar"]:
        print(f"wrote {plot_bars(results, own['bar'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
