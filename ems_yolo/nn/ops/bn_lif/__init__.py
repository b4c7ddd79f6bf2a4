"""tdBN in training mode feeding a LIF, fused: the custom op `ems_yolo::bn_lif_forward` (differentiable in the
input and the BatchNorm weight and bias, gradients through the batch statistics included).

Unfused, a training step writes the BatchNorm output and reads it back in the LIF; fused (Triton), the LIF kernel
applies the normalize + affine map itself. Backward runs the LIF backward to dL/dy, then BatchNorm's own backward.
The batch statistics come back as outputs (not differentiable) so the caller updates the running statistics.
"""

import torch

from ems_yolo.nn.ops import lif as lif_ops
from ems_yolo.nn.ops.bn_lif import reference
from ems_yolo.nn.ops.bn_lif import triton as kernels


@torch.library.custom_op("ems_yolo::bn_lif_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, time_steps: int, tau: float,
             vth: float, alpha: float, kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (kernels if kernel else reference).forward(x, weight, bias, eps, time_steps, tau, vth, alpha)


@_forward.register_fake
def _(x, weight, bias, eps, time_steps, tau, vth, alpha, kernel):
    c = x.shape[1]
    stat = x.new_empty(c, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.uint8), stat, torch.empty_like(stat)


def backward(grad_spikes: torch.Tensor, x: torch.Tensor, code: torch.Tensor, weight: torch.Tensor,
             mean: torch.Tensor, invstd: torch.Tensor, eps: float, time_steps: int, tau: float, alpha: float,
             kernel: bool, needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(dL/dx, dL/dweight, dL/dbias) from dL/dspikes (`[N, C, H, W]`, like x) and the forward's saved tensors."""
    grad_y = lif_ops.backward(grad_spikes.to(x.dtype).view(time_steps, -1, *x.shape[1:]),
                              code.view(time_steps, -1, *x.shape[1:]), tau, 1 / alpha, kernel).flatten(0, 1)
    return torch.ops.aten.native_batch_norm_backward(
        grad_y, x, weight, None, None, mean, invstd, True, eps, list(needs))


def _setup(ctx, inputs, output) -> None:
    x, weight, _, eps, time_steps, tau, _, alpha, kernel = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], output[3])
    ctx.args = eps, time_steps, tau, alpha, kernel


def _autograd(ctx, grad_spikes, _grad_code, _grad_mean, _grad_invstd):
    x, weight, code, mean, invstd = ctx.saved_tensors
    grads = backward(grad_spikes, x, code, weight, mean, invstd, *ctx.args, tuple(ctx.needs_input_grad[:3]))
    return (*grads, None, None, None, None, None, None)


_forward.register_autograd(_autograd, setup_context=_setup)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, time_steps: int, tau: float,
            vth: float, alpha: float, kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spikes like x, uint8 code like x, batch mean, batch 1/sqrt(var + eps)) of BatchNorm(x) (training mode,
    `[T*B, C, H, W]`) fed to the LIF; kernel picks the Triton kernel over the torch reference."""
    return _forward(x, weight, bias, eps, time_steps, tau, vth, alpha, kernel)
