"""benchmarks/bench_step.py: the FLOP formula against published parameter counts, a hand-computed case and torch's
own FLOP counter; the metrics.jsonl parsing and the per-step summary against hand-computed numbers."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_step
from benchmarks.bench_step import QWEN3_4B, QWEN25_1P5B, body_params, forward_flops
from memrl.config import parse_cli
from memrl.episodes import Episode
from memrl.model import ModelConfig, Transformer


def test_body_params_match_the_published_counts():
    # model cards: Qwen2.5-1.5B 1,543,714,304 parameters, Qwen3-4B 4,022,468,096 (both tied: one V x H matrix)
    assert body_params(QWEN25_1P5B) + 151936 * 1536 == 1_543_714_304
    assert body_params(QWEN3_4B) + 151936 * 2560 == 4_022_468_096


def test_forward_flops_hand_computed():
    shape = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    # head_dim 4; q 8x8 + k 8x4 + v 8x4 + o 8x8 + qkv bias 16 + mlp 3x8x16 + 2 norms of 8 + final norm 8 = 616
    assert body_params(shape) == 616
    # two packed sequences of 6 and 4 tokens (T = 10), 4 response rows:
    # 2*616*10 + lm_head 2*10*8*4 + attention 2 * 1 layer * 2 heads * 4 dims * (36 + 16)
    assert forward_flops(shape, tokens=10, response_tokens=4, len_sq=6 ** 2 + 4 ** 2) == 12320 + 640 + 832


def test_forward_flops_match_torch_flop_counter():
    """torch counts every matmul the model runs: the linear layers (aten.mm, fwd and 2x in bwd) and, through an
    explicit-matmul attention, the full S x S attention square, twice the causal half the formula credits."""
    shape = dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_dict(shape))
    S = 24
    ids = torch.randint(0, 96, (1, S))

    def attention(layer, q, k, v):  # q [1, Hq, S, D], k/v [1, Hkv, S, D]
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    with FlopCounterMode(display=False) as fwd:
        logits = model(ids, attn_fn=attention)
    counts = {str(op): n for op, n in fwd.get_flop_counts()["Global"].items()}
    norm_params = 2 * (2 * 32 + 2 * 16) + 32  # per layer: 2 RMSNorms + q/k norms; the final norm (no matmul)
    assert counts["aten.mm"] == forward_flops(shape, S, S, 0) - 2 * norm_params * S
    assert counts["aten.bmm"] / 2 == forward_flops(shape, 0, 0, S * S)

    with FlopCounterMode(display=False) as bwd:
        logits.float().logsumexp(-1).sum().backward()
    bwd_mm = {str(op): n for op, n in bwd.get_flop_counts()["Global"].items()}["aten.mm"]
    assert bwd_mm == 2 * counts["aten.mm"]  # backward = 2 x forward (input and weight gradients): update = 3 x fwd


def test_train_rows_skip_eval_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "kind": "eval"}) + "\n" + json.dumps({"step": 1, "kind": "train"}) +
                    "\n" + '{"step": 2, "kind": "tr')
    assert bench_step.train_rows(path) == [{"step": 1, "kind": "train"}]
    assert bench_step.train_rows(tmp_path / "absent.jsonl") == []


def _row(step, step_s, rollout_s, score_s, update_s, tokens, peak):
    return {"step": step, "kind": "train", "step_s": step_s, "rollout_s": rollout_s, "score_s": score_s,
            "update_s": update_s, "train_tokens": tokens, "score_tokens": tokens, "response_tokens": tokens // 2,
            "rollout_new_tokens": tokens // 2, "peak_mem_gib": peak, "world_size": 2, "cursor": 64 * step,
            "attn_len_sq": 1000 * tokens}


def test_summary_skips_the_warmup_and_computes_mfu():
    cfg = parse_cli(["--preset=paper-1.5b"])
    rows = [_row(1, 100.0, 50.0, 10.0, 30.0, 600_000, 70.0),  # warm-up: excluded from the means
            _row(2, 20.0, 10.0, 2.0, 6.0, 600_000, 50.0),
            _row(3, 22.0, 12.0, 2.0, 6.0, 600_000, 52.0)]
    s = bench_step.summarize("1.5b", QWEN25_1P5B, rows, episodes=[], tokenizer=None, cfg=cfg, nproc=2,
                             peaks={"spec": 989.0})
    assert s["steps_measured"] == 2 and not s["warmup_only"] and s["warmup"]["step_s"] == 100.0
    assert (s["step_s"], s["rollout_s"], s["score_s"], s["update_s"]) == (21.0, 11.0, 2.0, 6.0)
    assert s["other_s"] == pytest.approx(2.0)
    assert s["peak_mem_gib"] == 70.0  # the maximum over every logged step, the warm-up included
    assert s["train_tokens_per_s_per_gpu"] == pytest.approx(600_000 / 6.0 / 2)
    assert s["rollout_tokens_per_s_per_gpu"] == pytest.approx(300_000 / 11.0 / 2)
    # by hand: non-embedding params of Qwen2.5-1.5B; lm_head on 300k response rows; 28 layers x 12 heads x 128
    fwd = 2 * (1_543_714_304 - 151936 * 1536) * 600_000 + 2 * 151936 * 1536 * 300_000 + 2 * 28 * 12 * 128 * 6e8
    assert s["update_flops"] == pytest.approx(3 * fwd)
    assert s["mfu_spec"] == pytest.approx(3 * fwd / 6.0 / 2 / 989e12)
    assert s["score_flops"] == pytest.approx(fwd)  # one reference pass over the same tokens
    assert s["ten_epochs_h"] == pytest.approx(10 * 117 * 21.0 / 3600)


def test_summary_of_a_lone_warmup_step_is_flagged():
    cfg = parse_cli(["--preset=paper-1.5b"])
    s = bench_step.summarize("1.5b", QWEN25_1P5B, [_row(1, 100.0, 50.0, 10.0, 30.0, 600_000, 70.0)], [], None,
                             cfg, 2, {"spec": 989.0})
    assert s["warmup_only"] and s["step_s"] == 100.0


def test_simulated_lengths_follow_the_rollout(tmp_path):
    from memrl.templates import Templates
    from memrl.tokenizer import Tokenizer, make_byte_tokenizer

    tok = Tokenizer.from_pretrained(make_byte_tokenizer(tmp_path / "tok"))
    cfg = parse_cli(["--preset=paper-1.5b", "--rollout.group_size=3", "--rollout.memory_cap_tokens=16",
                     "--rollout.response_max_tokens=32"])
    eps = [Episode("a", "How many?", ["Ann has 3.", "Bob has 4."], "7"), Episode("b", "What?", ["x = 1."], "1")]
    lengths = bench_step.simulated_lengths(eps, tok, cfg)
    assert len(lengths) == 3 * (2 + 1) + 3 * (1 + 1)  # G x (one memory turn per shard + the final turn)
    first = tok.encode_prompt(Templates.from_config(cfg.rollout).memory_turn("How many?", "No previous memory.",
                                                                               "Ann has 3."))
    assert lengths[0] == len(first) + 16 - 1  # prompt + response - 1 packed rows
    assert lengths[2] > 32  # the final turn: a prompt plus the full 32-token answer


# ----------------------------------------------------------------------------- issue 11: real lengths

def test_length_profile_draws_have_the_stated_mean_and_cut():
    """Each kind's capped lognormal: the closed form gives the stated mean and cut share, and 20,000 seeded draws
    agree with both within 4 standard errors; a seed always draws the same length."""
    import math
    import statistics

    from memrl.length_profile import PROFILES, capped_mean

    stated = {"memory": (55.0, 0.03, 256), "final": (150.0, 0.02, 512)}  # the numbers (+ our 2% reading)
    profile = PROFILES[bench_step.DEFAULT_PROFILE]
    for kind, (mean, cut, cap) in stated.items():
        d = profile[kind]
        assert (d.mean, d.cut, d.cap) == (mean, cut, cap)
        assert capped_mean(d.mu, d.sigma, cap) == pytest.approx(mean, rel=1e-9)
        assert 1 - statistics.NormalDist(d.mu, d.sigma).cdf(math.log(cap)) == pytest.approx(cut, rel=1e-9)
        draws = [d.draw(seed) for seed in range(20_000)]
        se = statistics.stdev(draws) / math.sqrt(len(draws))
        assert abs(statistics.mean(draws) - mean) < 4 * se + 0.5  # + rounding to whole tokens
        assert abs(sum(x == cap for x in draws) / len(draws) - cut) < 4 * math.sqrt(cut * (1 - cut) / len(draws))
        assert min(draws) >= 1 and max(draws) == cap and d.draw(7) == d.draw(7)


def test_length_profile_config_needs_ignore_eos_and_a_known_name():
    from memrl.config import ConfigError

    cfg = parse_cli(["--rollout.ignore_eos=true", f"--rollout.length_profile={bench_step.DEFAULT_PROFILE}"])
    assert cfg.rollout.length_profile == bench_step.DEFAULT_PROFILE
    with pytest.raises(ConfigError, match="ignore_eos"):
        parse_cli([f"--rollout.length_profile={bench_step.DEFAULT_PROFILE}"])
    with pytest.raises(ConfigError, match="unknown"):
        parse_cli(["--rollout.ignore_eos=true", "--rollout.length_profile=nope"])


def test_rollout_stops_each_request_at_its_profile_draw():
    """With a length profile, each request of the rollout generates exactly min(budget, its draw) tokens, the draw
    seeded from the request's seed as memrl/rollout.py derives it (its n samples share it)."""
    from pathlib import Path

    from memrl import synthetic
    from memrl.generate import Generator
    from memrl.hf_io import load_model
    from memrl.length_profile import length_limit
    from memrl.rollout import rollout
    from memrl.sampling import derive_seed
    from memrl.templates import Templates
    from memrl.tokenizer import Tokenizer

    policy = Path(__file__).resolve().parents[1] / "assets" / "synthetic-policy"
    if not (policy / "config.json").is_file():
        pytest.skip("assets/synthetic-policy not built")
    tok = Tokenizer.from_pretrained(policy)
    gen = Generator(load_model(policy, dtype=torch.float32), tok.vocab_size)
    episodes = synthetic.make_episodes(3, "train")
    cfg = parse_cli(["--rollout.memory_cap_tokens=64", "--rollout.response_max_tokens=96", "--rollout.ignore_eos=true",
                     f"--rollout.length_profile={bench_step.DEFAULT_PROFILE}"])
    G, seed, step = 2, 5, 3
    res = rollout(gen, tok, episodes, "memory", G, Templates.from_config(cfg.rollout),
                  cfg.rollout, seed=seed, step=step)
    for rec in res.records:
        traj = res.trajectories[rec.trajectory_id]
        # the first memory turn's prompt is the same for all G samples: one request, seeded by sample 0
        first = 0 if rec.turn_index == 0 else traj.sample_index
        request_seed = derive_seed(seed, step, traj.episode.id, rec.turn_index, first)
        budget = 64 if rec.kind == "memory" else 96
        want = length_limit(bench_step.DEFAULT_PROFILE, rec.kind, derive_seed(request_seed, "length"), budget)
        assert len(rec.response_ids) == want, (rec.kind, rec.turn_index, traj.sample_index)
    assert len({len(r.response_ids) for r in res.records}) > 3  # uneven, unlike ignore_eos alone


