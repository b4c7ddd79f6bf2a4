"""tdBN (training-mode BatchNorm) feeding a multi-step LIF, in plain torch: the definition its kernel must equal.

The reference is BatchNorm as torch computes it followed by the LIF reference (so on the torch backend the fused
op gives exactly the unfused layers' values). The kernel instead folds normalize + affine into one float32 scale
and shift per channel (`stats`, `affine`) applied in registers: the same values up to float rounding.
"""

from __future__ import annotations

import torch

from ems_yolo.nn.ops.lif import reference as lif_reference


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, time_steps: int, tau: float,
            vth: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spikes like x, uint8 code like x, batch mean, batch 1/sqrt(var + eps)) of the LIF fed BatchNorm(x),
    `x` being `[T*B, C, H, W]`."""
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    spikes, code = lif_reference.forward(y.view(time_steps, -1, *y.shape[1:]), tau, vth, alpha)
    return spikes.flatten(0, 1), code.flatten(0, 1), mean, invstd


def stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (mean, 1 / sqrt(biased var + eps)) per channel of `[N, C, H, W]`, as BatchNorm's training step."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)  # one pass, float32 from half inputs too
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps)


def affine(mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Float32 per-channel (scale, shift) with x * scale + shift the BatchNorm output."""
    scale = weight.float() * invstd
    return scale, bias.float() - mean * scale
