"""Compiled training blocks (`model.compile_train`): the elementwise work of each decoder block fused by torch.compile
for the scoring passes and the update, applied from outside the model.

    compile_blocks(policy)     # after shard_model (FSDP2) or on a plain model; the reference model likewise

Why: in eager PyTorch a decoder block's non-GEMM work is a chain of small kernels, each a round trip to HBM: RMSNorm
in fp32 is ~8 kernels forward (upcast, square, mean, rsqrt, scale, downcast, weight) and more backward, SwiGLU 2-3.
At 16k-token micro-batches they took ~30% of the update's GPU time (BENCHMARKS.md, 1.5B profile, 2026-11-21).
Compiled, each norm and the SwiGLU MLP become one or two fused kernels between the GEMMs (cuBLAS either way).

What is compiled: every RMSNorm (the two per block, Qwen3's per-head q/k norms, the final norm) and every MLP, each
module's forward replaced by a dispatcher around ONE torch.compile'd function per module class (the modules share
their code, so 28 blocks compile once). Attention stays outside the compiled code by construction: its inputs
include the packing layout (Python lists of sequence lengths, per-sequence loops), which a compiled graph would
specialise on (one recompile per micro-batch), and its kernels (memrl/model.py, kernels/) are opaque to the
compiler anyway. RoPE and the two residual adds, which live in the attention and block code, stay eager: the
per-module scope is what can be compiled without changing memrl/model.py (compiling the whole block needs the
attention to be a custom op taking tensors only; then `DecoderLayer` itself is the unit to compile).

Invariants
  - Same math as eager (tests compare loss and gradients in fp32); parameter names unchanged (no `_orig_mod.`
    prefix: the module objects stay, only their `forward` attribute changes), so checkpoints are unaffected.
  - One compile per (module class, input rank, grad mode): the token dimension (dim 1 of every input here,
    [B, T, ...]) is marked dynamic before each call, so packed micro-batches of any length reuse one graph.
    Other inputs than one packed row of >= 2 tokens (train.py's one-token dummy micro-batch; the generator's batches
    when it runs the policy itself, i.e. without FSDP) run eagerly: they would be specialised into more graphs.
  - FSDP2: fully_shard hooks run in the block's __call__, around its forward, so the compiled functions see the
    gathered parameters as ordinary tensors and never trace a collective; order with fully_shard does not matter.
    The rollout copy (memrl/distributed.py rollout_view) is built from the classes, not the instances: its modules
    are never compiled, and the generator's own compilation (memrl/model_runner.py) is unaffected.
  - `COMPILE_STATS` sums the seconds spent in calls that compiled (train.py logs them in the first step's row).
"""
from __future__ import annotations

import time

import torch

from memrl.model import MLP, DecoderLayer, RMSNorm

COMPILE_STATS = {"compile_s": 0.0, "compiles": 0}
# (module class, method, backend) -> that method compiled (unbound: the module is the first argument). One per class
# for the whole process: the policy's and the reference's modules share it (another torch.compile object would
# recompile)
_COMPILED: dict[tuple[type, str, str], object] = {}
LAYER_HALVES = ("attention_inputs", "attention_output_and_mlp")  # DecoderLayer's code around its attention


def _compiled(cls: type, name: str, backend: str):
    """(the class's eager method, its one shared compiled version)."""
    eager = getattr(cls, name)
    if (cls, name, backend) not in _COMPILED:
        _COMPILED[(cls, name, backend)] = torch.compile(eager, backend=backend)
    return eager, _COMPILED[(cls, name, backend)]


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile the RMSNorm and MLP modules of `model` in place (see the module docstring); returns how many.
    backend: torch.compile's ("eager" = dynamo alone: the same graphs and guards without code generation, for tests)."""
    n = 0
    for module in model.modules():
        if isinstance(module, (RMSNorm, MLP)) and "forward" not in vars(module):
            module.forward = _dispatcher(module, backend)
            n += 1
    return n


def _dispatcher(module: torch.nn.Module, backend: str):
    eager, compiled = _compiled(type(module), "forward", backend)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # training and scoring run one packed row [1, T, ...]; anything else (a one-token dummy micro-batch, the
        # generator's batches on a model without FSDP) is eager, and so is a call from code being compiled already
        if x.dim() < 3 or x.shape[0] != 1 or x.shape[1] < 2 or torch.compiler.is_compiling():
            return eager(module, x)
        torch._dynamo.maybe_mark_dynamic(x, 1)  # any number of tokens: one graph
        graphs, t0 = compiled_graphs(), time.perf_counter()
        out = compiled(module, x)
        if compiled_graphs() > graphs:
            COMPILE_STATS["compile_s"] += time.perf_counter() - t0
            COMPILE_STATS["compiles"] += compiled_graphs() - graphs
        return out

    return forward


# ----------------------------------------------------------------------------------------------------------
# the generator's decode step, compiled per layer (`rollout.compile=layers`)


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer's two halves around its attention (memrl/model.py DecoderLayer.attention_inputs:
    norm, q/k/v GEMM, RoPE; attention_output_and_mlp: o_proj, residual, norm, SwiGLU, residual) for the generator's
    decode step, in place; returns the number of layers. Why: compiling the whole decode step traces all L layers
    into one graph (43 s for the 1.5B's 28 layers, most of the first RL step's excess, BENCHMARKS.md); the halves are
    the same code in every layer, so ONE compiled function per half serves them all (the module is an argument), and
    what differs per layer (the KV cache a layer's attention reads) stays outside the compiled code. What fuses is
    the same elementwise work; the attention kernels are opaque to the compiler either way. Decode calls only
    ([B >= 2, 1 token, ...], no grad) run compiled, with B dynamic (one graph for every CUDA-graph bucket); anything
    else (training, scoring, a prefill, a batch of 1 the compiler would specialise) runs the eager code."""
    n = 0
    for module in model.modules():
        if isinstance(module, DecoderLayer) and LAYER_HALVES[0] not in vars(module):
            for name in LAYER_HALVES:
                setattr(module, name, _decode_dispatcher(module, name, backend))
            n += 1
    return n


def _decode_dispatcher(module: torch.nn.Module, name: str, backend: str):
    eager, compiled = _compiled(type(module), name, backend)

    def half(x: torch.Tensor, *rest: torch.Tensor):
        if (x.shape[0] < 2 or x.shape[1] != 1 or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return eager(module, x, *rest)
        for t in (x, *rest):  # every input leads with the batch: one graph for any number of rows
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(module, x, *rest)  # the generator counts the compile time of its calls (stats compile_s)

    return half


def uncompile_layers(model: torch.nn.Module) -> None:
    """Undo compile_layers: every decoder layer runs its class's eager code again."""
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            for name in LAYER_HALVES:
                vars(module).pop(name, None)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter): a call that raised it compiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