def test_variants_and_their_train_flags():
    V = bench_step.Variant
    assert [(v.lengths, v.compile_train) for v in bench_step.variants(["1.5b"], "both", "both")] == [
        ("uniform", False), ("real", False), ("real", True), ("uniform", True)]
    assert V("1.5b", "uniform", False).flags("p") == ["--rollout.ignore_eos=true"]
    assert V("1.5b", "real", True).flags("p") == ["--rollout.ignore_eos=true", "--rollout.length_profile=p",
                                                  "--model.compile_train=true"]
    assert V("path", "real", False).flags("p") == []  # a real model stops at its own EOS
    assert V("path", "uniform", False).flags("p") == ["--rollout.ignore_eos=true"]


def test_per_token_cost_and_real_over_uniform_ratio():
    cfg = parse_cli(["--preset=paper-1.5b", "--rollout.ignore_eos=true"])
    real_cfg = parse_cli(["--preset=paper-1.5b", "--rollout.ignore_eos=true",
                          f"--rollout.length_profile={bench_step.DEFAULT_PROFILE}"])
    uniform = [_row(1, 100.0, 50.0, 10.0, 30.0, 600_000, 70.0), _row(2, 20.0, 10.0, 3.0, 6.0, 600_000, 50.0),
               _row(3, 20.0, 10.0, 2.0, 6.0, 400_000, 50.0)]
    real = [_row(1, 90.0, 50.0, 9.0, 30.0, 200_000, 60.0), _row(2, 12.0, 6.0, 1.0, 4.0, 200_000, 40.0),
            _row(3, 12.0, 6.0, 1.5, 4.0, 300_000, 40.0)]
    for r, (mem, cut, ans) in zip(real, [(60.0, 0.05, 140.0), (50.0, 0.02, 150.0), (56.0, 0.04, 160.0)]):
        r.update(memory_tokens=mem, memory_full=cut, answer_tokens=ans)
    res = []
    for rows, c, lengths in ((uniform, cfg, "uniform"), (real, real_cfg, "real")):
        s = bench_step.summarize("1.5b", QWEN25_1P5B, rows, [], None, c, 2, {"spec": 989.0})
        s.update(lengths=lengths, compile_train=False)
        res.append(s)
    u, r = res
    # sums over the measured steps (2 and 3): seconds per 1,000 tokens
    assert u["score_s_per_1k_tokens"] == pytest.approx(1000 * 5.0 / 1_000_000)
    assert u["update_s_per_1k_tokens"] == pytest.approx(1000 * 12.0 / 1_000_000)
    assert r["score_s_per_1k_tokens"] == pytest.approx(1000 * 2.5 / 500_000)
    assert r["update_s_per_1k_tokens"] == pytest.approx(1000 * 8.0 / 500_000)
    assert (r["memory_tokens"], r["memory_full"], r["answer_tokens"]) == pytest.approx((53.0, 0.03, 155.0))
    ratios = bench_step.length_ratios(res)
    assert len(ratios) == 1 and ratios[0]["compile_train"] is False
    assert ratios[0]["score_ratio"] == pytest.approx((2.5 / 500_000) / (5.0 / 1_000_000))  # 1.0
    assert ratios[0]["update_ratio"] == pytest.approx((8.0 / 500_000) / (12.0 / 1_000_000))  # 1.33
    assert r["mfu_spec"] is not None  # attn_len_sq logged by train.py: FLOPs known at real lengths too
