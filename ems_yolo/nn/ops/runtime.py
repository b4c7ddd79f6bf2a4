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


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (`[T, ...]`): a CUDA tensor (or any, under the interpreter) whose storage
    is dense with the steps outermost (contiguous or channels_last per step)."""
    if triton is None or not (x.is_cuda or INTERPRETING):
        return False
    step = x[0]
    dense = step.is_contiguous() or (step.dim() == 4 and step.is_contiguous(memory_format=torch.channels_last))
    return dense and x.stride(0) == step.numel()


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` runs the Triton kernels on `x`: 'triton' wherever they are usable, 'auto' on CUDA tensors
    they support (never through the interpreter), 'torch' never."""
    if backend == "triton":
        return usable(x)
    return backend == "auto" and x.is_cuda and usable(x)
