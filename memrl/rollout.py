"""Rollouts: a batch of episodes x G samples under one condition -> turn records + final answers (DESIGN §3.2, §4).

    memory        turn t: (question, m_{t-1}, shard t) -> m_t        final: (question, m_T) -> answer
    conversation  one chat: user (question, shard t) -> assistant reply, ..., user (question, final) -> answer;
                  every turn's prompt is the whole chat so far, token-in/token-out (memrl/conversation.py): the
                  paper's full-history TRAINING baseline, trained as one row per trajectory (training_records)
    full_history  turn t: (question, shards 1..t-1, shard t) -> a note that is NOT carried forward
                  final: (question, shards 1..T) -> answer: the paper's full-history EVALUATION condition (§4),
                  not a training condition (the notes are never read, so nothing would credit them)
    single_turn   one turn: (question, the whole problem) -> answer

Invariants:
- Turn by turn, every live trajectory's prompt goes to the Generator in ONE generate() call (episodes with fewer
  shards take their final turn in the same call as the others' memory turns). Trajectories of one problem whose
  prompts are identical (all G at the first memory turn, all G at every full-history turn) are one request with n
  samples: one prefill, the KV cache forked.
- Conversation turns continue from the conversation's retained K/V (kv_reuse, memrl/kv_retain.py): each call
  prefills only the previous reply's last token and the new user message; the retained K/V of every
  trajectory is freed when its conversation ends (or the rollout raises).
- The memory is what the model wrote: the response decoded without its stop token, surrounding whitespace stripped.
  A memory turn may generate at most `memory_cap_tokens` tokens (the cap IS the generation limit, paper A.1); a
  memory cut by the cap is reused as is. m_0 is Templates.initial_memory ("No previous memory.").
- Thinking models (Qwen3: `<think> reasoning </think> reply`, where the chat template may already have opened
  `<think>` in the prompt): the memory is the reply after the last `</think>`, and the answer the reward reads is the
  final turn's reply after it; a turn cut inside its reasoning wrote no reply (memory "", answer ""). The cap bounds
  what is carried forward, the memory, and reasoning gets its own allowance: a turn may generate
  `thinking_budget_tokens` + its budget (memory_cap_tokens / response_max_tokens), and a reply longer than its budget
  is cut there, its record too (as if generation had stopped at the cap: finish "length"). Why not one cap over the
  whole turn: the memory must stay bounded by memory_cap_tokens (the paper's point: bounded state), while a thinking
  model's reasoning alone runs to hundreds of tokens per turn; under one 256-token cap almost every memory turn would
  be cut inside its reasoning and carry nothing. Reasoning tokens are trained like any others (the policy wrote them)
  but never carried to the next turn. Models without `</think>` in their vocabulary: the reply is the whole response,
  thinking_budget_tokens should stay 0 (it only adds room the cut then takes back).
- Every generated turn is one TurnRecord (memrl.algo): prompt ids, response ids (stop token included), the sampler's
  fp32 log-probs, dense trajectory id, group id (= the problem's index in this batch), turn index, kind.
- Seeds (STYLE 10): a request's seed is a hash of (run seed, step, episode id, turn, first sample index); the
  generator gives each of its n samples its own stream from that seed. A trajectory's tokens therefore depend only
  on the seed, the step, its problem, its sample index and the policy, never on the rest of the batch or on
  wall-clock state. The episode id is global (not the problem's index in this call), so N ranks each rolling out
  their slice of a step's problems sample what one process rolling out all of them samples.
- Benchmarks on random weights (rollout.ignore_eos: no stop ids) may set a length profile: each request's
  max_new_tokens is then drawn from a real model's length distribution (memrl/length_profile.py), seeded from the
  request's seed, so the packed sequences are as uneven as in training. Its n samples share the draw.
- Dynamic sampling (DAPO §3.2, algo.dynamic_sampling): a step keeps only the groups whose rewards differ (equal
  rewards: zero advantage, no gradient) and rolls out more problems until it has enough (DynamicSampler, at most
  algo.max_sampling_rounds rounds); concat joins the kept parts of every round into one batch.
- Noise shards (memrl/noise.py) are shards like any other: an episode holds them (metadata.noise_positions), placed
  offline by data_tools.noise or at run time by noise.noisy_episodes, and a rollout plays every shard in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memrl.algo import TurnRecord
from memrl.config import CONDITIONS, RolloutCfg
from memrl.conversation import ConversationTurns, conversation_rows
from memrl.episodes import Episode
from memrl.generate import Generator, SamplingParams
from memrl.length_profile import length_limit
from memrl.sampling import derive_seed
from memrl.templates import PROBLEM_SEPARATOR, Templates
from memrl.tokenizer import Tokenizer

@dataclass
class Trajectory:
    trajectory_id: int  # dense 0..n-1 in this result: indexes rewards and advantages
    group_id: int  # the problem's index in the batch; the G samples of a problem share it
    sample_index: int  # 0..G-1
    episode: Episode
    memories: list[str] = field(default_factory=list)  # m_1..m_T (memory condition; notes for full-history)
    final_text: str = ""  # the final turn's response, decoded (what the reward reads)
    final_finish_reason: str = "stop"


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]
    records: list[TurnRecord]  # turn-major: every trajectory's turn 0, then turn 1, ...
    generate_stats: list[dict] = field(default_factory=list)  # Generator.last_stats of each generate() call
    condition: str = ""

    def training_records(self) -> list[TurnRecord]:
        """What the trainer packs: the turn records, except under `conversation`: one row per trajectory holding
        the whole chat, its loss on every assistant reply (memrl.conversation.conversation_row)."""
        return conversation_rows(self.records) if self.condition == "conversation" else self.records

    def select(self, keep: Sequence[bool]) -> "RolloutResult":
        """Only the trajectories with keep[i] (e.g. dynamic sampling), ids renumbered densely in order."""
        assert len(keep) == len(self.trajectories)
        return concat([self], keep=[list(map(bool, keep))])


def concat(results: Sequence[RolloutResult], keep: Sequence[Sequence[bool]] | None = None) -> RolloutResult:
    """Several rollouts as one batch: trajectory ids and group ids renumbered densely (groups stay groups)."""
    trajs, records, stats = [], [], []
    conditions = {res.condition for res in results}
    # a conversation's turn records merge into one training row each: never mixed with other conditions' records
    assert "conversation" not in conditions or len(conditions) == 1, f"conversation mixed with {conditions}"
    for r_i, res in enumerate(results):
        kept = [t for i, t in enumerate(res.trajectories) if keep is None or keep[r_i][i]]
        traj_map = {t.trajectory_id: len(trajs) + k for k, t in enumerate(kept)}
        group_base = 1 + max((t.group_id for t in trajs), default=-1)
        group_map = {g: group_base + k for k, g in enumerate(dict.fromkeys(t.group_id for t in kept))}
        for t in kept:
            trajs.append(Trajectory(traj_map[t.trajectory_id], group_map[t.group_id], t.sample_index, t.episode,
                                    t.memories, t.final_text, t.final_finish_reason))
        for rec in res.records:
            if rec.trajectory_id in traj_map:
                records.append(TurnRecord(rec.prompt_ids, rec.response_ids, rec.logprobs,
                                          traj_map[rec.trajectory_id], group_map[rec.group_id], rec.turn_index,
                                          rec.kind, rec.finish_reason, rec.response_spans))
        stats += res.generate_stats
    records.sort(key=lambda r: r.turn_index)  # stable: turn-major, trajectory order within a turn
    return RolloutResult(trajs, records, stats, conditions.pop() if len(conditions) == 1 else "")


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)

def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Keep mask [n] bool: False for every trajectory of a group whose rewards are all equal (zero advantage, no
    gradient: DAPO §3.2 "Dynamic Sampling")."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    r = rewards.double()
    gmax = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amin")
    return (gmax > gmin)[inverse]


class DynamicSampler:
    """Collects groups with mixed rewards over generation rounds until `target_groups` are kept, for at most
    `max_rounds` rounds (verl's max_num_gen_batches). Usage:

        sampler = DynamicSampler(target_groups=B, max_rounds=cfg.max_sampling_rounds)
        while sampler.need_more():
            ...generate a round...; keep = sampler.add(rewards, group_ids)   # trims past the target
        if sampler.exhausted(): print(sampler.message())                     # too easy / too hard
    """

    def __init__(self, target_groups: int, max_rounds: int):
        assert target_groups > 0 and max_rounds > 0, (target_groups, max_rounds)
        self.target_groups, self.max_rounds = target_groups, max_rounds
        self.rounds = self.kept = self.seen = 0
        self.all_solved = self.all_failed = self.all_equal_other = 0

    def add(self, rewards: torch.Tensor, group_ids: torch.Tensor, max_reward: float = 1.0,
            min_reward: float = 0.0) -> torch.Tensor:
        """Keep mask [n] for this round: mixed-reward groups, in order of first appearance, up to the target."""
        self.rounds += 1
        keep = filter_groups(rewards, group_ids)
        uniq, first = [], {}
        for i, g in enumerate(group_ids.tolist()):
            if g not in first:
                first[g] = i
                uniq.append(g)
        for g in uniq:
            i = first[g]
            self.seen += 1
            if keep[i]:
                if self.kept < self.target_groups:
                    self.kept += 1
                else:  # past the target: drop the whole group
                    keep = keep & (group_ids != g)
            elif rewards[i] >= max_reward:
                self.all_solved += 1
            elif rewards[i] <= min_reward:
                self.all_failed += 1
            else:
                self.all_equal_other += 1
        return keep

    def done(self) -> bool:
        return self.kept >= self.target_groups

    def need_more(self) -> bool:
        return not self.done() and self.rounds < self.max_rounds

    def exhausted(self) -> bool:
        return not self.done() and self.rounds >= self.max_rounds

    def message(self) -> str:
        seen = max(self.seen, 1)
        solved, failed = self.all_solved / seen, self.all_failed / seen
        verdict = ("the data are too easy for this policy" if solved > failed
                   else "the data are too hard for this policy" if failed > solved
                   else "too many groups have equal rewards")
        return (f"dynamic sampling: after {self.rounds} round(s) only {self.kept}/{self.target_groups} groups have "
                f"mixed rewards ({self.all_solved}/{self.seen} groups all solved, {self.all_failed} all failed, "
                f"{self.all_equal_other} otherwise equal): {verdict}. Raise algo.max_sampling_rounds, turn "
                f"algo.dynamic_sampling off, or change the data/group size.")


# ----------------------------------------------------------------------------- prompts

def problem_text(ep: Episode) -> str:
    """The whole problem for the single-turn condition: data_tools' metadata.problem when present (the original
    text), else the problem shards (noise shards left out) joined back together."""
    if ep.metadata.get("problem"):
        return ep.metadata["problem"]
    noise = set(ep.noise_positions)
    return PROBLEM_SEPARATOR.join(s for i, s in enumerate(ep.shards) if i not in noise)


# ----------------------------------------------------------------------------- the rollout

def rollout(
    generator: Generator,
    tokenizer: Tokenizer,
    episodes: Sequence[Episode],
    condition: str,
    group_size: int,
    templates: Templates,
    settings: RolloutCfg,
    greedy: bool = False,
    seed: int = 0,
    step: int = 0,
    full_history_notes: bool = True,
    kv_reuse: bool = True,
) -> RolloutResult:
    """len(episodes) x group_size trajectories under `condition`.

    settings: the config's rollout section: the turn budgets (memory_cap_tokens, response_max_tokens,
    thinking_budget_tokens) and how to sample (temperature, top_p, top_k, ignore_eos, length_profile); its
    condition and group_size are not read (evaluation plays other conditions, one sample each). greedy: decode
    greedily (evaluation) instead of sampling.
    full_history_notes: generate the intermediate full-history turns (their notes are not carried forward, so they
    do not change the answer: evaluation skips them).
    kv_reuse: conversation turns continue from the conversation's retained K/V (False: every turn prefills the
    whole chat again; the tests and the benchmark compare the two).
    """
    assert condition in CONDITIONS, f"condition must be one of {CONDITIONS}, got {condition!r}"
    assert group_size >= 1 and len(episodes) >= 1
    trajs = [Trajectory(g * group_size + s, g, s, ep) for g, ep in enumerate(episodes) for s in range(group_size)]
    memory = [templates.initial_memory] * len(trajs)
    records: list[TurnRecord] = []
    stats: list[dict] = []
    stop_ids = frozenset() if settings.ignore_eos else frozenset(tokenizer.stop_ids)
    chats = None
    if condition == "conversation":
        window = getattr(generator, "window", None) or generator.cfg.max_position_embeddings
        chats = ConversationTurns(tokenizer, templates, window, kv_reuse)

    def budget(kind: str) -> int:  # of the reply; reasoning may take thinking_budget_tokens more
        return settings.memory_cap_tokens if kind == "memory" else settings.response_max_tokens

    def params(kind: str, n: int, request_seed: int) -> SamplingParams:
        limit = budget(kind)
        if settings.length_profile:  # random weights never stop: a real model's length (its n samples share it)
            limit = length_limit(settings.length_profile, kind, derive_seed(request_seed, "length"), limit)
        return SamplingParams(max_new_tokens=limit + settings.thinking_budget_tokens,
                              temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                              greedy=greedy, stop_ids=stop_ids, n=n, seed=request_seed)

    n_turns = 1 if condition == "single_turn" else 1 + max(len(ep.shards) for ep in episodes)
    slot_len = chats.slot_len(episodes, settings.memory_cap_tokens, settings.response_max_tokens) if chats else 0
    try:
        for turn in range(n_turns):
            # (trajectory, kind, prompt) for every trajectory alive at this turn: the text, or (conversation) ids
            work: list[tuple[Trajectory, str, str | list[int]]] = []
            for tr in trajs:
                ep, k = tr.episode, len(tr.episode.shards)
                if condition == "single_turn":
                    work.append((tr, "final", templates.single_turn_prompt(ep.question, problem_text(ep))))
                elif condition == "conversation":
                    if turn <= k:
                        work.append((tr, "memory" if turn < k else "final", chats.prompt_ids(tr, turn)))
                elif turn < k and condition == "memory":
                    work.append((tr, "memory", templates.memory_turn(ep.question, memory[tr.trajectory_id],
                                                                     ep.shards[turn])))
                elif turn < k and full_history_notes:  # full_history
                    seen = templates.history(ep.shards[:turn])
                    work.append((tr, "memory", templates.memory_turn(ep.question, seen, ep.shards[turn])))
                elif turn == k:
                    held = memory[tr.trajectory_id] if condition == "memory" else templates.history(ep.shards)
                    work.append((tr, "final", templates.final_turn(ep.question, held)))
            if not work:
                continue
            # one request per distinct prompt within a problem: n = how many of its samples share it (a conversation
            # that continues retained K/V is a request of its own)
            requests: dict[tuple, list[tuple[Trajectory, str]]] = {}
            for tr, kind, prompt in work:
                key = (tr.group_id, prompt) if chats is None else (tr.group_id, chats.extends(tr), tuple(prompt))
                requests.setdefault(key, []).append((tr, kind))
            prompts, plist, members = [], [], []
            for key, trs in requests.items():
                first = trs[0][0]
                prompts.append(tokenizer.encode_prompt(key[1]) if chats is None else list(key[2]))
                plist.append(params(trs[0][1], len(trs), derive_seed(seed, step, first.episode.id, turn,
                                                                     first.sample_index)))
                members.append(trs)
            kw = {}
            if chats is not None:  # KV continuation: retain every reply a next turn extends; a fixed slot layout
                reuse = chats.kv_reuse
                kw = dict(retain=[reuse and trs[0][1] == "memory" for trs in members],
                          extend=[chats.extends(trs[0][0]) if reuse else None for trs in members],
                          min_slot_len=slot_len)
            completions = generator.generate(prompts, plist, **kw)
            stats.append(dict(generator.last_stats))
            for c in completions:  # ordered by (prompt_index, sample_index)
                tr, kind = members[c.prompt_index][c.sample_index]
                prompt, ids, logprobs, finish = prompts[c.prompt_index], list(c.token_ids), c.logprobs, c.finish_reason
                start = reply_start(tokenizer, prompt, ids)
                # only the reasoning allowance lets a reply outgrow its budget (short reasoning, long reply): cut it
                # there. Never in a conversation: its next prompt extends exactly the generated (and retained) ids
                if (chats is None and settings.thinking_budget_tokens and start is not None
                        and len(ids) - start > budget(kind)):
                    ids, logprobs, finish = ids[:start + budget(kind)], logprobs[:start + budget(kind)], "length"
                text = decode_response(tokenizer, ids, prompt)
                records.append(TurnRecord(prompt_ids=prompt, response_ids=ids, logprobs=[float(x) for x in logprobs],
                                          trajectory_id=tr.trajectory_id, group_id=tr.group_id, turn_index=turn,
                                          kind=kind, finish_reason=finish))
                if chats is not None:
                    chats.record(tr, turn, prompts[c.prompt_index], c)
                if kind == "memory":
                    tr.memories.append(text)
                    if condition == "memory":
                        memory[tr.trajectory_id] = text
                else:
                    tr.final_text, tr.final_finish_reason = text, finish
    finally:  # the retained K/V of conversations that ended early, or of all of them if a turn raised
        if chats is not None:
            chats.free(generator)
    records.sort(key=lambda r: (r.turn_index, r.trajectory_id))
    return RolloutResult(trajs, records, stats, condition)


def reply_start(tokenizer: Tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> int | None:
    """Where the reply begins in a response: after the last `</think>` of a thinking model, 0 when there is no
    reasoning, None when the turn was cut (or stopped) inside its reasoning and so has no reply at all.

    Reasoning is open when the response opens `<think>`, or when the prompt does (Qwen3 thinking templates end the
    generation prompt with `<think>`) without closing it. Our prompts are one user message plus the template's
    generation prompt, so a `<think>` in the prompt can only come from the template.
    """
    end = tokenizer.think_end_id
    if end is None:  # not a thinking vocabulary
        return 0
    ids, prompt = list(token_ids), list(prompt_ids)
    closed = _last_index(ids, end)
    if closed >= 0:
        return closed + 1
    start = tokenizer.think_start_id
    opened = start is not None and (start in ids or _last_index(prompt, start) > _last_index(prompt, end))
    return None if opened else 0


def _last_index(seq: list[int], token: int) -> int:
    return len(seq) - 1 - seq[::-1].index(token) if token in seq else -1


def decode_response(tokenizer: Tokenizer, token_ids: Sequence[int], prompt_ids: Sequence[int] = ()) -> str:
    """A response as text: the reasoning (up to the last `</think>`) and the stop token dropped, surrounding
    whitespace stripped (a reply cut by its budget is kept as is; one cut inside its reasoning is "").
    prompt_ids: the turn's prompt, to see reasoning the chat template opened there (reply_start)."""
    start = reply_start(tokenizer, prompt_ids, token_ids)
    if start is None:
        return ""
    ids = list(token_ids)[start:]
    if ids and ids[-1] in tokenizer.stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
