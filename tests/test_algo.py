"""Algorithm tests against hand-computed cases and a float64 reference written here (DESIGN.md §5)."""
import math
import random

import pytest
import torch

from memrl.algo import (TurnRecord, broadcast_advantages, count_response_tokens, group_advantages, overlong_penalty,
                        pack_turns, policy_loss)
from memrl.config import AlgoCfg
from memrl.rollout import DynamicSampler, filter_groups

NO_KL = AlgoCfg(kl_coef=0.0)  # the loss settings of the tests without a reference model


# ----------------------------------------------------------------------------- advantages

def test_drgrpo_advantages_hand_computed():
    # groups interleaved on purpose: group ids need not be contiguous or sorted
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3, 7, 5, 5])
    # group 7: [1, 0, 0, 0] mean .25; group 3: [1, 1, 1] mean 1; group 5: [1, 0] mean .5
    expected = torch.tensor([0.75, 0.0, -0.25, 0.0, -0.25, 0.0, -0.25, 0.5, -0.5])
    assert torch.equal(group_advantages(rewards, groups), expected)


def test_grpo_std_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: mean .5, deviations ±.5, unbiased std = sqrt(4 · .25 / 3) = sqrt(1/3); group 1: all equal -> 0
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, groups, std_normalize=True), expected, rtol=0, atol=1e-7)


def test_single_trajectory_group_has_zero_advantage():
    for std in (False, True):
        assert torch.equal(group_advantages(torch.tensor([1.0]), torch.tensor([0]), std_normalize=std),
                           torch.tensor([0.0]))


def test_broadcast_advantages():
    adv = torch.tensor([0.5, -0.5, 2.0])
    out = broadcast_advantages(adv, trajectory_ids=[2, 0, 2, 1], response_lengths=[1, 3, 0, 2])
    assert torch.equal(out, torch.tensor([2.0, 0.5, 0.5, 0.5, -0.5, -0.5]))


