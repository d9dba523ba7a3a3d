"""Hugging Face checkpoints in and out: `config.json` + `model.safetensors` (or a sharded index).

Loading builds the model on the meta device and assigns each tensor straight from the safetensors file to
its target device and dtype, one tensor at a time: no float32 copy of the whole model ever sits in CPU memory.
Saving writes the same format into a temporary directory and renames it into place, so that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it and a crash never leaves half a checkpoint.

Only safetensors are read (never pickled `.bin` weights), and no remote code is ever run. A bad checkpoint is a
CheckpointError (a ValueError) or a FileNotFoundError naming the file: train.py and evaluate.py print it as one line.

Names: files hold Hugging Face tensor names. Our model fuses two groups of them into one parameter each (one GEMM
instead of three / two per layer); FUSED_TO_HF below is the only place that knows it. Loading stacks the HF parts
along dim 0 (`from_hf_state_dict`), saving splits them back (`to_hf_state_dict`); every other name is the same on
both sides.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memrl.atomic import atomic_path
from memrl.errors import CheckpointError, MemrlError
from memrl.model import ModelConfig, Transformer
from memrl.paths import is_hub_id

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json",
)


# our fused parameter (under model.layers.N.) -> the HF tensors stacked in it, in order along dim 0; ".weight" and,
# where the family has one, ".bias" alike (Qwen2's q/k/v bias, Llama's optional mlp_bias)
FUSED_TO_HF = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _fused_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int]] | None:
    """(HF name, rows) of each part of our tensor `name`, or None when `name` is not a fused one."""
    prefix, _, leaf = name.rpartition(".")  # "model.layers.3.self_attn.qkv_proj", "weight"
    for fused, parts in FUSED_TO_HF.items():
        if prefix.endswith("." + fused):
            base = prefix[: -len(fused)]
            q, kv, inter = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                            cfg.intermediate_size)
            rows = (q, kv, kv) if fused == "self_attn.qkv_proj" else (inter, inter)
            return [(f"{base}{part}.{leaf}", n) for part, n in zip(parts, rows)]
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, copy: bool = False) -> dict[str, torch.Tensor]:
    """Our names -> Hugging Face names: each fused tensor split along dim 0 into its HF parts, views of it unless
    `copy` (safetensors refuses to write tensors that share storage)."""
    out = {}
    for name, t in state.items():
        parts = _fused_parts(name, cfg)
        if parts is None:
            out[name] = t
            continue
        assert t.shape[0] == sum(n for _, n in parts), f"{name}: {tuple(t.shape)} does not split into {parts}"
        for (hf_name, _), piece in zip(parts, t.split([n for _, n in parts], dim=0)):
            out[hf_name] = piece.clone() if copy else piece
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, names) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our parameters `names` (stacking each fused group). Pops what it uses from `state`,
    so a group's parts are freed as soon as it is stacked."""
    out = {}
    for name in names:
        parts = _fused_parts(name, cfg)
        out[name] = state.pop(name) if parts is None else torch.cat([state.pop(hf) for hf, _ in parts], dim=0)
    return out


def _as_checkpoint_error(fn):
    """A ValueError raised while reading a checkpoint (each names its file and field) becomes a CheckpointError."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            if isinstance(e, MemrlError):
                raise
            raise CheckpointError(str(e)) from e
    return wrapper


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; a hub id (memrl/paths.py states the rule) fetched (config, tokenizer, safetensors
    only); anything else, e.g. a local path that does not exist, is an error and never a download."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint directory holding config.json, got a file")
    text = str(path_or_id)
    if not is_hub_id(text):
        raise FileNotFoundError(f"{text}: no such checkpoint directory (and not a hub id 'owner/name': see "
                                f"memrl/paths.py)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated...
        raise FileNotFoundError(f"{text}: not a local directory, and fetching it from the hub failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return Path(local)


@_as_checkpoint_error
def load_config(path: str | os.PathLike) -> ModelConfig:
    cfg_path = resolve_checkpoint(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (a Hugging Face checkpoint needs config.json)")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (a Hugging Face model config), got {type(d).__name__}")
    return ModelConfig.from_hf_dict(d, source=str(cfg_path))


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from the index or the single file."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        return {name: ckpt / fname for name, fname in weight_map.items()}
    single = ckpt / SINGLE_FILE
    if not single.is_file():
        bins = sorted(p.name for p in ckpt.glob("*.bin"))
        hint = f" (found {bins}: pickled weights are not loaded for safety; convert to safetensors)" if bins else ""
        raise FileNotFoundError(f"{ckpt}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    with _open(single, "cpu") as f:
        return {name: single for name in f.keys()}


def _open(path: Path, device: str):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # truncated / corrupt header
        raise ValueError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from e


@_as_checkpoint_error
def load_model(
    path_or_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Transformer:
    ckpt = resolve_checkpoint(path_or_id)
    cfg = load_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    ours = list(model.state_dict())
    expected = {name: p.shape for name, p in to_hf_state_dict(model.state_dict(), cfg).items()}  # HF names
    files = _weight_files(ckpt)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy too; the embedding is the truth
    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected))
    if missing:
        raise ValueError(f"{ckpt}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise ValueError(
            f"{ckpt}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} "
            f"(a different architecture than config.json's {cfg.model_type!r}?)"
        )
    device = torch.device(device)
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, fpath in files.items():
        by_file.setdefault(fpath, []).append(name)
    for fpath, names in by_file.items():
        if not fpath.is_file():
            raise FileNotFoundError(f"{fpath}: listed in {INDEX_FILE} but missing")
        with _open(fpath, str(device) if device.type != "cuda" else f"cuda:{device.index or 0}") as f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{fpath}: tensor {name!r} unreadable ({e}); is the file truncated?") from e
                if tuple(t.shape) != tuple(expected[name]):
                    raise ValueError(
                        f"{fpath}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                        f"{tuple(expected[name])}"
                    )
                state[name] = t.to(dtype)  # one tensor at a time: never a full fp32 copy
    model.load_state_dict(from_hf_state_dict(state, cfg, ours), strict=True, assign=True)
    model.reset_rope(device)
    return model


def save_model(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config.json + safetensors (sharded past max_shard_bytes) atomically; copy tokenizer files if given.

    state_dict: pass a gathered full state dict when the model is sharded (FSDP); by default model.state_dict().
    Either way with our names; the files get Hugging Face's (to_hf_state_dict).
    """
    out = Path(out_dir)
    sd = model.state_dict() if state_dict is None else state_dict
    sd = to_hf_state_dict({k: v.detach().to("cpu") for k, v in sd.items()}, model.config, copy=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    dtype = next(iter(sd.values())).dtype

    with atomic_path(out, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2) + "\n")
        shards, current, size = [], {}, 0
        for name in sorted(sd):
            nbytes = sd[name].numel() * sd[name].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = sd[name]
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return out
