"""What evaluations and runs look like: markdown tables, bar plots of checkpoints, training curves.

    markdown_table({checkpoint: {"conditions": scores, "lic_drop": drops}})   # one dataset
    suite_table({dataset: {checkpoint: ...}})                                 # several: one table
    plot_bars(by_dataset, "eval.png"); plot_metrics("runs/default/metrics.jsonl")

The results are memrl.evaluation.evaluate_policy's ({condition: {"accuracy", "n", "episodes", ...}}) and lic_drop's.
Columns follow memrl.config.CONDITIONS (whole problem -> sharded); "F1" heads a dataset whose every episode is QA.
Every figure is written atomically (memrl/atomic.py). matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

from pathlib import Path

from memrl.atomic import atomic_path
from memrl.config import CONDITIONS
from memrl.run_dir import read_metrics


def plot_metrics(paths: str | Path | list, out: str | Path | None = None) -> Path:
    """Training curves of one or several runs' metrics.jsonl (seeds of one setting, overlaid: one colour per run):
    reward, held-out accuracy (greedy solid, sampled dashed, facts kept dotted), KL, entropy, lengths, step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    many = len(paths) > 1
    panels = [("train reward (sampled)", ["reward"]), ("held-out (dashed: sampled, dotted: facts kept)", None),
              ("KL to reference / PPO KL", ["kl", "ppo_kl"]), ("entropy", ["entropy"]),
              ("response tokens", ["memory_tokens", "answer_tokens"]), ("step time (s)", ["step_s"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for i, path in enumerate(paths):
        rows = read_metrics(path)[0]  # a torn last line (a run being written, or killed) left out
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        run = Path(path).parent.name + ": " if many else ""
        for ax, (title, keys) in zip(axes.flat, panels):
            if keys is None:  # eval lines: accuracy per condition, greedy and sampled; facts kept (synthetic task)
                for name in sorted({k for r in evals for k in r if "/" in k and k != "eval_s"}):
                    metric, cond = name.split("/", 1)
                    pts = [(r["step"], r[name]) for r in evals if name in r]
                    kind = "sampled" if metric.startswith("sampled") else "greedy"
                    style = ":" if "facts_kept" in metric else "--" if kind == "sampled" else "-"
                    color = f"C{i}" if many else ("C1" if kind == "sampled" else "C0")
                    ax.plot(*zip(*pts), marker="o", ms=3, ls=style, color=color,
                            label=f"{run}{cond} {kind}" + (" (facts)" if "facts_kept" in metric else ""))
                ax.set_ylim(-0.02, 1.02)
            else:
                for j, k in enumerate(keys):
                    pts = [(r["step"], r[k]) for r in train if r.get(k) is not None]
                    if pts:
                        ax.plot(*zip(*pts), label=run + k, color=f"C{i}" if many else f"C{j}",
                                ls=("-", "--")[j % 2] if many else "-")
    for ax, (title, _) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7 if many else 8)
        ax.grid(alpha=0.3)
    fig.suptitle(", ".join(str(p) for p in paths), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else Path(paths[0]).with_suffix(".png")
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
    """savefig atomically (memrl/atomic.py): a reader never sees half a PNG."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format=Path(out).suffix.lstrip(".") or "png")


def metric_name(results: dict[str, dict]) -> str:
    """"F1" when every scored episode is QA (LongBench's qa_f1_score), else "accuracy"."""
    kinds = {e["reward_kind"] for r in results.values() for c in r["conditions"].values()
             for e in c.get("episodes", [])}
    return "F1" if kinds == {"qa"} else "accuracy"


def markdown_table(results: dict[str, dict]) -> str:
    """One dataset: a row per checkpoint, the score per condition and the LiC drops."""
    conds = [c for c in CONDITIONS if any(c in r["conditions"] for r in results.values())]
    drops = [f"LiC drop ({c})" for c in CONDITIONS[1:] if c in conds and "single_turn" in conds]
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
