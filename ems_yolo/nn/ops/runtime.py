"""Where the Triton kernels can run, and which implementation a backend name picks for a tensor."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU-only torch builds come without triton
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "torch", "triton")


def available() -> bool:
    """Whether the triton package imports."""
    return triton is not None


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def usable(x: torch.Tensor, steps: bool = True) -> bool:
    """Whether the kernels can run on `x`: a CUDA tensor (or any, under the interpreter) whose storage is dense,
    contiguous or channels_last (with `steps`, x is `[T, ...]`, each step so, the steps outermost)."""
    if triton is None or not (x.is_cuda or INTERPRETING):
        return False
    if not steps:
        return _dense(x)
    return _dense(x[0]) and x.stride(0) == x[0].numel()


def use_kernels(backend: str, x: torch.Tensor, steps: bool = True) -> bool:
    """Whether `backend` runs the Triton kernels on `x`: 'triton' wherever they are usable, 'auto' on CUDA tensors
    they support (never through the interpreter), 'torch' never."""
    if backend == "triton":
        return usable(x, steps)
    return backend == "auto" and x.is_cuda and usable(x, steps)
