"""Attention for memrl.model: plain causal, a dense mask, or one packed row of variable-length sequences.

A training or scoring micro-batch is ONE packed row [1, T] of S sequences laid end to end (memrl.algo.pack_turns):
causal attention restarting at each sequence. `Transformer.attention` (config `model.attention`) picks how:

    triton   kernels/varlen_attn.py: our flash kernel over cu_seqlens; 1 launch forward, 2 backward; deterministic
    flash    torch's own FlashAttention-2 varlen kernels (aten._flash_attention_forward / _backward with cu_seqlens);
             CUDA, bf16/fp16 only; GQA native (no K/V copy); its backward accumulates dQ with atomics (not bitwise
             reproducible: the forward, hence scoring, is)
    flex     FlexAttention (torch.compile'd) with a document-causal BlockMask built ONCE per micro-batch, shared by
             all layers; on CPU eager and forward only (torch has no CPU flex backward)
    padded   the sequences right-padded to the longest into [S, L] and ONE causal SDPA call when that wastes at most
             half the slots (S * L <= 2T), else one SDPA call per sequence (tens per layer on real rollouts)
    dense    ONE SDPA call with the block-diagonal [T, T] mask: T^2 work (most of it masked out), exact
    auto     CUDA: CUDA_DEFAULT (bf16/fp16; fp32 or an unsupported head size -> triton). CPU: dense up to
             CPU_DENSE_MAX_TOKENS tokens, else padded.

Invariants
  - The layout (lengths, cu_seqlens, and what the chosen backend needs: tile map, block mask, gather indices or the
    mask) is built ONCE per forward by `packed_layout` and passed to every layer. With the lengths known on the host
    (PackedBatch.seq_lengths) that costs no device->host sync; from seq_ids alone, one sync per forward.
  - Every backend computes the same function (tests/test_attention.py: each against per-sequence forwards in
    float64, outputs and gradients).
  - q, k, v arrive as [B, H, T, D] (any strides with a contiguous last dim); GQA maps query head h to kv head
    h // (Hq / Hkv), as Hugging Face's repeat_interleave.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "triton", "flash", "flex", "padded", "dense")
# The packed backend "auto" picks on CUDA for bf16/fp16. PROVISIONAL: set it from benchmarks/bench_attention.py
# (fwd + bwd at 16k-token micro-batches of real turn lengths on the H200) to the fastest exact candidate.
CUDA_DEFAULT = "flash"
# CPU "auto": up to this many packed tokens, one masked SDPA call (T^2 scores) instead of padded, whose work is
# bounded by 2x the real tokens' (or a per-sequence loop). Measured on the 2-core CI machine, 2026-11-30, the
# default run's update (0.6M model, ~82k tokens in 2,048-token micro-batches of ~30 turns): dense 27-32 s,
# padded 13-14 s per RL step. Dense pays off only for a few short sequences (the tests' tiny batches).
CPU_DENSE_MAX_TOKENS = 256


@dataclass(eq=False)
class PackedLayout:
    """One packed row [1, T] of sequences with these lengths, and what `backend` needs, built on `device`."""

    lengths: tuple[int, ...]
    backend: str  # resolved: never "auto"
    cu_seqlens: torch.Tensor  # int32 [S + 1]: 0, L_0, L_0 + L_1, ..., T
    max_len: int
    tiles: object | None = None  # triton: kernels.varlen_attn.VarlenTiles
    block_mask: object | None = None  # flex: BlockMask
    gather: torch.Tensor | None = None  # padded: [S * L] token of each slot of the [S, L] layout (None: loop)
    scatter: torch.Tensor | None = None  # padded: [T] slot of each token
    mask: torch.Tensor | None = None  # dense: bool [1, 1, T, T]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, T: int) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        flash_ok = dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256
        return CUDA_DEFAULT if CUDA_DEFAULT != "flash" or flash_ok else "triton"
    return "dense" if T <= CPU_DENSE_MAX_TOKENS else "padded"


def lengths_from_seq_ids(seq_ids: torch.Tensor) -> tuple[int, ...] | None:
    """The run lengths of ONE packed row whose ids form contiguous runs (how pack_turns packs), else None.
    Reads the ids on the host: one sync; pass the lengths instead when they are known (PackedBatch.seq_lengths)."""
    if seq_ids.shape[0] != 1:
        return None
    ids, counts = torch.unique_consecutive(seq_ids[0], return_counts=True)
    if torch.unique(ids).numel() != ids.numel():  # an id came back after another one: not contiguous runs
        return None
    return tuple(counts.tolist())


def packed_layout(lengths, device, backend: str = "auto", dtype: torch.dtype = torch.float32,
                  head_dim: int = 64) -> PackedLayout:
    """Build the layout of one packed row once per forward; every layer reuses it."""
    lengths = tuple(int(n) for n in lengths)
    assert lengths and min(lengths) >= 1, f"packed sequences need lengths >= 1, got {lengths[:8]}"
    device = torch.device(device)
    T, S, L = sum(lengths), len(lengths), max(lengths)
    backend = resolve_backend(backend, device, dtype, head_dim, T)
    cu_host = torch.tensor((0,) + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if device.type == "cuda":  # from pinned memory the copy is truly asynchronous (no wait for the GPU)
        cu_host = cu_host.pin_memory()
    cu = cu_host.to(device, non_blocking=True)  # the one host->device copy; everything below derives from it
    counts = (cu[1:] - cu[:-1]).long()  # [S] lengths, on the device
    layout = PackedLayout(lengths, backend, cu, L)
    if backend == "triton":
        from kernels.varlen_attn import VarlenTiles

        layout.tiles = VarlenTiles(cu, T, head_dim, dtype)
    elif backend == "flex":
        layout.block_mask = _document_block_mask(counts, T)
    elif backend == "padded" and S * L <= 2 * T:  # else: one call per sequence
        starts = cu[:-1].long()
        slot = torch.arange(L, device=device)[None, :]  # [1, L]
        valid = slot < counts[:, None]  # [S, L]
        layout.gather = torch.where(valid, starts[:, None] + slot, 0).reshape(-1)
        layout.scatter = (torch.arange(S, device=device) * L).repeat_interleave(counts, output_size=T) + (
            torch.arange(T, device=device) - starts.repeat_interleave(counts, output_size=T))
    elif backend == "dense":
        seq = torch.repeat_interleave(torch.arange(S, device=device), counts, output_size=T)
        layout.mask = build_attention_mask(T, None, seq[None], device)
    elif backend == "flash" and (device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError(f"model.attention='flash' runs torch's CUDA flash kernels on bf16/fp16, not {device.type} "
                         f"{str(dtype).removeprefix('torch.')}: use auto, triton, flex, padded or dense")
    return layout


def build_attention_mask(T: int, attention_mask: torch.Tensor | None, seq_ids: torch.Tensor | None, device):
    """Bool mask [B, 1, T, T]: causal, within the same packed sequence, only onto real (unpadded) keys.

    Every query row keeps at least its own position, so padding rows stay finite (their outputs are ignored).
    Returns None when plain causal attention is enough (no padding, no packing)."""
    if attention_mask is None and seq_ids is None:
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = causal[None]  # (1, T, T)
    if seq_ids is not None:
        mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])  # (B, T, T)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]
    return mask[:, None]  # (B, 1, T, T)


# ----------------------------------------------------------------------------------------------------------
# the backends


def attention(q, k, v, mask: torch.Tensor | PackedLayout | None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D]. `mask`: None (causal), a bool mask [B, 1, T, S]
    (True = attend), or the PackedLayout of one packed row."""
    if isinstance(mask, PackedLayout):
        return packed_attention(q, k, v, mask)
    return sdpa_attention(q, k, v, mask)


