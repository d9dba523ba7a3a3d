"""One decoder for Qwen2 / Qwen2.5, Qwen3 and Llama, built from a Hugging Face `config.json`.

The families differ in four small places, each a config field here:
  - Qwen2/2.5:  bias on the q/k/v projections                   (`attention_bias`)
  - Qwen3:      RMSNorm on each head of q and k before RoPE       (`qk_norm`), an explicit `head_dim`
  - Llama 3.x:  "llama3" frequency-dependent RoPE scaling          (`rope_scaling`)
  - all:        tied or untied input/output embeddings            (`tie_word_embeddings`)
Everything else (GQA, RoPE, SwiGLU, RMSNorm, pre-norm residual blocks) is shared. Parameter names are the
Hugging Face ones except two fused projections, one GEMM each instead of three and two per layer:
`self_attn.qkv_proj` = HF's q_proj, k_proj, v_proj stacked along the output rows, `mlp.gate_up_proj` = gate_proj,
up_proj. memrl/hf_io.py holds the one mapping table (FUSED_TO_HF) and applies it on load and save, so checkpoints on
disk are plain Hugging Face ones.

Invariants
  - A config field we do not implement raises `ValueError` naming the field: never silently wrong output.
  - forward() takes explicit positions, so the same code serves a padded batch (left padding, positions from
    the attention mask), packed sequences (positions restart per sequence, `seq_ids` / `seq_lengths` keep them
    apart; memrl/attention.py builds their layout once per forward for the backend `model.attention` names) and
    the generator's KV cache (it passes `attn_fn`, which owns the cache and the mask; see memrl/kv_cache.py).
  - Numerics follow transformers: norms in fp32, RoPE angles in fp32 then cast to the activation dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from memrl.attention import attention, build_attention_mask, lengths_from_seq_ids, packed_layout

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")

# attn_fn(layer_idx, q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> [B, Hq, T, D]
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int  # rows of the embedding; Qwen pads this above the tokenizer's real size
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    attention_bias: bool = False  # bias on q/k/v (Qwen2); o_proj never has one in these families
    qk_norm: bool = False  # Qwen3
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    hf_dict: dict = field(default_factory=dict, repr=False)  # the config.json we came from, written back on save

    def __post_init__(self):
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs Hq divisible by Hkv"
        assert self.head_dim % 2 == 0, "RoPE rotates pairs of dimensions"

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Validate a Hugging Face config dict; any unsupported setting raises ValueError naming the field."""

        def bad(field_name: str, why: str) -> ValueError:
            return ValueError(f"{source}: field '{field_name}': {why}")

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        for name in required:
            if not isinstance(d.get(name), int) or d[name] <= 0:
                raise bad(name, f"missing or not a positive integer (got {d.get(name)!r})")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{d['hidden_act']!r} is not supported (only 'silu', i.e. SwiGLU)")
        if d.get("attention_dropout", 0.0):
            raise bad("attention_dropout", "dropout is not supported (RL fine-tuning runs without it)")
        if d.get("pretraining_tp", 1) != 1:
            raise bad("pretraining_tp", "tensor-parallel slicing of the MLP is not supported; must be 1")
        if d.get("use_sliding_window", False):
            raise bad("use_sliding_window", "sliding-window attention is not supported")
        for i, kind in enumerate(d.get("layer_types") or []):
            if kind != "full_attention":
                raise bad("layer_types", f"layer {i} is {kind!r}; only 'full_attention' is supported")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise bad("partial_rotary_factor", "partial RoPE is not supported")

        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise bad("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if model_type != "qwen3" and head_dim * heads != d["hidden_size"] and d.get("head_dim") is None:
            raise bad("hidden_size", f"not divisible by num_attention_heads={heads}")

        # RoPE: transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling")
        if legacy:
            rope = {**legacy, **rope}
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_field = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            for k in keys:
                if k not in rope:
                    raise bad(f"{rope_field}.{k}", "required for rope_type 'llama3'")
            rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        else:
            raise bad(f"{rope_field}.rope_type", f"{rope_type!r} is not supported (supported: default, llama3)")

        # Qwen2 always has the q/k/v bias (its config has no field for it); Llama/Qwen3 say so in attention_bias.
        attention_bias = True if model_type == "qwen2" else bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            hf_dict=dict(d),
        )

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """A config.json that transformers reads back into the same architecture."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        d = dict(self.hf_dict)
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        for legacy in ("rope_scaling", "rope_theta"):
            d.pop(legacy, None)
        d.update(
            architectures=[arch[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if dtype is not None:
            d["dtype"] = str(dtype).removeprefix("torch.")
            d.pop("torch_dtype", None)
        return d


# ----------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale: the order transformers uses, so bf16 outputs match bit for bit
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) [D/2], with Llama 3's frequency-dependent scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1 (Meta's reference `apply_scaling`): keep high frequencies, divide low ones by `factor`,
    # interpolate smoothly in between.
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, D] for rotate-half RoPE; angles in fp32 (positions up to ~1e5 need it)."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """project (q/k/v GEMM, RoPE) -> attend -> output (o_proj), called by DecoderLayer one by one: its two halves
    around `attend` are what memrl/compile.py compile_layers compiles."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        # q, k and v in ONE GEMM: rows [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], i.e. HF's q_proj, k_proj, v_proj stacked
        self.qkv_split = (self.n_heads * D, self.n_kv * D, self.n_kv * D)
        self.qkv_proj = nn.Linear(H, sum(self.qkv_split), bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D], RoPE applied (and Qwen3's q/k norms before it)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)  # views of one (B, T, (Hq + 2 Hkv) * D) output
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, attn_fn: AttnFn | None):
        """The attention itself: the KV-cache seam when given (the generator), else the packed / masked path."""
        return attn_fn(self.layer_idx, q, k, v) if attn_fn is not None else attention(q, k, v, mask)

    def output(self, out):
        """out [B, Hq, T, D] -> o_proj of the heads side by side [B, T, H]."""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=cfg.mlp_bias)  # rows [gate (I) | up (I)]: one GEMM, not two
        self.down_proj = nn.Linear(I, H, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, attn_fn):
        q, k, v = self.attention_inputs(x, cos, sin)
        return self.attention_output_and_mlp(x, self.self_attn.attend(q, k, v, mask, attn_fn))

    # The block around its attention call, in two halves: what memrl/compile.py's compile_layers compiles for the
    # generator (one compiled function per half, shared by every layer: the attention, which differs per layer
    # through its KV cache index, stays outside).
    def attention_inputs(self, x, cos, sin):
        """Input RMSNorm, the q/k/v GEMM, RoPE."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def attention_output_and_mlp(self, x, out):
        """o_proj, residual, post-attention RMSNorm, SwiGLU MLP, residual."""
        x = x + self.self_attn.output(out)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` prefix of the Hugging Face names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.attention = "auto"  # packed-row attention backend, see memrl/attention.py (config `model.attention`)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset_rope(self, device=None):
        """Recompute the RoPE buffer (needed after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def output_weight(self) -> torch.Tensor:
        """The lm_head matrix [V, H]; the input embedding when the two are tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        attn_fn: AttnFn | None = None,
        return_hidden: bool = False,
        seq_lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (param dtype), or the final-normed hidden [B, T, H].

        positions: [B, T]; default arange(T), or cumsum(attention_mask) - 1 under (left) padding.
        attention_mask: [B, T], 1 for real tokens. seq_ids: [B, T] for packed sequences (positions must restart).
        seq_lengths: the packed sequences' lengths on the host (B = 1, contiguous runs of seq_ids, in order):
            saves the one device->host sync of reading them from seq_ids.
        attn_fn: the KV-cache seam; when given, the model builds no mask and calls attn_fn(layer, q, k, v).
        """
        B, T = input_ids.shape
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        mask = None
        if attn_fn is None:  # one layout (packed row) or mask for all layers
            lengths = None
            if seq_ids is not None and attention_mask is None:
                lengths = tuple(seq_lengths) if seq_lengths is not None else lengths_from_seq_ids(seq_ids)
            if lengths is not None:
                assert B == 1 and sum(lengths) == T, f"seq_lengths {lengths[:8]}... do not tile one row of {T}"
                mask = packed_layout(lengths, x.device, self.attention, x.dtype, self.config.head_dim)
            else:
                mask = build_attention_mask(T, attention_mask, seq_ids, x.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, attn_fn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, attn_fn)
        x = self.model.norm(x)
        if return_hidden:
            return x
        return F.linear(x, self.output_weight())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def random_init_(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Benchmark weights, in place on the model's device: N(0, std) matrices and biases, unit norms (random weights
    never emit EOS, so benchmarks force full-length generation)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)
    return model
