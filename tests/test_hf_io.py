"""HF checkpoint I/O: our save loads in transformers with the same logits; bad inputs give clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from memrl.hf_io import load_config, load_model, save_model
from memrl.tokenizer import Tokenizer
from tests.tiny import FAMILIES, make_tiny_checkpoint


@pytest.mark.parametrize("family,tied", [(f, t) for f in FAMILIES for t in (False, True)])
def test_our_save_loads_in_transformers_with_same_logits(tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    ours = load_model(make_tiny_checkpoint(tmp_path / "src", family, tied=tied), dtype=torch.float32)
    with torch.no_grad():  # change the weights so the saved file is ours, not a copy of the source
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_model(ours, tmp_path / "out", tokenizer_dir=tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, 259, (2, 70))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-5
    assert Tokenizer.from_pretrained(out).vocab_size == 259
    # and back into ours, bitwise
    again = load_model(out, dtype=torch.float32)
    for (n1, a), (n2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_sharded_save_and_load(tmp_path):
    ours = load_model(make_tiny_checkpoint(tmp_path / "src", "qwen2"), dtype=torch.float32)
    out = save_model(ours, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_model(out, dtype=torch.float32)
    ids = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


def test_fused_projections_stack_and_split_the_hf_tensors(tmp_path):
    """Our qkv_proj / gate_up_proj are the file's q, k, v (weights and Qwen2's biases) and gate, up stacked in that
    order; saving writes back exactly the file's names and values."""
    src = make_tiny_checkpoint(tmp_path / "src", "qwen2")
    files = load_file(src / "model.safetensors")
    ours = load_model(src, dtype=torch.float32).state_dict()
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        for leaf in ("weight", "bias"):
            stacked = torch.cat([files[f"{attn}{p}_proj.{leaf}"] for p in "qkv"])
            assert torch.equal(ours[f"{attn}qkv_proj.{leaf}"], stacked)
        stacked = torch.cat([files[f"{mlp}gate_proj.weight"], files[f"{mlp}up_proj.weight"]])
        assert torch.equal(ours[f"{mlp}gate_up_proj.weight"], stacked)
    saved = load_file(save_model(load_model(src, dtype=torch.float32), tmp_path / "out") / "model.safetensors")
    assert set(saved) == set(files)
    assert all(torch.equal(saved[name], files[name]) for name in files)


def test_save_replaces_existing_dir_atomically(tmp_path):
    ours = load_model(make_tiny_checkpoint(tmp_path / "src", "llama"), dtype=torch.float32)
    out = tmp_path / "out"
    save_model(ours, out)
    (out / "stale.txt").write_text("from an older save")
    save_model(ours, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_bf16_roundtrip_keeps_dtype(tmp_path):
    ours = load_model(make_tiny_checkpoint(tmp_path / "src", "qwen3"), dtype=torch.bfloat16)
    out = save_model(ours, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())


# ---- bad inputs -------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    return make_tiny_checkpoint(tmp_path / "ckpt", "qwen2")


def edit_config(ckpt, **changes):
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "nope")


def test_invalid_json_names_line(ckpt):
    (ckpt / "config.json").write_text('{\n  "model_type": "qwen2",\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json:3"):
        load_config(ckpt)


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="gpt_neox")
    with pytest.raises(ValueError, match="'model_type'.*gpt_neox"):
        load_model(ckpt)


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"),
    ("use_sliding_window", True),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("attention_dropout", 0.1),
])
def test_unsupported_field_names_it(ckpt, field, value):
    edit_config(ckpt, **{field: value})
    with pytest.raises(ValueError, match=field):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj"):
        load_model(ckpt)


def test_extra_tensor(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensors.*q_norm"):
        load_model(ckpt)


def test_shape_mismatch(ckpt):
    edit_config(ckpt, intermediate_size=80)
    with pytest.raises(ValueError, match=r"mlp.*has shape \(64, 96\), config.json implies \(64, 80\)"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_model(ckpt)


def test_pickled_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        load_model(ckpt)


def test_index_pointing_to_missing_shard(tmp_path):
    ours = load_model(make_tiny_checkpoint(tmp_path / "src", "qwen2"), dtype=torch.float32)
    out = save_model(ours, tmp_path / "out", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(out)


# ---- the tokenizer wrapper --------------------------------------------------------------------------------

def test_tokenizer_stop_ids_vocab_and_template(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    vocab = tok.hf.get_vocab()
    assert tok.stop_ids == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert tok.vocab_size == 259 < load_config(ckpt).vocab_size  # embedding rows > real tokens, as in Qwen
    text = "Tom has 3.5 apples, $1,000."
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.decode(tok.encode_prompt("Q?"), skip_special_tokens=False)
    assert prompt == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    base = Tokenizer.from_pretrained(ckpt, chat=False)
    assert base.encode_prompt("Q?") == base.encode("Q?")


def test_generation_config_eos_ids_are_stops(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 65]}))
    assert 65 in Tokenizer.from_pretrained(ckpt).stop_ids


def test_transformers_does_not_take_our_kernels_package_for_its_own(tmp_path):
    """Our top-level `kernels` package shares a name with the optional hub-kernels package transformers probes."""
    import kernels
    from transformers import AutoModelForCausalLM
    from transformers.utils import import_utils

    assert hasattr(kernels, "token_logprobs")  # the `kernels` importable here is ours
    import_utils.is_kernels_available.cache_clear()
    assert not import_utils.is_kernels_available()
    ckpt = make_tiny_checkpoint(tmp_path, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 259, (1, 8))).logits).all()