def sdpa_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: each kv head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def packed_attention(q, k, v, layout: PackedLayout) -> torch.Tensor:
    """Causal attention inside each sequence of one packed row: q [1, Hq, T, D], k/v [1, Hkv, T, D] -> [1, Hq, T, D]."""
    assert q.shape[0] == 1 and q.shape[2] == layout.num_tokens, (tuple(q.shape), layout.num_tokens)
    if layout.backend in ("triton", "flash"):  # varlen kernels take [T, H, D] (views: no copy)
        rows = [x[0].transpose(0, 1) for x in (q, k, v)]
        if layout.backend == "triton":
            from kernels import varlen_attention

            out = varlen_attention(*rows, layout.cu_seqlens, tiles=layout.tiles)
        else:
            out = _FlashVarlen.apply(*rows, layout.cu_seqlens, layout.max_len, q.shape[-1] ** -0.5)
        return out.transpose(0, 1)[None]  # [1, Hq, T, D], a view of [T, Hq, D]
    if layout.backend == "flex":
        return _flex(q, k, v, block_mask=layout.block_mask, enable_gqa=q.shape[1] != k.shape[1])
    if layout.backend == "dense":
        return sdpa_attention(q, k, v, layout.mask)
    return _padded(q, k, v, layout)


def _padded(q, k, v, layout: PackedLayout) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    lengths = layout.lengths
    if layout.gather is None:  # lengths too uneven to pad: one causal call per sequence
        return torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True) for qs, ks, vs in
                          zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], 2)
    S, L = len(lengths), layout.max_len

    def to_padded(x):  # [1, H, T, D] -> [S, H, L, D], each sequence right-padded to L
        return x[0].index_select(1, layout.gather).view(x.shape[1], S, L, x.shape[-1]).transpose(0, 1)

    # causal + right padding is exact for the real tokens: their keys all come before the pads
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v), is_causal=True)
    return out.transpose(0, 1).reshape(q.shape[1], S * L, q.shape[-1]).index_select(1, layout.scatter)[None]


class _FlashVarlen(torch.autograd.Function):
    """torch's FlashAttention-2 varlen forward/backward (the kernels behind SDPA's flash path, called with
    cu_seqlens). Schemas (torch 2.5 - 2.13; later ones add keyword-only arguments we leave at their defaults):
      _flash_attention_forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                               *, scale) -> (out, logsumexp, rng_state, unused, debug_attn_mask)
      _flash_attention_backward(dout, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                is_causal, rng_state, unused, *, scale) -> (dq, dk, dv)
    q [T, Hq, D], k/v [T, Hkv, D] with Hq % Hkv == 0 (FlashAttention-2 handles GQA itself)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


_compiled_flex = None


def _flex(q, k, v, **kwargs):
    """flex_attention, compiled once per process on CUDA (eager flex is an unfused T^2 reference: CPU tests only).
    dynamic=True: T changes with every micro-batch, and one symbolic-T compile serves them all."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, **kwargs)


def _document_block_mask(counts: torch.Tensor, T: int):
    """FlexAttention's BlockMask for causal attention within each sequence (document masking); counts [S]."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = counts.device
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=T)  # [T] seq id

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    # compiled on CUDA so the [T, T] mask is never materialised (only its 128 x 128 block summary)
    return create_block_mask(document_causal, None, None, T, T, device=device, _compile=device.type == "cuda")
