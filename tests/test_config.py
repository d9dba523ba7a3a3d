"""Configs: presets hold the paper's numbers, overrides are typed and checked, the resolved config round-trips."""
import json

import pytest

from memrl.config import (RUN_CONFIG_NAME, Config, ConfigError, check_for_training, config_changes, describe,
                          load_config, parse_cli, preset, save_config)


def test_paper_presets_hold_the_papers_numbers():
    c = preset("paper-1.5b")
    assert c.model.path == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert (c.train.batch_size, c.rollout.group_size, c.train.epochs) == (64, 4, 10)
    assert (c.rollout.memory_cap_tokens, c.rollout.response_max_tokens) == (256, 512)
    assert (c.optim.lr, c.optim.warmup_steps) == (1e-6, 10)
    assert (c.algo.eps_low, c.algo.eps_high, c.algo.clip_c, c.algo.kl_coef, c.algo.kl_type) == (0.2, 0.28, 3.0,
                                                                                                 0.001, "k3")
    assert (c.data.max_shards, c.data.max_shard_tokens) == (35, 1024)
    assert c.algo.advantage == "drgrpo"
    assert c.algo.mini_batches == 16 and preset("paper-4b").algo.mini_batches == 16  # MemAgent's 16 per RL step
    assert c.algo.tis_cap == 0 and not c.algo.seq_mask  # rollout correction off by default
    d = preset("paper-4b")
    assert "Qwen3-4B-Thinking" in d.model.path and d.rollout.response_max_tokens == 1024
    assert d.rollout.memory_cap_tokens == 256 and d.train.batch_size == 64
    assert preset("default").model.path == ""  # the built-in synthetic policy: nothing downloaded


def test_templates_are_figure_4():
    r = Config().rollout  # the dataclass defaults: Figure 4 (the paper presets add the reasoning request, test_prompts)
    assert r.memory_template.format(question="Q", memory="M", segment="S") == (
        "<question> Q </question>\n<memory> M </memory>\n<segment> S </segment>\nUpdated memory:")
    assert r.final_template.format(question="Q", memory="M") == (
        "<question> Q </question>\n<memory> M </memory>\nYour final answer:")


def test_default_preset_uses_its_tasks_templates():
    from memrl import synthetic

    r = preset("default").rollout  # the shipped policy learnt the synthetic task's own (shorter) prompts
    assert (r.memory_template, r.final_template, r.single_turn_template) == (
        synthetic.MEMORY_TEMPLATE, synthetic.FINAL_TEMPLATE, synthetic.SINGLE_TURN_TEMPLATE)
    assert r.memory_template.format(question="Q", memory="M", segment="S") == (
        "Q\nMemory: M\nNew: S\nUpdated memory:")


def test_overrides_dotted_flat_and_flags():
    c = parse_cli(["--preset=paper-1.5b", "--algo.kl_coef=0.01", "--batch_size=32", "--dynamic_sampling",
                   "--resume", "--optim.betas=0.9,0.95", "--model.gradient_checkpointing=false",
                   "--rollout.initial_memory=None yet."])
    assert c.preset == "paper-1.5b"
    assert c.algo.kl_coef == 0.01 and c.train.batch_size == 32 and c.algo.dynamic_sampling is True
    assert c.train.resume == "latest" and c.optim.betas == (0.9, 0.95)
    assert c.model.gradient_checkpointing is False and c.rollout.initial_memory == "None yet."
    assert parse_cli([]) == preset("default")
    assert parse_cli(["--train.resume=runs/x/checkpoints/step_00000010"]).train.resume.endswith("step_00000010")


