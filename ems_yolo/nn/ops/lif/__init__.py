"""The multi-step LIF (rectangular surrogate) as `torch.library` custom ops: `ems_yolo::lif_forward` (spikes and
the 1-byte backward code, differentiable in the currents), `ems_yolo::lif_backward` and `ems_yolo::lif_decode`
(the spikes rebuilt from the code, for a conv's backward).

Custom ops are opaque to dynamo and inductor (each is one node with a fake implementation giving its outputs'
shapes), so a compiled model traces as one graph and inductor fuses what surrounds them. `kernel` picks the
Triton kernels (`triton.py`) over the torch reference (`reference.py`); `runtime.use_kernels` decides it.
"""

import torch

from ems_yolo.nn.ops import multistep
from ems_yolo.nn.ops.lif import reference
from ems_yolo.nn.ops.lif import triton as kernels

_forward, _backward = multistep.custom_ops(
    "lif", reference, kernels, "float tau, float vth, float alpha", "Tensor code, float tau, float scale",
    lambda tau, vth, alpha: (tau, 1 / alpha),
)


def forward(currents: torch.Tensor, tau: float, vth: float, alpha: float, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(spikes in the currents' dtype, uint8 code) for `[T, ...]` currents; differentiable in the currents."""
    return _forward(currents, tau, vth, alpha, kernel)


def backward(grad_spikes: torch.Tensor, code: torch.Tensor, tau: float, scale: float, kernel: bool) -> torch.Tensor:
    """dL/dI from dL/ds and the forward's code (scale = 1 / alpha, the rectangle's height)."""
    return _backward(grad_spikes, code, tau, scale, kernel)


@torch.library.custom_op("ems_yolo::lif_decode", mutates_args=())
def _decode(code: torch.Tensor, dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    return (kernels if kernel else reference).decode(code, dtype)


@_decode.register_fake
def _(code, dtype, kernel):
    return torch.empty_like(code, dtype=dtype)


def decode(code: torch.Tensor, dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    """The spikes of a forward from its code, in `dtype`."""
    return _decode(code, dtype, kernel)
