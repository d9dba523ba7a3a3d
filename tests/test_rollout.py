"""Rollouts on a tiny random model: every prompt is checked against the template filled by hand (decoded text)."""
from __future__ import annotations

import pytest
import torch

from memrl import config as memrl_config
from memrl import synthetic, templates
from memrl.episodes import Episode
from memrl.generate import Generator
from memrl.hf_io import load_model
from memrl.config import RolloutCfg
from memrl.rollout import concat, decode_response, rollout
from memrl.templates import Templates
from memrl.tokenizer import Tokenizer
from tests.tiny import make_tiny_checkpoint

CAP, ANSWER = 5, 7  # memory cap and answer budget: a random model runs into both
BUDGETS = RolloutCfg(memory_cap_tokens=CAP, response_max_tokens=ANSWER)  # the rollout settings the tests use


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen2")
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(path)
    return Generator(model, tok.vocab_size), tok


def chat(text: str) -> str:
    """The byte tokenizer's ChatML wrapping of one user message, written out by hand."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def memory_prompt(q, m, s):
    return chat(f"<question> {q} </question>\n<memory> {m} </memory>\n<segment> {s} </segment>\nUpdated memory:")


def final_prompt(q, m):
    return chat(f"<question> {q} </question>\n<memory> {m} </memory>\nYour final answer:")


def decoded(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def as_text(tok, rec):
    """The memory a record leaves behind, computed here: response minus its stop token, decoded, stripped."""
    ids = rec.response_ids[:-1] if rec.finish_reason == "stop" else rec.response_ids
    return tok.decode(ids, skip_special_tokens=True).strip()


def episodes_of_mixed_length():
    eps = synthetic.make_episodes(3, "train", seed=7)
    eps[1] = Episode("short", eps[1].question, eps[1].shards[:2], "1")  # ends one turn earlier than the others
    return eps


def by_traj(result):
    out = {}
    for rec in result.records:
        out.setdefault(rec.trajectory_id, []).append(rec)
    return out


def test_memory_prompts_hold_question_memory_and_shard(policy):
    gen, tok = policy
    eps = episodes_of_mixed_length()
    G = 3
    res = rollout(gen, tok, eps, "memory", G, Templates(), BUDGETS, seed=1, step=0)
    assert [t.trajectory_id for t in res.trajectories] == list(range(len(eps) * G))
    recs = by_traj(res)
    for tr in res.trajectories:
        ep = eps[tr.group_id]
        assert tr.sample_index == tr.trajectory_id % G and tr.episode is ep
        turns = recs[tr.trajectory_id]
        assert [r.turn_index for r in turns] == list(range(len(ep.shards) + 1))
        assert [r.kind for r in turns] == ["memory"] * len(ep.shards) + ["final"]
        memory = "No previous memory."  # m_0
        for t, rec in enumerate(turns[:-1]):
            assert decoded(tok, rec.prompt_ids) == memory_prompt(ep.question, memory, ep.shards[t])
            assert 1 <= len(rec.response_ids) <= CAP  # the memory cap is the generation limit
            assert rec.finish_reason == ("stop" if rec.response_ids[-1] in tok.stop_ids else "length")
            memory = as_text(tok, rec)  # a memory cut at the cap is reused as is
            assert tr.memories[t] == memory
        assert decoded(tok, turns[-1].prompt_ids) == final_prompt(ep.question, memory)
        assert len(turns[-1].response_ids) <= ANSWER
        assert tr.final_text == as_text(tok, turns[-1])
        for rec in turns:
            assert rec.group_id == tr.group_id and len(rec.logprobs) == len(rec.response_ids)
            assert all(isinstance(x, float) and x <= 0 for x in rec.logprobs)
    assert any(r.finish_reason == "length" for r in res.records if r.kind == "memory")  # the cap did cut some


def test_all_live_trajectories_of_a_turn_form_one_generate_call(policy):
    gen, tok = policy
    eps = episodes_of_mixed_length()
    res = rollout(gen, tok, eps, "memory", 2, Templates(), BUDGETS, seed=1)
    # turns 0..3: the short episode's final turn (turn 2) shares a call with the others' last memory turn
    assert len(res.generate_stats) == 1 + max(len(e.shards) for e in eps)
    assert res.generate_stats[0]["rows"] == 6 and res.generate_stats[2]["rows"] == 6
    short = [r for r in res.records if r.group_id == 1 and r.kind == "final"]
    assert {r.turn_index for r in short} == {2}


def test_full_history_prompts_hold_all_previous_shards(policy):
    gen, tok = policy
    eps = episodes_of_mixed_length()
    res = rollout(gen, tok, eps, "full_history", 2, Templates(), BUDGETS, seed=2)
    recs = by_traj(res)
    for tr in res.trajectories:
        ep, turns = tr.episode, recs[tr.trajectory_id]
        for t, rec in enumerate(turns[:-1]):
            seen = "\n".join(ep.shards[:t]) if t else "No previous memory."
            assert decoded(tok, rec.prompt_ids) == memory_prompt(ep.question, seen, ep.shards[t])
        assert decoded(tok, turns[-1].prompt_ids) == final_prompt(ep.question, "\n".join(ep.shards))
    # evaluation may skip the notes: the final prompt does not depend on them
    res2 = rollout(gen, tok, eps, "full_history", 2, Templates(), BUDGETS, seed=2,
                   full_history_notes=False)
    assert all(r.kind == "final" for r in res2.records)
    assert [r.prompt_ids for r in res2.records] == [r.prompt_ids for r in res.records if r.kind == "final"]


def test_single_turn_prompt_holds_the_whole_problem(policy):
    gen, tok = policy
    eps = synthetic.make_episodes(2, "eval")
    eps.append(Episode("p", "How much?", ["A has 2.", "B has 3."], "5", {"problem": "A has 2. B has 3. How much?"}))
    res = rollout(gen, tok, eps, "single_turn", 2, Templates(), BUDGETS, seed=3)
    assert len(res.records) == 6 and all(r.kind == "final" and r.turn_index == 0 for r in res.records)
    for rec in res.records:
        ep = eps[rec.group_id]
        problem = ep.metadata.get("problem") or " ".join(ep.shards)
        text = f"<question> {ep.question} </question>\n<problem> {problem} </problem>\nYour final answer:"
        assert decoded(tok, rec.prompt_ids) == chat(text)


def test_noise_shards_land_where_the_variant_says(policy):
    from memrl.noise import Passage, make_variant, noisy_episodes, problem_shards

    gen, tok = policy
    passages = [Passage(f"Noise passage number {i} about a river.", i + 1) for i in range(40)]
    ep = synthetic.make_episodes(1, "train", seed=3)[0]
    # offline variant (data_tools places the noise, metadata says where): the rollout plays shards in order
    mixed = make_variant(ep.to_json(), "mixed", passages, seed=5)
    mixed_ep = Episode(mixed["id"], mixed["question"], mixed["shards"], mixed["answer"], mixed["metadata"])
    # evaluation noise: n = 2 passages after every problem shard
    noisy_ep = noisy_episodes([ep], passages, "noisy", n_noise=2, seed=5)[0]
    assert noisy_ep.noise_positions == [3 * i + j for i in range(len(ep.shards)) for j in (1, 2)]  # [1, 2, 4, 5, ...]
    for e in (mixed_ep, noisy_ep):
        assert problem_shards(e.to_json()) == ep.shards  # problem shards keep text and order
        res = rollout(gen, tok, [e], "memory", 1, Templates(), BUDGETS, seed=4)
        turns = by_traj(res)[0]
        assert len(turns) == len(e.shards) + 1
        for t, rec in enumerate(turns[:-1]):
            text = decoded(tok, rec.prompt_ids)
            segment = text.split("<segment> ")[1].split(" </segment>")[0]
            assert segment == e.shards[t]
            assert segment.startswith("Noise passage") == (t in e.noise_positions)


def test_seeds_are_derived_not_drawn(policy):
    gen, tok = policy
    eps = synthetic.make_episodes(2, "train", seed=9)

    def run(**kw):
        args = dict(seed=5, step=3) | kw
        res = rollout(gen, tok, eps, "memory", 3, Templates(), BUDGETS, **args)
        return [r.response_ids for r in res.records]

    torch.manual_seed(123)
    a = run()
    torch.manual_seed(456)  # the global RNG plays no part
    assert run() == a
    assert run(step=4) != a and run(seed=6) != a
    # the G samples of a problem share turn 0's prompt (one request, n = G) yet sample differently
    first = [r.response_ids for r in rollout(gen, tok, eps[:1], "memory", 3, Templates(), BUDGETS,
                                             seed=5, step=3).records if r.turn_index == 0]
    assert len({tuple(x) for x in first}) > 1
    # greedy decoding: every sample identical
    greedy = rollout(gen, tok, eps[:1], "memory", 3, Templates(), BUDGETS, greedy=True, seed=5)
    assert len({tuple(t.memories) for t in greedy.trajectories}) == 1


def test_concat_and_select_renumber_densely(policy):
    gen, tok = policy
    eps = synthetic.make_episodes(2, "train", seed=11)
    a = rollout(gen, tok, eps, "memory", 2, Templates(), BUDGETS, seed=1)
    b = rollout(gen, tok, eps[:1], "single_turn", 2, Templates(), BUDGETS, seed=1)
    both = concat([a, b], keep=[[False, False, True, True], [True, True]])
    assert [t.trajectory_id for t in both.trajectories] == [0, 1, 2, 3]
    assert [t.group_id for t in both.trajectories] == [0, 0, 1, 1]
    assert sorted({r.trajectory_id for r in both.records}) == [0, 1, 2, 3]
    kept_a = [r for r in a.records if r.trajectory_id >= 2]
    assert [r.response_ids for r in both.records if r.trajectory_id < 2] == [r.response_ids for r in kept_a]
    sel = a.select([True, False, False, True])
    assert [t.trajectory_id for t in sel.trajectories] == [0, 1] and [t.group_id for t in sel.trajectories] == [0, 1]


def test_templates_are_the_papers_figure_4_and_fill_verbatim():
    cfg = memrl_config.RolloutCfg()
    assert Templates.from_config(cfg) == Templates()  # the config's defaults are these templates
    tpl = Templates()
    q = "What is \\frac{1}{2} of {memory}?"  # braces in the question are inserted verbatim, never re-filled
    assert tpl.memory_turn(q, "m {segment}", "s") == (
        f"<question> {q} </question>\n<memory> m {{segment}} </memory>\n<segment> s </segment>\nUpdated memory:")
    assert tpl.final_turn(q, "m") == f"<question> {q} </question>\n<memory> m </memory>\nYour final answer:"
    with pytest.raises(AssertionError):
        Templates(memory="no placeholders")
    assert templates.INITIAL_MEMORY == cfg.initial_memory


def test_decode_response_drops_only_the_stop_token(policy):
    _, tok = policy
    stop = max(tok.stop_ids)
    assert decode_response(tok, tok.encode(" Bob has 7. ") + [stop]) == "Bob has 7."
    assert decode_response(tok, tok.encode("Bob ha")) == "Bob ha"  # cut: kept as is


def test_synthetic_task_splits_answers_and_demonstrator():
    import random
    from collections import Counter

    from memrl.reward import score

    train = synthetic.make_episodes(300, "train")
    held_out = synthetic.make_episodes(200, "eval", seed=synthetic.EVAL_SEED)
    key = lambda e: (e.question, tuple(e.shards))  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in held_out}
    assert synthetic.make_episodes(5, "train")[4].to_json() == train[4].to_json()  # a pure function of the seed
    task = synthetic.CoinSum()
    for ep in train:  # the answer, read off the text here by plain string handling, is the asked people's total
        asked = ep.question.removeprefix("How many coins do ").removesuffix(" have?").replace(" and ", ", ").split(", ")
        coins = {s.split(" has ")[0]: int(s.split(" has ")[1].rstrip(".")) for s in ep.shards}
        assert len(coins) == len(ep.shards) and set(asked) <= set(coins)  # nobody twice, every asked person present
        assert 2 <= len(asked) <= 3 and 1 <= len(ep.shards) - len(asked) <= 2
        assert int(ep.answer) == sum(coins[a] for a in asked)
        full = synthetic.perfect_memories(ep)[-1]
        assert score(synthetic.answer_text(asked, full), ep.answer, "gsm8k") == 1.0  # the demonstration is right
        renamed = [(asked[0], c) for _, c in full]  # every number kept, under one asked person's name
        assert score(synthetic.answer_text(asked, renamed), ep.answer, "gsm8k") == 0.0
        assert synthetic.facts_kept(ep, synthetic.memory_text(full)) == (len(asked), len(asked))
        assert synthetic.facts_kept(ep, synthetic.memory_text(full[1:]))[0] == len(asked) - 1
    # the forgetful demonstrator re-copies a held fact with its person's recall: counted here from its memories
    rng, carried, held = random.Random(0), Counter(), Counter()
    for ep in synthetic.make_episodes(4000, "train", distinct=False):
        memories = synthetic.forgetful_memories(ep, rng)
        for before, after in zip(memories, memories[1:]):
            for fact in before:
                held[fact[0]] += 1
                carried[fact[0]] += fact in after
        asked = set(synthetic.parse_episode(ep)[0])
        assert all(n in asked for m in memories for n, _ in m)  # distractors never enter the memory
    for name, recall in zip(task.names, task.recall):
        assert abs(carried[name] / held[name] - recall) < 0.05, name
    # a trivial policy cannot score: no total is common
    answer, acc = synthetic.best_constant_accuracy(held_out)
    assert acc == max(Counter(e.answer for e in held_out).values()) / len(held_out) < 0.15