@pytest.mark.parametrize("args, message", [
    (["--algo.kl_coef=abc"], "--algo.kl_coef: expected float, got 'abc'"),
    (["--rollout.group_size=2.5"], "--rollout.group_size: expected int"),
    (["--dynamic_sampling=maybe"], "--algo.dynamic_sampling: expected bool"),
    (["--kl_coeff=1"], "unknown config key (did you mean"),
    (["--algo.nope=1"], "--algo.nope: unknown config key"),
    (["--algo.clip_c=0.5"], "--algo.clip_c: must be finite and > 1, got 0.5"),
    (["--rollout.condition=chat"], "--rollout.condition"),
    (["--rollout.condition=full_history"], "full_history is the paper's evaluation condition"),
    (["--algo.updates_per_rollout=4"], "replaced by algo.mini_batches"),
    (["--algo.mini_batches=65"], "exceeds train.batch_size"),
    (["--algo.tis_cap=0.5"], "algo.tis_cap must be 0 (off) or >= 1"),
    (["--group_size"], "needs a value"),
    (["--optim.betas=0.9"], "--optim.betas: expected comma-separated float,float"),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["--rollout.memory_template=no placeholders"], "lacks the placeholder"),
    (["batch_size=3"], "expected --key=value"),
    (["--algo.dynamic_sampling", "--rollout.group_size=1"], "--algo.dynamic_sampling: needs rollout.group_size >= 2"),
    (["--data.noise_variant=mixed"], "--data.noise_variant=mixed: needs data.noise_path"),
    # non-finite or out-of-range values: `inf` and `nan` parse as floats, so each range is checked
    (["--optim.lr=inf"], "--optim.lr: must be in (0, 1], got inf"),
    (["--optim.lr=nan"], "--optim.lr: must be in (0, 1], got nan"),
    (["--optim.lr=1e30"], "--optim.lr: must be in (0, 1], got 1e+30"),
    (["--rollout.temperature=inf"], "--rollout.temperature: must be in [0.05, 10.0]"),
    (["--rollout.temperature=1e-30"], "--rollout.temperature: must be in [0.05, 10.0]"),
    (["--rollout.temperature=0"], "--rollout.temperature: must be in [0.05, 10.0]"),
    (["--rollout.top_p=nan"], "--rollout.top_p: must be in (0, 1]"),
    (["--algo.kl_coef=nan"], "--algo.kl_coef: must be finite and >= 0"),
    (["--algo.kl_coef=inf"], "--algo.kl_coef: must be finite and >= 0"),
    (["--algo.eps_low=1"], "--algo.eps_low: must be in [0, 1)"),
    (["--algo.eps_high=inf"], "--algo.eps_high: must be in [0, 10]"),
    (["--algo.clip_c=inf"], "--algo.clip_c: must be finite and > 1"),
    (["--optim.grad_clip=inf"], "--optim.grad_clip: must be finite and > 0"),
    (["--optim.betas=0.9,nan"], "--optim.betas: must be two values in [0, 1)"),
    (["--optim.adam_eps=0"], "--optim.adam_eps: must be in [1e-20, 1]"),
    (["--optim.weight_decay=-0.1"], "--optim.weight_decay: must be in [0, 1]"),
    (["--train.allow_config_change=optim.nope"], "'optim.nope' is not a config key"),
])
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(ConfigError) as exc:
        parse_cli(args)
    assert message in str(exc.value)


def test_temperature_edges_are_accepted_and_json_infinity_refused(tmp_path):
    assert parse_cli(["--rollout.temperature=0.05"]).rollout.temperature == 0.05
    assert parse_cli(["--rollout.temperature=10"]).rollout.temperature == 10.0
    path = save_config(preset("default"), tmp_path / RUN_CONFIG_NAME)
    text = path.read_text()
    assert '"lr": 0.0008' in text  # the default preset's lr, replaced below
    path.write_text(text.replace('"lr": 0.0008', '"lr": Infinity'))  # Python's json reads Infinity
    with pytest.raises(ConfigError, match=r"optim.lr: must be in \(0, 1\], got inf"):
        load_config(path)


def test_rules_between_fields_do_not_depend_on_the_order():
    a = parse_cli(["--data.noise_variant=mixed", "--data.noise_path=wiki.txt"])
    b = parse_cli(["--data.noise_path=wiki.txt", "--data.noise_variant=mixed"])
    assert a == b and a.data.noise_variant == "mixed"


