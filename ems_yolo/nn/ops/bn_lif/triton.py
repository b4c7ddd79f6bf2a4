"""The fused tdBN + LIF forward in Triton: the batch statistics in one pass, then the LIF kernel with the
per-channel scale and shift applied in registers, so the pre-BatchNorm activation is read twice (BatchNorm + LIF
unfused: three reads and a write) and the BatchNorm output is never written."""

from __future__ import annotations

import torch

from ems_yolo.nn.ops.bn_lif.reference import affine, stats
from ems_yolo.nn.ops.lif import triton as lif_kernels


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, time_steps: int, tau: float,
            vth: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `reference.forward`, on tensors `runtime.usable` accepts."""
    mean, invstd = stats(x, eps)
    spikes, code = lif_kernels.forward(x.view(time_steps, -1, *x.shape[1:]), tau, vth, alpha,
                                       affine=affine(mean, invstd, weight, bias))
    return spikes.flatten(0, 1), code.flatten(0, 1), mean, invstd
