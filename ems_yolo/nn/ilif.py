"""The integer LIF neuron (I-LIF) of SpikeYOLO (Luo et al., ECCV 2024) on time-folded tensors.

u_1 = I_1;  u_t = (u_{t-1} - sg(s_{t-1})) * tau + I_t;  s_t = round(clip(u_t, 0, D))
with torch's round-half-to-even, D = `levels`, tau = 0.25 in SpikeYOLO's COCO models. Spikes are integers 0..D; the
gradient passes straight through where 0 <= u_t <= D and is zero outside. The soft reset subtracts the detached spike
(the arithmetic order above is SpikeYOLO's `mem_update`, so float32 outputs round the same way).
"""

from __future__ import annotations

import torch
from torch import nn

from ems_yolo.nn.neuron import tracing, unfold_time


def ilif_forward(currents: torch.Tensor, levels: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer spikes of `[T, B, ...]` currents, and the straight-through window (bool, 0 <= u <= D) per step."""
    spikes = torch.empty_like(currents)
    window = torch.empty_like(currents, dtype=torch.bool)
    u = currents[0].clone()
    for t in range(currents.shape[0]):
        if t:
            u.sub_(spikes[t - 1]).mul_(tau).add_(currents[t])
        torch.round(torch.clamp(u, 0, levels), out=spikes[t])
        torch.logical_and(u >= 0, u <= levels, out=window[t])
    return spikes, window


def ilif_backward(grad_spikes: torch.Tensor, window: torch.Tensor, tau: float) -> torch.Tensor:
    """dL/dI from dL/ds: dL/du_t = dL/ds_t * [0 <= u_t <= D] + tau * dL/du_{t+1} (the reset is detached)."""
    grad = torch.empty_like(grad_spikes)
    for t in reversed(range(grad_spikes.shape[0])):
        torch.mul(grad_spikes[t], window[t], out=grad[t])
        if t + 1 < grad_spikes.shape[0]:
            grad[t].add_(grad[t + 1], alpha=tau)
    return grad


class MultiStepILIF(torch.autograd.Function):
    """The I-LIF recurrence over all T steps as one autograd node; backward keeps one bool per neuron and step."""

    @staticmethod
    def forward(ctx, currents: torch.Tensor, levels: int, tau: float) -> torch.Tensor:
        spikes, window = ilif_forward(currents, levels, tau)
        ctx.save_for_backward(window)
        ctx.tau = tau
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (window,) = ctx.saved_tensors
        return ilif_backward(grad_spikes, window, ctx.tau), None, None


class ILIF(nn.Module):
    """Integer-valued LIF of SpikeYOLO: spikes 0..`levels` (D), soft reset by the detached spike, decay `tau`."""

    def __init__(self, time_steps: int = 1, levels: int = 4, tau: float = 0.25):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels: expected a positive integer, got {levels!r}")
        self.time_steps = time_steps
        self.levels = levels
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map input currents `[T*B, ...]` to integer spikes of the same shape."""
        currents = unfold_time(x, self.time_steps)
        if torch.is_grad_enabled() and not tracing():
            return MultiStepILIF.apply(currents, self.levels, self.tau).flatten(0, 1)
        if not tracing():
            return ilif_forward(currents, self.levels, self.tau)[0].flatten(0, 1)
        u = currents[0]
        s = torch.round(torch.clamp(u, 0, self.levels))
        spikes = [s]
        for t in range(1, self.time_steps):
            u = (u - s) * self.tau + currents[t]
            s = torch.round(torch.clamp(u, 0, self.levels))
            spikes.append(s)
        return torch.stack(spikes).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, levels={self.levels}, tau={self.tau}"
