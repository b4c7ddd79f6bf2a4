"""Triton kernels of the multi-step LIF with the rectangular surrogate (`reference.py` beside this file defines them).

One program walks all T steps for a block of neurons with the membrane in registers: the forward reads each
current once and writes the spike and the 1-byte backward code (bit 0 = surrogate window, bit 1 = spike); the
backward reads the code and dL/ds once and writes dL/dI. The torch reference needs several passes over memory per
step. Arithmetic is float32 in registers, in the reference's order, so for float32 inputs spikes and codes are
bit-identical to it. Kernels index raw storage, so every tensor of one call shares one dense layout
(contiguous or channels_last per step, steps outermost).

Runs on CUDA tensors; with TRITON_INTERPRET=1 set before the first import of triton, also on CPU tensors
(Triton's interpreter, used by the tests on machines without a GPU).
"""

import torch

from ems_yolo.nn.ops import multistep
from ems_yolo.nn.ops.runtime import triton

if triton is not None:
    import triton.language as tl

BLOCK = 1024


if triton is not None:

    @triton.jit
    def _forward_kernel(cur_ptr, spk_ptr, code_ptr, scale_ptr, shift_ptr, n, channels, inner, tau, vth, half_width,
                        T: tl.constexpr, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        u = tl.zeros([BLOCK], dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        if AFFINE:  # a per-channel affine map of the input (tdBN's normalize + scale + shift) fused in front
            c = (offs // inner) % channels
            a = tl.load(scale_ptr + c, mask=mask, other=0.0)
            b = tl.load(shift_ptr + c, mask=mask, other=0.0)
        for t in tl.static_range(T):
            i = tl.load(cur_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            if AFFINE:
                i = i * a + b
            if t == 0:
                u = i
            else:
                u = u * tau * (1.0 - s) + i
            x = u - vth
            s = tl.where(x > 0.0, 1.0, 0.0)
            window = tl.where(tl.abs(x) < half_width, 1.0, 0.0)
            tl.store(spk_ptr + t * n + offs, s.to(spk_ptr.dtype.element_ty), mask=mask)
            tl.store(code_ptr + t * n + offs, (window + 2.0 * s).to(tl.uint8), mask=mask)

    @triton.jit
    def _backward_kernel(grad_s_ptr, code_ptr, grad_ptr, n, tau, scale, T: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        carry = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(T):
            t = T - 1 - k
            code = tl.load(code_ptr + t * n + offs, mask=mask, other=0).to(tl.int32)
            g = tl.load(grad_s_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            g = g * (code & 1).to(tl.float32) * scale
            if k > 0:
                g = g + carry * tau * (code < 2).to(tl.float32)
            tl.store(grad_ptr + t * n + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
            carry = g

    @triton.jit
    def _decode_kernel(code_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        code = tl.load(code_ptr + offs, mask=mask, other=0)
        tl.store(out_ptr + offs, (code >> 1).to(out_ptr.dtype.element_ty), mask=mask)


def forward(
    currents: torch.Tensor, tau: float, vth: float, alpha: float,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(spikes in the currents' dtype, uint8 code) for `[T, B, C, ...]` currents; see `usable`. `affine`: float32
    per-channel (scale, shift) applied to the currents first, in registers (the input is still read once)."""
    T, n = currents.shape[0], currents[0].numel()
    spikes = torch.empty_like(currents)
    code = torch.empty_like(currents, dtype=torch.uint8)
    channels, inner = 1, 1
    scale = shift = code  # unread placeholders without affine
    if affine is not None:
        scale, shift = (v.float().contiguous() for v in affine)
        channels = currents.shape[2]
        inner = 1 if currents[0].is_contiguous(memory_format=torch.channels_last) else currents[0, 0, 0].numel()
    _forward_kernel[(triton.cdiv(n, BLOCK),)](currents, spikes, code, scale, shift, n, channels, inner, tau, vth,
                                              alpha / 2, T=T, AFFINE=affine is not None, BLOCK=BLOCK)
    return spikes, code


def backward(grad_spikes: torch.Tensor, code: torch.Tensor, tau: float, scale: float) -> torch.Tensor:
    """dL/dI in the layout of `code` (dL/ds is copied into that layout first when it differs)."""
    grad_spikes, grad, T, n = multistep.backward_buffers(grad_spikes, code)
    _backward_kernel[(triton.cdiv(n, BLOCK),)](grad_spikes, code, grad, n, tau, scale, T=T, BLOCK=BLOCK)
    return grad


def decode(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spikes (bit 1 of the code) in `dtype`, in one pass (the reference's shift and cast take two)."""
    out = torch.empty_like(code, dtype=dtype)
    n = code.numel()
    _decode_kernel[(triton.cdiv(n, BLOCK),)](code, out, n, BLOCK=BLOCK)
    return out
