"""Triton kernels of the multi-step I-LIF (`reference.py` beside this file defines them).

One program walks all T steps for a block of neurons with the membrane in registers: the forward reads each
current once and writes the integer spike and the 1-byte straight-through window; the backward reads the window
and dL/ds once and writes dL/dI. Arithmetic is float32 in registers, in the reference's order; round half to even
is `(x + 2^23) - 2^23` (exact for 0 <= x < 2^23, and x is clipped to [0, D] first), so for float32 inputs spikes and
windows are bit-identical to the reference. Kernels index raw storage, so every tensor of one call shares one
dense layout (contiguous or channels_last per step, steps outermost).

Runs on CUDA tensors; with TRITON_INTERPRET=1 set before the first import of triton, also on CPU tensors.
"""

from __future__ import annotations

import torch

from ems_yolo.nn.ops import multistep
from ems_yolo.nn.ops.runtime import triton

if triton is not None:
    import triton.language as tl

BLOCK = 1024
ROUNDER = 8388608.0  # 2^23: float32 addition rounds to an integer (half to even) at this magnitude


if triton is not None:

    @triton.jit
    def _forward_kernel(cur_ptr, spk_ptr, win_ptr, n, levels, tau, gain, T: tl.constexpr, GEN1: tl.constexpr,
                        BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        u = tl.zeros([BLOCK], dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            i = tl.load(cur_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            v = u - s
            if GEN1:
                u = v + (i - v) * gain
            elif t == 0:
                u = i
            else:
                u = v * tau + i
            c = tl.minimum(tl.maximum(u, 0.0), levels)
            s = (c + ROUNDER) - ROUNDER
            window = (u >= 0.0) & (u <= levels)
            tl.store(spk_ptr + t * n + offs, s.to(spk_ptr.dtype.element_ty), mask=mask)
            tl.store(win_ptr + t * n + offs, window.to(tl.uint8), mask=mask)

    @triton.jit
    def _backward_kernel(grad_s_ptr, win_ptr, grad_ptr, n, tau, gain, T: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        carry = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(T):
            t = T - 1 - k
            w = tl.load(win_ptr + t * n + offs, mask=mask, other=0).to(tl.float32)
            g = tl.load(grad_s_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32) * w
            if k > 0:
                g = g + carry * tau
            tl.store(grad_ptr + t * n + offs, (g * gain).to(grad_ptr.dtype.element_ty), mask=mask)
            carry = g


def forward(currents: torch.Tensor, levels: int, tau: float, charge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer spikes in the currents' dtype, uint8 window) for `[T, ...]` currents; see `runtime.usable`."""
    T, n = currents.shape[0], currents[0].numel()
    spikes = torch.empty_like(currents)
    window = torch.empty_like(currents, dtype=torch.uint8)
    gen1 = charge == "gen1"
    _forward_kernel[(triton.cdiv(n, BLOCK),)](currents, spikes, window, n, float(levels), tau, 1 - tau, T=T,
                                              GEN1=gen1, BLOCK=BLOCK)
    return spikes, window


def backward(grad_spikes: torch.Tensor, window: torch.Tensor, tau: float, charge: str) -> torch.Tensor:
    """dL/dI in the layout of `window` (dL/ds is copied into that layout first when it differs)."""
    grad_spikes, grad, T, n = multistep.backward_buffers(grad_spikes, window)
    gain = 1 - tau if charge == "gen1" else 1.0
    _backward_kernel[(triton.cdiv(n, BLOCK),)](grad_spikes, window, grad, n, tau, gain, T=T, BLOCK=BLOCK)
    return grad
