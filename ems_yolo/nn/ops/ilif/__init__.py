"""The multi-step I-LIF as `torch.library` custom ops: `ems_yolo::ilif_forward` (integer spikes and the 1-byte
straight-through window, differentiable in the currents) and `ems_yolo::ilif_backward`.

As for the LIF (`ops.lif`), the ops are opaque to dynamo and inductor; `kernel` picks the Triton kernels
(`triton.py`) over the torch reference (`reference.py`), and `runtime.use_kernels` decides it. The kernels compute
in float32, so float64 currents always take the reference.
"""

from __future__ import annotations

import torch

from ems_yolo.nn.ops import multistep
from ems_yolo.nn.ops.ilif import reference
from ems_yolo.nn.ops.ilif import triton as kernels

CHARGES = reference.CHARGES

_forward, _backward = multistep.custom_ops(
    "ilif", reference, kernels, "SymInt levels, float tau, str charge", "Tensor window, float tau, str charge",
    lambda levels, tau, charge: (tau, charge),
)


def forward(currents: torch.Tensor, levels: int, tau: float, charge: str, kernel: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(integer spikes in the currents' dtype, uint8 window) for `[T, ...]` currents; differentiable in them."""
    return _forward(currents, levels, tau, charge, kernel and currents.dtype != torch.float64)