def test_overlong_penalty_hand_computed():
    # L_max 10, L_cache 4: free up to 6, then −1/4 per token, −1 at 10 and beyond
    lengths = torch.tensor([0, 6, 7, 9, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
    assert torch.equal(overlong_penalty(lengths, max_tokens=10, cache_tokens=4), expected)


# ----------------------------------------------------------------------------- packing and the broadcast

def _records(seed=0, n_groups=3, group_size=3, turns=(1, 4)):
    """Memory-style trajectories: several memory turns then a final turn, random lengths; ids dense per trajectory."""
    rng = random.Random(seed)
    records = []
    for g in range(n_groups):
        for s in range(group_size):
            traj = g * group_size + s
            n_mem = rng.randint(*turns)
            for t in range(n_mem + 1):
                p, r = rng.randint(1, 12), rng.randint(1, 9)
                records.append(TurnRecord(
                    prompt_ids=[rng.randrange(100, 200) for _ in range(p)],
                    response_ids=[rng.randrange(200, 300) for _ in range(r)],  # disjoint id range from prompts
                    logprobs=[-rng.random() for _ in range(r)], trajectory_id=traj, group_id=g, turn_index=t,
                    kind="final" if t == n_mem else "memory"))
    rng.shuffle(records)  # the packer must not rely on any order
    return records


@pytest.mark.parametrize("by_length", [False, True])
@pytest.mark.parametrize("budget", [1, 16, 40, 10_000])
def test_pack_turns_layout_and_broadcast(budget, by_length):
    records = _records()
    n_traj = 9
    traj_adv = torch.tensor([0.25 * (i - 4) for i in range(n_traj)])  # distinct per trajectory
    batches = pack_turns(records, traj_adv, max_tokens=budget, by_length=by_length)
    seen = []
    for b in batches:
        T = b.num_tokens
        assert b.input_ids.shape == b.positions.shape == b.seq_ids.shape == (1, T)
        assert b.targets.shape == b.response_mask.shape == (T,)
        assert T <= budget or len(b.record_indices) == 1  # only a lone over-long record exceeds the budget
        assert torch.equal(b.response_rows, b.response_mask.nonzero().squeeze(1))
        start = 0
        for s, k in enumerate(b.record_indices):
            rec = records[k]
            P, R = len(rec.prompt_ids), len(rec.response_ids)
            rows = slice(start, start + P + R - 1)
            full = rec.prompt_ids + rec.response_ids
            assert b.input_ids[0, rows].tolist() == full[:-1]
            assert b.targets[rows].tolist() == full[1:]
            assert b.positions[0, rows].tolist() == list(range(P + R - 1))  # restart per sequence
            assert b.seq_ids[0, rows].tolist() == [s] * (P + R - 1)
            # the mask is exactly the rows whose target is a response token; prompt targets never
            assert b.response_mask[rows].tolist() == [False] * (P - 1) + [True] * R
            start += P + R - 1
            seen.append(k)
        assert start == T
        # compact vectors: exactly A_i on every response token of trajectory i, in row order
        owners = [records[k].trajectory_id for k in b.record_indices for _ in records[k].response_ids]
        assert torch.equal(b.advantages, traj_adv[owners])
        assert b.targets[b.response_rows].tolist() == [t for k in b.record_indices for t in records[k].response_ids]
        assert all(t >= 200 for t in b.targets[b.response_rows].tolist())  # no prompt token is a target
        assert torch.equal(b.rollout_logprobs,
                           torch.tensor([lp for k in b.record_indices for lp in records[k].logprobs]))
    if by_length:  # every record once, longest first, ties in record order
        lengths = [len(records[k].prompt_ids) + len(records[k].response_ids) for k in seen]
        assert sorted(seen) == list(range(len(records)))
        assert seen == sorted(seen, key=lambda k: (-lengths[seen.index(k)], k))
    else:
        assert seen == list(range(len(records)))  # every record once, in order
    assert [len(b.record_indices) for b in batches] == [len(b.seq_lengths) for b in batches]
    assert all(b.seq_lengths == [len(records[k].prompt_ids) + len(records[k].response_ids) - 1
                                 for k in b.record_indices] for b in batches)
    assert sum(b.num_response_tokens for b in batches) == count_response_tokens(records)


def test_every_turn_of_a_trajectory_gets_its_advantage():
    # trajectory-level view of the broadcast: memory turns and the final turn carry the same A_i
    records = _records(seed=1)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    traj_adv = group_advantages(rewards, groups)
    per_traj: dict[int, set] = {}
    for b in pack_turns(records, traj_adv, max_tokens=64):
        pos = 0
        for k in b.record_indices:
            r = len(records[k].response_ids)
            per_traj.setdefault(records[k].trajectory_id, set()).update(b.advantages[pos:pos + r].tolist())
            pos += r
    assert {i: s for i, s in per_traj.items()} == {i: {traj_adv[i].item()} for i in range(9)}


def test_turn_record_invariants():
    with pytest.raises(AssertionError):
        TurnRecord([1], [2, 3], [-0.1], 0, 0, 0, "final")  # logprobs misaligned
    with pytest.raises(AssertionError):
        TurnRecord([], [2], [-0.1], 0, 0, 0, "final")  # no prompt token to predict the first response token
    with pytest.raises(AssertionError):
        TurnRecord([1], [2], [-0.1], 0, 0, 0, "answer")
    for spans in ([], [(0, 2), (1, 3)], [(2, 1)], [(0, 5)], [(1, 1)]):  # empty, overlapping, reversed, out, empty span
        with pytest.raises(AssertionError):
            TurnRecord([1], [2, 3, 4, 5], [-0.1] * 2, 0, 0, 0, "conversation", response_spans=spans)


def test_conversation_row_masks_exactly_the_replies():
    """One record holding a whole chat: the loss rows are the replies' tokens, the user messages between are not."""
    # first prompt [1, 2, 3]; then reply 0 = [10, 11], user message = [20, 21, 22], reply 1 = [12, 13, 14]
    row = TurnRecord([1, 2, 3], [10, 11, 20, 21, 22, 12, 13, 14], [-0.1, -0.2, -0.3, -0.4, -0.5], trajectory_id=1,
                     group_id=0, turn_index=1, kind="conversation", response_spans=[(0, 2), (5, 8)])
    plain = TurnRecord([7, 8], [9], [-0.9], trajectory_id=0, group_id=0, turn_index=0, kind="final")
    assert row.num_response_tokens == 5 and count_response_tokens([plain, row]) == 6
    b = pack_turns([plain, row], torch.tensor([0.5, -1.5]), max_tokens=100)[0]
    # rows: plain 2 (7->8, 8->9); row 10 (1->2, 2->3, 3->10, 10->11, 11->20, 20->21, 21->22, 22->12, 12->13, 13->14)
    assert b.response_mask.tolist() == [False, True] + [False, False, True, True, False, False, False, True, True, True]
    assert b.targets[b.response_rows].tolist() == [9, 10, 11, 12, 13, 14]  # every reply token, nothing else
    assert b.advantages.tolist() == [0.5] + [-1.5] * 5
    assert torch.equal(b.rollout_logprobs, torch.tensor([-0.9, -0.1, -0.2, -0.3, -0.4, -0.5]))
    assert b.response_record.tolist() == [0, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------- loss (through kernels.ppo_loss)

def ref_loss64(logp, old, ref, adv, n, eps_low=0.2, eps_high=0.28, c=3.0, beta=0.0, kl_type="k3"):
    """DESIGN.md §5 written out token by token in float64 (independent of the kernel)."""
    total = 0.0
    for i in range(len(logp)):
        d = 0.0 if old is None else max(-20.0, min(20.0, logp[i] - old[i]))
        rho = math.exp(d)
        pg = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps_low), 1 + eps_high))
        if adv[i] < 0:
            pg = min(pg, -c * adv[i])
        kl = 0.0
        if ref is not None:
            k = max(-20.0, min(20.0, ref[i] - logp[i]))
            kl = {"k1": -k, "k2": 0.5 * k * k, "k3": math.exp(k) - k - 1}[kl_type]
        total += pg + beta * kl
    return total / n


