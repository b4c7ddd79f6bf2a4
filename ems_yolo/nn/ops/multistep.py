"""What the multi-step neuron ops (the LIF of `ops.lif`, the I-LIF of `ops.ilif`) share: a forward from `[T, ...]`
currents to the spikes and one uint8 code per neuron and step, and a backward that reads only that code.

`custom_ops` registers such a pair as `torch.library` custom ops (fake implementations and the autograd formula
that links them included); `backward_buffers` lays out what a Triton backward kernel reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch


def custom_ops(
    name: str, reference: ModuleType, kernels: ModuleType, params: str, backward_params: str,
    backward_args: Callable[..., tuple],
) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """The ops `ems_yolo::<name>_forward(Tensor currents, <params>, bool kernel) -> (spikes, code)` and
    `ems_yolo::<name>_backward(Tensor grad_spikes, <backward_params>, bool kernel) -> dL/dI` (backward_params: the
    code first), run by the `forward` and `backward` of module `kernels` (kernel true) or `reference`. The forward is
    differentiable in the currents: its backward op gets the code and `backward_args(*params)` (values, in order)."""

    def impl(kernel: bool) -> ModuleType:
        return kernels if kernel else reference

    def run_forward(currents, *args):
        *values, kernel = args
        return impl(kernel).forward(currents, *values)

    def run_backward(grad_spikes, code, *args):
        *values, kernel = args
        return impl(kernel).backward(grad_spikes, code, *values)

    forward = torch.library.custom_op(f"ems_yolo::{name}_forward", run_forward, mutates_args=(),
                                      schema=f"(Tensor currents, {params}, bool kernel) -> (Tensor, Tensor)")
    backward = torch.library.custom_op(f"ems_yolo::{name}_backward", run_backward, mutates_args=(),
                                       schema=f"(Tensor grad_spikes, {backward_params}, bool kernel) -> Tensor")

    @forward.register_fake
    def _(currents, *args):
        return torch.empty_like(currents), torch.empty_like(currents, dtype=torch.uint8)

    @backward.register_fake
    def _(grad_spikes, code, *args):
        return torch.empty_like(code, dtype=grad_spikes.dtype)

    def setup(ctx, inputs, output) -> None:
        _, *values, kernel = inputs
        ctx.save_for_backward(output[1])
        ctx.args, ctx.kernel, ctx.params = backward_args(*values), kernel, len(values)

    def autograd(ctx, grad_spikes, _grad_code):
        (code,) = ctx.saved_tensors
        return backward(grad_spikes, code, *ctx.args, ctx.kernel), *(None,) * ctx.params, None

    forward.register_autograd(autograd, setup_context=setup)
    return forward, backward


def backward_buffers(grad_spikes: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(dL/ds in the layout of `code`, copied into it when it differs; an empty dL/dI like code in dL/ds's dtype;
    T; elements per step) for a backward kernel over `[T, ...]` steps."""
    if grad_spikes.stride() != code.stride():
        grad_spikes = torch.empty_like(code, dtype=grad_spikes.dtype).copy_(grad_spikes)
    return grad_spikes, torch.empty_like(code, dtype=grad_spikes.dtype), code.shape[0], code[0].numel()
