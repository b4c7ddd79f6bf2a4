"""The multi-step I-LIF as `torch.library` custom ops: `ems_yolo::ilif_forward` (integer spikes and the 1-byte
straight-through window, differentiable in the currents) and `ems_yolo::ilif_backward`.

As for the LIF (`ops.lif`), the ops are opaque to dynamo and inductor; `kernel` picks the Triton kernels
(`triton.py`) over the torch reference (`reference.py`), and `runtime.use_kernels` decides it. The kernels compute
in float32, so float64 currents always take the reference.
"""

from __future__ import annotations

import torch

from ems_yolo.nn.ops.ilif import reference
from ems_yolo.nn.ops.ilif import triton as kernels

CHARGES = reference.CHARGES


@torch.library.custom_op("ems_yolo::ilif_forward", mutates_args=())
def _forward(currents: torch.Tensor, levels: int, tau: float, charge: str, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    impl = kernels if kernel else reference
    return impl.forward(currents, levels, tau, charge)


@_forward.register_fake
def _(currents, levels, tau, charge, kernel):
    return torch.empty_like(currents), torch.empty_like(currents, dtype=torch.uint8)


@torch.library.custom_op("ems_yolo::ilif_backward", mutates_args=())
def _backward(grad_spikes: torch.Tensor, window: torch.Tensor, tau: float, charge: str, kernel: bool) -> torch.Tensor:
    impl = kernels if kernel else reference
    return impl.backward(grad_spikes, window, tau, charge)


@_backward.register_fake
def _(grad_spikes, window, tau, charge, kernel):
    return torch.empty_like(window, dtype=grad_spikes.dtype)


def _setup(ctx, inputs, output) -> None:
    _, _, tau, charge, kernel = inputs
    ctx.save_for_backward(output[1])
    ctx.tau, ctx.charge, ctx.kernel = tau, charge, kernel


def _autograd(ctx, grad_spikes, _grad_window):
    (window,) = ctx.saved_tensors
    return _backward(grad_spikes, window, ctx.tau, ctx.charge, ctx.kernel), None, None, None, None


_forward.register_autograd(_autograd, setup_context=_setup)


def forward(currents: torch.Tensor, levels: int, tau: float, charge: str, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(integer spikes in the currents' dtype, uint8 window) for `[T, ...]` currents; differentiable in them."""
    return _forward(currents, levels, tau, charge, kernel and currents.dtype != torch.float64)