def test_every_loss_branch_hand_computed():
    # ρ = 1.1 (A=1, inside), 1.5 (A=1, clipped at 1.28), 0.5 (A=−1, clipped at 0.8), 4 (A=−1, dual clip at c=3),
    # 0.5 (A=2: the unclipped pg1 = −1 is the max, pessimistic)
    ratios = torch.tensor([1.1, 1.5, 0.5, 4.0, 0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old = torch.full((5,), -1.0)
    logp = (old.double() + ratios.log()).float().requires_grad_()
    n = torch.tensor(5.0)
    loss, m = policy_loss(logp, adv, n, AlgoCfg(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.0), old_logp=old)
    pg = [-1.1, -1.28, 0.8, 3.0, -1.0]
    assert loss.item() == pytest.approx(sum(pg) / 5, abs=1e-6)
    loss.backward()
    # gradient only through the unclipped tokens: −A·ρ / N
    torch.testing.assert_close(logp.grad, torch.tensor([-1.1, 0.0, 0.0, 0.0, -1.0]) / 5, rtol=1e-5, atol=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)  # tokens 2 and 3
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)  # token 4
    assert m["ppo_kl"].item() == pytest.approx(-ratios.log().sum().item() / 5, abs=1e-6)


def test_on_policy_ratio_is_exactly_one():
    logp = torch.tensor([-0.3, -2.0, -0.7], requires_grad=True)
    adv = torch.tensor([0.5, -0.25, 1.0])
    loss, m = policy_loss(logp, adv, torch.tensor(3.0), NO_KL)  # old_logp None
    assert loss.item() == pytest.approx(-(0.5 - 0.25 + 1.0) / 3, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)  # dρ/dlogp = ρ = 1
    assert m["pg_clipfrac"].item() == 0 and m["ppo_kl"].item() == 0


@pytest.mark.parametrize("kl_type, values, grads", [
    # k = ref − logp ∈ {0.5, −1}; dk/dlogp = −1
    ("k1", [-0.5, 1.0], [1.0, 1.0]),
    ("k2", [0.125, 0.5], [-0.5, 1.0]),
    ("k3", [math.exp(0.5) - 1.5, math.exp(-1.0)], [1 - math.exp(0.5), 1 - math.exp(-1.0)]),
])
def test_kl_estimators_hand_computed(kl_type, values, grads):
    logp = torch.tensor([-1.0, -0.5], requires_grad=True)
    ref = torch.tensor([-0.5, -1.5])
    beta = 0.1
    loss, m = policy_loss(logp, torch.zeros(2), torch.tensor(2.0), AlgoCfg(kl_coef=beta, kl_type=kl_type),
                          ref_logp=ref)
    assert m["kl"].item() == pytest.approx(sum(values) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(beta * sum(values) / 2, abs=1e-6)  # A = 0: the pg term vanishes
    loss.backward()
    torch.testing.assert_close(logp.grad, beta * torch.tensor(grads) / 2, rtol=1e-5, atol=1e-7)


def test_kl_needs_a_reference():
    with pytest.raises(AssertionError, match="ref_logp"):
        policy_loss(torch.zeros(2, requires_grad=True), torch.zeros(2), torch.tensor(2.0), AlgoCfg(kl_coef=0.1))


@pytest.mark.parametrize("by_length", [False, True])
@pytest.mark.parametrize("budget", [8, 30, 100])
def test_micro_batched_token_mean_equals_global_token_mean(budget, by_length):
    records = _records(seed=2, n_groups=4, group_size=4)
    gen = torch.Generator().manual_seed(0)
    traj_adv = group_advantages(torch.randint(0, 2, (16,), generator=gen).float(), torch.arange(16) // 4)
    # a fixed "current policy" log-prob per response token of every record, and a reference and old policy
    new = {k: -torch.rand(len(r.response_ids), generator=gen) for k, r in enumerate(records)}
    ref = {k: v - 0.3 * torch.randn(len(v), generator=gen) for k, v in new.items()}
    old = {k: v + 0.4 * torch.randn(len(v), generator=gen) for k, v in new.items()}  # some ratios clip
    settings = AlgoCfg(eps_low=0.2, eps_high=0.28, clip_c=3.0, kl_coef=0.05, kl_type="k3")
    n_global = torch.tensor(float(count_response_tokens(records)))

    def run(batches):
        leaves = {k: v.clone().requires_grad_() for k, v in new.items()}
        total, metrics = 0.0, {}
        for b in batches:
            cat = lambda d: torch.cat([d[k] for k in b.record_indices])  # noqa: E731
            loss, m = policy_loss(cat(leaves), b.advantages, n_global, settings, old_logp=cat(old),
                                  ref_logp=cat(ref))
            loss.backward()  # gradient accumulation, as the trainer does
            total = total + loss.detach()
            for name, v in m.items():
                metrics[name] = metrics.get(name, 0.0) + v
        return total, metrics, torch.cat([leaves[k].grad for k in sorted(leaves)])

    one_loss, one_metrics, one_grad = run(pack_turns(records, traj_adv, max_tokens=10**9))
    mb = pack_turns(records, traj_adv, max_tokens=budget, by_length=by_length)
    assert len(mb) > 1
    mb_loss, mb_metrics, mb_grad = run(mb)
    torch.testing.assert_close(mb_loss, one_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mb_grad, one_grad, rtol=1e-6, atol=1e-9)
    for name in one_metrics:
        torch.testing.assert_close(mb_metrics[name], one_metrics[name], rtol=1e-6, atol=1e-7)
    # and both equal the float64 formula over the whole batch
    b = pack_turns(records, traj_adv, max_tokens=10**9)[0]
    flat = lambda d: torch.cat([d[k] for k in b.record_indices]).double().tolist()  # noqa: E731
    expected = ref_loss64(flat(new), flat(old), flat(ref), b.advantages.double().tolist(), n_global.item(),
                          beta=0.05)
    assert one_loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_entropy_metric_is_a_global_token_mean_share():
    logp = torch.zeros(4, requires_grad=True)
    _, m = policy_loss(logp, torch.zeros(4), torch.tensor(8.0), NO_KL, entropy=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m["entropy"].item() == pytest.approx(10 / 8)


# ----------------------------------------------------------------------------- dynamic sampling

def test_filter_groups_hand_computed():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    # group 0 all 1, group 1 mixed, group 2 all 0, group 3 all 0.5 (equal: dropped), group 4 mixed
    assert filter_groups(rewards, groups).tolist() == [False, False, True, True, False, False, False, False,
                                                       True, True]


def test_dynamic_sampler_refills_and_trims():
    s = DynamicSampler(target_groups=2, max_rounds=5)
    assert s.need_more()
    keep = s.add(torch.tensor([1.0, 1, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False] and s.need_more()
    keep = s.add(torch.tensor([0.0, 1, 1, 0]), torch.tensor([5, 5, 6, 6]))
    assert keep.tolist() == [True, True, False, False]  # the second mixed group is past the target: trimmed
    assert s.done() and not s.need_more() and not s.exhausted() and s.rounds == 2


@pytest.mark.parametrize("reward, verdict", [(1.0, "too easy"), (0.0, "too hard")])
def test_dynamic_sampler_gives_up_with_a_clear_message(reward, verdict):
    s = DynamicSampler(target_groups=4, max_rounds=3)
    rounds = 0
    while s.need_more():
        s.add(torch.full((8,), reward), torch.arange(8) // 2)
        rounds += 1
    assert rounds == 3 and s.exhausted() and not s.done()
    msg = s.message()
    assert verdict in msg and "0/4 groups" in msg and "max_sampling_rounds" in msg


# ----------------------------------------------------------------------------- packed scoring on a real (tiny) model

def tiny_model(seed=0, tied=False):
    """A random 2-layer Qwen3-shaped policy built by memrl.model directly (no transformers import: fast)."""
    from memrl.model import ModelConfig, Transformer

    cfg = ModelConfig.from_hf_dict({
        "model_type": "qwen3", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": tied,
        "rope_theta": 10000.0, "max_position_embeddings": 256})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else
                    torch.randn_like(p) * 0.1)
    return model


def test_response_logprobs_of_packed_batch_match_unpacked_forward():
    from memrl.algo import response_logprobs

    model = tiny_model()
    records = _records(seed=3, n_groups=2, group_size=2, turns=(1, 2))
    for r in records:  # token ids inside the tiny vocabulary
        r.prompt_ids = [t % 250 for t in r.prompt_ids]
        r.response_ids = [t % 250 for t in r.response_ids]
    batches = pack_turns(records, torch.zeros(4), max_tokens=48)
    assert len(batches) > 1 and any(len(b.record_indices) > 1 for b in batches)
    for b in batches:
        with torch.no_grad():
            logp, ent = response_logprobs(model, b, temperature=0.7, with_entropy=True)
        assert logp.dtype == torch.float32 and logp.shape == (b.num_response_tokens,)
        expected, expected_ent = [], []
        for k in b.record_indices:  # each record alone, no packing, float64 log-softmax
            rec = records[k]
            ids = torch.tensor([rec.prompt_ids + rec.response_ids])
            with torch.no_grad():
                logits = model(ids)[0].double() / 0.7
            lsm = logits.log_softmax(-1)
            P = len(rec.prompt_ids)
            for j, tok in enumerate(rec.response_ids):
                expected.append(lsm[P - 1 + j, tok].item())
                expected_ent.append(-(lsm[P - 1 + j].exp() * lsm[P - 1 + j]).sum().item())
        torch.testing.assert_close(logp.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)
        torch.testing.assert_close(ent.double(), torch.tensor(expected_ent, dtype=torch.float64), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- mini-batches and rollout correction

def test_mini_batches_split_by_problem_shuffled_and_rank_invariant():
    from memrl.algo import split_by_problem

    records = _records(seed=4, n_groups=8, group_size=2)  # 8 problems, 2 samples each, several turns
    problem = [r.group_id for r in records]
    parts = split_by_problem(records, problem, batch_size=8, mini_batches=4, seed=3, step=5)
    assert sorted(id(r) for p in parts for r in p) == sorted(id(r) for r in records)  # every record once
    groups = [{r.group_id for r in p} for p in parts]
    assert all(len(g) == 2 for g in groups) and len(set().union(*groups)) == 8  # 2 whole problems each
    assert [sorted(g) for g in groups] != [[0, 1], [2, 3], [4, 5], [6, 7]]  # shuffled, not in batch order
    for p in parts:  # problem, then trajectory, then turn: a trajectory's turns together, not turn-major
        ids = [r.trajectory_id for r in p]
        assert ids == sorted(ids, key=list(dict.fromkeys(ids)).index)
        for t in set(ids):
            turns = [r.turn_index for r in p if r.trajectory_id == t]
            assert turns == sorted(turns)
    again = split_by_problem(records, problem, 8, 4, seed=3, step=5)
    assert [[id(r) for r in p] for p in again] == [[id(r) for r in p] for p in parts]  # a function of (seed, step)
    other = split_by_problem(records, problem, 8, 4, seed=3, step=6)
    assert [{r.group_id for r in p} for p in other] != groups
    # two ranks, 4 problems each (global index = rank * 4 + local group): the same global split as one process
    for rank in range(2):
        mine = [r for r in records if r.group_id // 4 == rank]
        local = [TurnRecord(r.prompt_ids, r.response_ids, r.logprobs, r.trajectory_id, r.group_id % 4, r.turn_index,
                            r.kind) for r in mine]
        split = split_by_problem(local, [rank * 4 + r.group_id for r in local], 8, 4, seed=3, step=5)
        assert [{rank * 4 + r.group_id for r in p} for p in split] == [g & set(range(rank * 4, rank * 4 + 4))
                                                                       for g in groups]


def test_rollout_correction_hand_computed():
    from memrl.algo import mismatch_metrics, rollout_correction

    # two sequences: tokens 0-2 (d = 0.1, -0.1, 0.3) and token 3 (d = -0.5); C = 1.2, bounds [0.9, 1.1]
    train = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    rollout = torch.tensor([-1.1, -1.9, -0.8, -2.5])
    record = torch.tensor([0, 0, 0, 1])
    c = rollout_correction(train, rollout, record, 2, tis_cap=1.2, seq_mask=True, seq_low=0.9, seq_high=1.1)
    d = [0.1, -0.1, 0.3, -0.5]
    torch.testing.assert_close(c.pg_weight, torch.tensor([min(math.exp(x), 1.2) for x in d]), rtol=1e-6, atol=0)
    # geometric means: exp(0.3 / 3) = 1.105 (> 1.1: masked), exp(-0.5) = 0.607 (< 0.9: masked)
    assert c.keep.tolist() == [False, False, False, False] and c.num_tokens == 0
    c = rollout_correction(train, rollout, record, 2, seq_mask=True, seq_low=0.5, seq_high=1.2)
    assert c.pg_weight is None and c.keep.tolist() == [True, True, True, True]
    m = mismatch_metrics({k: float(v) for k, v in c.sums.items()}, tis=False)
    assert m["logp_gap"] == pytest.approx(sum(abs(x) for x in d) / 4, rel=1e-6)
    assert m["mismatch/k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 4, rel=1e-5)
    assert m["mismatch/seq_ratio"] == pytest.approx((math.exp(0.1) + math.exp(-0.5)) / 2, rel=1e-6)
    assert m["mismatch/seq_masked_frac"] == 0.0 and "mismatch/tis_weight" not in m


def test_length_sorted_packing_gives_the_same_loss_and_gradients_through_the_model():
    """pack_turns(by_length=True) regroups the records; through the model, the summed token-mean loss and every
    parameter gradient equal those of record-order packing, to fp32 rounding (the sums run in another order)."""
    from memrl.algo import response_logprobs

    model = tiny_model()
    records = _records(seed=4, n_groups=2, group_size=2, turns=(1, 3))
    for r in records:
        r.prompt_ids = [t % 250 for t in r.prompt_ids]
        r.response_ids = [t % 250 for t in r.response_ids]
    traj_adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    n_global = torch.tensor(float(count_response_tokens(records)))

    def run(batches):
        model.zero_grad()
        total = 0.0
        for b in batches:
            logp, _ = response_logprobs(model, b)
            loss, _ = policy_loss(logp, b.advantages, n_global, NO_KL, old_logp=logp.detach() + 0.1)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    plain = pack_turns(records, traj_adv, max_tokens=40)
    by_len = pack_turns(records, traj_adv, max_tokens=40, by_length=True)
    assert [b.record_indices for b in plain] != [b.record_indices for b in by_len]
    (loss_a, grads_a), (loss_b, grads_b) = run(plain), run(by_len)
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())

