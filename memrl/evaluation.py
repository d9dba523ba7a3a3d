"""Held-out evaluation (DESIGN.md §9): a policy's score per condition, greedy (and sampled), on a list of episodes.

    episodes = eval_episodes(cfg, tokenizer)            # data.eval_path, else the synthetic task's held-out split
    scores = evaluate_policy(generator, tokenizer, episodes, cfg, conditions=EVAL_CONDITIONS)
    lic_drop(scores)                                    # single-turn minus each multi-turn condition

train.py calls this every train.eval_every steps on its own condition; evaluate.py on several checkpoints, conditions
and datasets. Both score exactly as training rewards (memrl.reward.episode_score).

Invariants:
- Greedy decoding: deterministic, so two evaluations of the same weights agree and a curve compares like with like.
  The sampled score (samples > 0) is seeded from (train.seed, "eval-sampled") and the episode ids only.
- The rollout settings (templates, caps, m_0) are the config's rollout section: the ones the policy trained with.
- A prompt longer than the window minus its answer budget is cut in the middle (FitToWindow, as LongBench's pred.py)
  and counted ("truncated_prompts"); a conversation is never cut (it raises before it outgrows the window).
- memrl never imports data_tools: a raw LongBench / L-Eval file reaches eval_episodes with its chunker, passed in by
  the script (data_tools.chunk_docs.chunk_raw_documents).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from memrl import synthetic
from memrl.config import CONDITIONS, NO_EVAL, Config
from memrl.episodes import Episode, is_raw_documents, load_episodes
from memrl.errors import ConfigError, DataError
from memrl.noise import load_passages, noisy_episodes
from memrl.reward import episode_score
from memrl.rollout import decode_response, rollout
from memrl.sampling import derive_seed
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer

SYNTHETIC_EVAL_SIZE = 256  # held-out coin-sum problems (standard error of an accuracy <= 3.1 points)


def eval_episodes(cfg: Config, tokenizer: Tokenizer | None = None, path: str = "", limits: bool = True,
                  chunk_documents: Callable[[str, int], list[Episode]] | None = None) -> list[Episode]:
    """The held-out set: `path` (else data.eval_path; an episode JSONL or a raw LongBench / L-Eval file), or the
    synthetic task's held-out split; data.eval_limit first episodes; n noise shards after every problem shard when
    data.eval_noise_shards > 0. limits: enforce data.max_shards / max_shard_tokens (training does; evaluate.py
    scores every episode of the file). chunk_documents(path, limit): a raw long-document file as episodes
    (data_tools.chunk_docs.chunk_raw_documents, passed in by the script: memrl does not import data_tools)."""
    path = path or cfg.data.eval_path
    if path == NO_EVAL:
        raise ConfigError(f"--data.eval_path={NO_EVAL}: no evaluation set; give one (--dataset=NAME=PATH)")
    if path and is_raw_documents(path):
        if chunk_documents is None:
            raise DataError(f"{path}: a raw long-document QA file; chunk it first (python -m data_tools.chunk_docs)")
        episodes = chunk_documents(path, cfg.data.eval_limit)
    elif path:
        count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None and limits else None
        episodes = load_episodes(path, max_shards=cfg.data.max_shards if limits else None,
                                 max_shard_tokens=cfg.data.max_shard_tokens if count else None, count_tokens=count)
    else:
        episodes = synthetic.make_episodes(SYNTHETIC_EVAL_SIZE, "eval", seed=synthetic.EVAL_SEED)
    if cfg.data.eval_limit:
        episodes = episodes[: cfg.data.eval_limit]
    if cfg.data.eval_noise_shards:
        episodes = noisy_episodes(episodes, load_passages(cfg.data.noise_path), "noisy", seed=cfg.train.seed,
                                  n_noise=cfg.data.eval_noise_shards)
    return episodes


@torch.no_grad()
def evaluate_policy(generator, tokenizer: Tokenizer, episodes: list[Episode], cfg: Config,
                    conditions=("memory",), batch_size: int = 256, window: int | None = None,
                    trace: list | None = None, samples: int = 0, desc: str = "eval",
                    progress: bool = True) -> dict[str, dict]:
    """Greedy score per condition: {condition: {"accuracy" (mean score), "n", "memory_tokens", "answer_tokens",
    "truncated_prompts", "episodes": [{"id", "condition", "score", "final_text", "finish_reason", ...}]}}.

    samples > 0: also "sampled_accuracy", the mean score of `samples` trajectories per episode sampled as training
    samples them (rollout.temperature / top_p / top_k). Its seed is fixed (train.seed and the episode ids), so two
    evaluations of the same weights agree and a curve over training compares like with like.
    On the synthetic task the memory condition also reports "facts_kept" (and "sampled_facts_kept"): the share of
    the asked facts its final memories hold (memrl.synthetic.facts_kept), the graded quantity behind the accuracy;
    "facts_asked" is that share's denominator for one trajectory per episode.
    window: fit prompts to this context window (FitToWindow); trace: a list to append every turn to (prompt and
    response text, as built, before any cut); desc: what is evaluated, for the progress bar (stderr) that counts
    episodes and shows the turn being generated."""
    templates = Templates.from_config(cfg.rollout)
    bar = tqdm(total=len(episodes) * len(conditions), desc=desc, unit="ep", file=sys.stderr, dynamic_ncols=True,
               disable=not progress, leave=False)
    generator = TurnTicker(FitToWindow(generator, window) if window is not None else generator, bar)
    synthetic_task = all(ep.metadata.get("source") == synthetic.SOURCE
                                                              for ep in episodes)
    out = {}
    for condition in conditions:
        bar.set_description(f"{desc} ({condition}, n={len(episodes)})")
        records, mem_tokens, ans_tokens, cut_before = [], [], [], generator.cut
        kept = [0, 0]  # asked facts held by the final memories, asked facts (synthetic task, memory condition)
        for i in range(0, len(episodes), batch_size):
            res = rollout(generator, tokenizer, episodes[i: i + batch_size], condition, 1, templates, cfg.rollout,
                          greedy=True, seed=cfg.train.seed, full_history_notes=False)  # notes do not change the answer
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
                           "response": decode_response(tokenizer, r.response_ids, r.prompt_ids)} for r in res.records]
            bar.update(len(res.trajectories))
        out[condition] = {"accuracy": sum(r["score"] for r in records) / len(records), "n": len(records),
                          "memory_tokens": sum(mem_tokens) / max(len(mem_tokens), 1),
                          "answer_tokens": sum(ans_tokens) / max(len(ans_tokens), 1),
                          "truncated_prompts": generator.cut - cut_before, "episodes": records}
        if kept[1]:
            out[condition].update(facts_kept=kept[0] / kept[1], facts_asked=kept[1])
        if samples:
            out[condition].update(sampled_scores(generator, tokenizer, episodes, cfg, condition, samples, batch_size,
                                                 synthetic_task))
    bar.close()
    return out


def sampled_scores(generator, tokenizer: Tokenizer, episodes: list[Episode], cfg: Config, condition: str,
                   samples: int, batch_size: int, synthetic_task: bool) -> dict:
    """{"sampled_accuracy", "samples"[, "sampled_facts_kept"]}: `samples` trajectories per episode at the training
    temperature, seeded from (train.seed, "eval-sampled") and the episode ids only."""
    templates = Templates.from_config(cfg.rollout)
    seed = derive_seed(cfg.train.seed, "eval-sampled")
    scores, kept = [], [0, 0]
    per_call = max(1, batch_size // samples)
    for i in range(0, len(episodes), per_call):
        res = rollout(generator, tokenizer, episodes[i: i + per_call], condition, samples, templates, cfg.rollout,
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
    return {c: acc["single_turn"]["accuracy"] - acc[c]["accuracy"] for c in CONDITIONS[1:] if c in acc}


class TurnTicker:
    """A generator that shows on the progress bar which turn of a batch it is generating (one generate() call per
    turn: memrl/rollout.py), so a long evaluation is visibly moving between the bar's per-batch updates."""

    def __init__(self, generator, bar):
        self.generator, self.bar, self.turns = generator, bar, 0

    def __getattr__(self, name):  # the wrapped generator's window, cfg, ... (rollout reads them)
        return getattr(self.generator, name)

    @property
    def cut(self) -> int:
        return getattr(self.generator, "cut", 0)

    @property
    def last_stats(self) -> dict:
        return self.generator.last_stats

    def generate(self, prompts, params, **kwargs):  # kwargs: KV continuation (the conversation condition)
        self.turns += 1
        self.bar.set_postfix_str(f"turn {self.turns}, {len(prompts)} prompts", refresh=True)
        return self.generator.generate(prompts, params, **kwargs)

    def free(self, handles) -> None:
        self.generator.free(handles)


