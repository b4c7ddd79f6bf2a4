"""2x2 / stride-2 max-pool of the blocks' shortcuts as the custom op `ems_yolo::max_pool2_forward` (differentiable),
keeping a 1-byte argmax per output (0..3) for backward instead of int64 indices."""

import torch

from ems_yolo.nn.ops.max_pool2 import reference
from ems_yolo.nn.ops.max_pool2 import triton as kernels


@torch.library.custom_op("ems_yolo::max_pool2_forward", mutates_args=())
def _forward(x: torch.Tensor, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (kernels if kernel else reference).forward(x)


@_forward.register_fake
def _(x, kernel):
    n, c, h, w = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = x.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=fmt)
    return out, torch.empty_like(out, dtype=torch.uint8)


@torch.library.custom_op("ems_yolo::max_pool2_backward", mutates_args=())
def _backward(grad: torch.Tensor, arg: torch.Tensor, height: int, width: int, kernel: bool) -> torch.Tensor:
    return (kernels if kernel else reference).backward(grad, arg, height, width)


@_backward.register_fake
def _(grad, arg, height, width, kernel):
    return reference.input_like(arg, height, width, grad.dtype, False)


def _setup(ctx, inputs, output) -> None:
    x, kernel = inputs
    ctx.save_for_backward(output[1])
    ctx.size, ctx.kernel = x.shape[-2:], kernel


def _autograd(ctx, grad, _grad_arg):
    (arg,) = ctx.saved_tensors
    return _backward(grad, arg, ctx.size[0], ctx.size[1], ctx.kernel), None


_forward.register_autograd(_autograd, setup_context=_setup)


def forward(x: torch.Tensor, kernel: bool) -> torch.Tensor:
    """2x2 / stride-2 max-pool of a dense `[N, C, H, W]` x (differentiable; saves only the argmax bytes)."""
    return _forward(x, kernel)[0]