def test_config_changes_and_the_training_rules():
    old = preset("default")
    new = parse_cli(["--optim.lr=1e-3", "--train.max_steps=40"])
    assert config_changes(old, new) == [("optim.lr", 8e-4, 1e-3), ("train.max_steps", 20, 40)]
    with pytest.raises(ConfigError, match=r"--data.eval_path: empty while data.train_path=x.jsonl"):
        check_for_training(parse_cli(["--data.train_path=x.jsonl"]))
    check_for_training(parse_cli(["--data.train_path=x.jsonl", "--data.eval_path=none"]))
    check_for_training(parse_cli(["--data.train_path=x.jsonl", "--data.eval_path=y.jsonl"]))


def test_flat_name_must_be_unique(monkeypatch):
    # every flat name is unique today; an ambiguous one must be rejected, naming both dotted keys
    import memrl.config as mc

    monkeypatch.setattr(mc, "SECTIONS", ("model", "rollout", "algo", "optim", "data", "train", "model"))
    with pytest.raises(ConfigError, match="ambiguous"):
        mc.parse_cli(["--dtype=float32"])


def test_save_load_round_trip(tmp_path):
    c = parse_cli(["--preset=paper-4b", "--optim.betas=0.9,0.95", "--algo.advantage=grpo", "--train.seed=7"])
    path = save_config(c, tmp_path / "run" / RUN_CONFIG_NAME)
    assert load_config(path) == c
    assert parse_cli([f"--config={path}", "--train.seed=8"]).train.seed == 8
    d = json.loads(path.read_text())
    d["algo"]["kl_coef"] = "big"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="algo.kl_coef: expected float"):
        load_config(path)
    d["algo"]["kl_coef"] = 0.1
    d["algo"]["typo"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['algo.typo'\]"):
        load_config(path)


def test_describe_lists_every_key():
    text = describe(Config())
    assert "--algo.kl_coef=0.001  (float)" in text and "--optim.betas=0.9,0.999" in text
    import dataclasses

    c = Config()
    assert len(text.splitlines()) == sum(len(dataclasses.fields(getattr(c, s))) for s in
                                         ("model", "rollout", "algo", "optim", "data", "train"))


def test_every_default_has_a_why_comment():
    # STYLE.md: a comment on every default saying why
    import inspect

    import memrl.config as mc

    for cls in (mc.ModelCfg, mc.RolloutCfg, mc.AlgoCfg, mc.OptimCfg, mc.DataCfg, mc.TrainCfg):
        for line in inspect.getsource(cls).splitlines():
            if ": " in line and " = " in line and line.startswith("    ") and not line.startswith("        "):
                assert "  # " in line, f"{cls.__name__}: no comment on {line.strip()!r}"


def test_ignore_eos_runs_every_turn_to_its_budget():
    """rollout.ignore_eos (benchmarks): no stop ids reach the generator, so even a policy that stops early (the
    shipped synthetic one ends its memories after a few tokens) generates every turn to its full budget."""
    from pathlib import Path

    import torch

    from memrl import synthetic
    from memrl.generate import Generator
    from memrl.hf_io import load_model
    from memrl.rollout import rollout
    from memrl.templates import Templates
    from memrl.tokenizer import Tokenizer

    policy = Path(__file__).resolve().parents[1] / "assets" / "synthetic-policy"
    if not (policy / "config.json").is_file():
        pytest.skip("assets/synthetic-policy not built")
    tok = Tokenizer.from_pretrained(policy)
    gen = Generator(load_model(policy, dtype=torch.float32), tok.vocab_size)
    episodes = synthetic.make_episodes(2, "train")
    for ignore in (False, True):
        cfg = parse_cli(["--rollout.memory_cap_tokens=20", "--rollout.response_max_tokens=20",
                         f"--rollout.ignore_eos={ignore}"])
        assert cfg.rollout.ignore_eos is ignore
        res = rollout(gen, tok, episodes, "memory", 2, Templates.from_config(cfg.rollout), cfg.rollout)
        lengths = [len(r.response_ids) for r in res.records]
        if ignore:
            assert lengths == [20] * len(res.records) and all(r.finish_reason == "length" for r in res.records)
        else:
            assert min(lengths) < 20  # the policy does stop on its own
