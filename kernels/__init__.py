"""memrl's Triton kernels, each beside its PyTorch reference (see kernels/README.md).

    from kernels import token_logprobs, linear_token_logprobs, ppo_loss, linear_ppo_loss, set_backend, get_backend

A  token_logprobs         logits [N, V] -> per-token log-prob (+ entropy)          kernels/logprob.py
A' linear_token_logprobs  hidden [N, H], lm_head [V, H] -> the same, fused         kernels/linear_logprob.py
B  ppo_loss               token-mean dual-clip PPO + KL loss over [N] vectors      kernels/ppo_loss.py
A'+B linear_ppo_loss      lm_head + log-prob + loss fused, 3 GEMMs: benchmark-only  kernels/linear_ppo.py
   varlen_attention       causal attention over packed sequences (cu_seqlens)     kernels/varlen_attn.py
set_backend("auto" | "triton" | "torch") or MEMRL_KERNELS picks Triton or the references.

A, A', A'+B and varlen_attention are imported on first use, so `import kernels` stays cheap and works where
Triton is missing. The varlen module is `varlen_attn`, not `varlen_attention`: a submodule of that name would
replace the function as an attribute of the package once imported. No __version__ on purpose: transformers probes
for a top-level package named `kernels` (the Hugging Face `kernels` hub) and must keep finding no usable one here.
"""
import importlib

from kernels.backend import get_backend, set_backend
from kernels.ppo_loss import ppo_loss, ppo_loss_torch

_LAZY = {
    "token_logprobs": "kernels.logprob",
    "token_logprobs_torch": "kernels.logprob",
    "linear_token_logprobs": "kernels.linear_logprob",
    "linear_token_logprobs_torch": "kernels.linear_logprob",
    "linear_ppo_loss": "kernels.linear_ppo",
    "linear_ppo_loss_torch": "kernels.linear_ppo",
    "linear_token_logprobs_scoring": "kernels.linear_ppo",
    "varlen_attention": "kernels.varlen_attn",
    "varlen_attention_torch": "kernels.varlen_attn",
}

__all__ = ["token_logprobs", "token_logprobs_torch", "linear_token_logprobs", "linear_token_logprobs_torch",
           "linear_ppo_loss", "linear_ppo_loss_torch", "linear_token_logprobs_scoring", "varlen_attention",
           "varlen_attention_torch", "ppo_loss", "ppo_loss_torch", "set_backend", "get_backend"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
