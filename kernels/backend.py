"""One switch between the Triton kernels and their PyTorch references.

    set_backend("auto" | "triton" | "torch")      or env MEMRL_KERNELS=auto|triton|torch (read at import)

auto   = Triton when the tensors are on CUDA, or when TRITON_INTERPRET=1 (Triton's CPU interpreter,
         which CI uses); otherwise the PyTorch reference.
triton = always Triton; a CPU tensor without the interpreter is an error (not a silent fallback).
torch  = always the PyTorch reference (runs anywhere, e.g. macOS where Triton is not installed).

Invariant: TRITON_INTERPRET must be set before `triton` is first imported (Triton decides at
`@triton.jit` time whether a kernel is compiled or interpreted); tests/conftest.py does this.

Kernel modules import `triton` and `tl` from here. Without Triton (it ships for Linux only) they get
a stand-in whose `jit` returns the function unchanged, so `import kernels` works everywhere and
only the references run.
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS / no triton: the references still work
    HAS_TRITON = False

    class _NoTriton:
        """Lets `@triton.jit` and `x: tl.constexpr` parse; the kernels are never launched."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = tl = _NoTriton()

BACKENDS = ("auto", "triton", "torch")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get("MEMRL_KERNELS", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Choose the kernel implementation for every kernel in this package (process-wide)."""
    global _backend
    _backend = _checked(name)


def get_backend() -> str:
    return _backend


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel called on these tensors (None entries ignored) should run the Triton path."""
    if _backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if _backend == "auto":
        return HAS_TRITON and (on_cuda or interpreter_on())
    # forced "triton"
    if not HAS_TRITON:
        raise RuntimeError("kernel backend 'triton' was forced but triton is not installed; "
                           "use set_backend('torch') (or MEMRL_KERNELS=torch)")
    if not on_cuda and not interpreter_on():
        raise RuntimeError("kernel backend 'triton' was forced on CPU tensors without Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported, move the tensors to CUDA, "
                           "or use set_backend('torch')")
    return True