class FitToWindow:
    """A generator whose prompts are cut in the middle to fit `window` minus the request's answer budget: the first
    and last halves are kept (LongBench pred.py), so the question, the template's head and the answer cue survive."""

    def __init__(self, generator, window: int):
        self.generator, self.window, self.cut = generator, window, 0

    @property
    def last_stats(self) -> dict:
        return self.generator.last_stats

    def generate(self, prompts: list[list[int]], params, **continuation):
        """continuation (the conversation condition's retain / extend / min_slot_len): passed on, prompts never cut
        (each turn's ids must extend the previous turn's; the rollout raises before a chat outgrows the window)."""
        if continuation:
            return self.generator.generate(prompts, params, **continuation)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        fitted = []
        for ids, p in zip(prompts, plist):
            keep = self.window - p.max_new_tokens
            if keep < 2:
                raise ConfigError(f"--rollout.response_max_tokens / memory_cap_tokens: a budget of {p.max_new_tokens} "
                                  f"tokens leaves no room for the prompt in the model's window of {self.window}")
            if len(ids) > keep:
                ids = ids[: keep // 2] + ids[len(ids) - (keep - keep // 2):]
                self.cut += 1
            fitted.append(ids)
        return self.generator.generate(fitted, params)

    def free(self, handles) -> None:
        self.generator.free(handles)
