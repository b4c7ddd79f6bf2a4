"""The multi-step LIF (rectangular surrogate) as `torch.library` custom ops: `ems_yolo::lif_forward` (spikes and
the 1-byte backward code, differentiable in the currents) and `ems_yolo::lif_backward`.

Custom ops are opaque to dynamo and inductor (each is one node with a fake implementation giving its outputs'
shapes), so a compiled model traces as one graph and inductor fuses what surrounds them. `kernel` picks the
Triton kernels (`triton.py`) over the torch reference (`reference.py`); `runtime.use_kernels` decides it.
"""

from __future__ import annotations

import torch

from ems_yolo.nn.ops.lif import reference
from ems_yolo.nn.ops.lif import triton as kernels


@torch.library.custom_op("ems_yolo::lif_forward", mutates_args=())
def _forward(currents: torch.Tensor, tau: float, vth: float, alpha: float, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    impl = kernels if kernel else reference
    return impl.forward(currents, tau, vth, alpha)


@_forward.register_fake
def _(currents, tau, vth, alpha, kernel):
    return torch.empty_like(currents), torch.empty_like(currents, dtype=torch.uint8)


@torch.library.custom_op("ems_yolo::lif_backward", mutates_args=())
def _backward(grad_spikes: torch.Tensor, code: torch.Tensor, tau: float, scale: float, kernel: bool) -> torch.Tensor:
    impl = kernels if kernel else reference
    return impl.backward(grad_spikes, code, tau, scale)


@_backward.register_fake
def _(grad_spikes, code, tau, scale, kernel):
    return torch.empty_like(code, dtype=grad_spikes.dtype)


def _setup(ctx, inputs, output) -> None:
    _, tau, _, alpha, kernel = inputs
    ctx.save_for_backward(output[1])
    ctx.tau, ctx.scale, ctx.kernel = tau, 1 / alpha, kernel


def _autograd(ctx, grad_spikes, _grad_code):
    (code,) = ctx.saved_tensors
    return _backward(grad_spikes, code, ctx.tau, ctx.scale, ctx.kernel), None, None, None, None


_forward.register_autograd(_autograd, setup_context=_setup)


def forward(currents: torch.Tensor, tau: float, vth: float, alpha: float, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(spikes in the currents' dtype, uint8 code) for `[T, ...]` currents; differentiable in the currents."""
    return _forward(currents, tau, vth, alpha, kernel)


def backward(grad_spikes: torch.Tensor, code: torch.Tensor, tau: float, scale: float, kernel: bool) -> torch.Tensor:
    """dL/dI from dL/ds and the forward's code (scale = 1 / alpha, the rectangle's height)."""
    return _backward(grad_spikes, code, tau, scale, kernel)


def decode(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spikes of a forward from its code."""
    return reference.decode(code, dtype)
