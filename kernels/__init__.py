"""memrl's Triton kernels, each beside its PyTorch reference (see kernels/README.md).

    from kernels import token_logprobs, linear_token_logprobs, ppo_loss, linear_ppo_loss, set_backend, get_backend

A  token_logprobs         logits [N, V] -> per-token log-prob (+ entropy)          kernels/logprob.py
A' linear_token_logprobs  hidden [N, H], lm_head [V, H] -> the same, fused         kernels/linear_logprob.py
B  ppo_loss               token-mean dual-clip PPO + KL loss over [N] vectors      kernels/ppo_loss.py
A'+B linear_ppo_loss      lm_head + log-prob + loss fused, 3 GEMMs (training)    kernels/linear_ppo.py
set_backend("auto" | "triton" | "torch") or MEMRL_KERNELS picks Triton or the references.

A, A' and A'+B are imported on first use, so `import kernels` stays cheap and works where Triton is
missing. No __version__ on purpose: transformers probes for a top-level package named `kernels`
(the Hugging Face `kernels` hub) and must keep finding no usable one here.
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
}

__all__ = ["token_logprobs", "token_logprobs_torch", "linear_token_logprobs", "linear_token_logprobs_torch",
           "linear_ppo_loss", "linear_ppo_loss_torch", "linear_token_logprobs_scoring", "ppo_loss", "ppo_loss_torch", "set_backend", "get_backend"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
