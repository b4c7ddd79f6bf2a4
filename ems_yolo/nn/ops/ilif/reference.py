"""The multi-step I-LIF (integer spikes, straight-through gradient) in plain torch: the definition its kernels must
equal.

Two charges (`charge`), both with the soft reset by the detached spike, v = u_{t-1} - s_{t-1} (v = 0 before step 0):
- "leak" (SpikeYOLO's COCO `mem_update`): u_t = v * tau + I_t, so u_0 = I_0;
- "gen1" (SpikingJelly's `MultiStepLIFNode(tau=2, v_reset=None)` of SpikeYOLO_for_Gen1, decay_input):
  u_t = v + (I_t - v) * (1 - tau), tau = 0.5 there.
Spikes s_t = round(clip(u_t, 0, D)) (round half to even); the backward keeps one byte per neuron and step, the
straight-through window [0 <= u_t <= D]. Currents are `[T, ...]`; the membrane is updated in place per step.
"""

from __future__ import annotations

import torch

CHARGES = ("leak", "gen1")


def forward(currents: torch.Tensor, levels: int, tau: float, charge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer spikes in the currents' dtype, uint8 window) of the I-LIF recurrence above."""
    spikes = torch.empty_like(currents)
    window = torch.empty_like(currents, dtype=torch.uint8)
    u = torch.zeros_like(currents[0])  # v, then u, updated in place
    gain = 1 - tau
    for t in range(currents.shape[0]):
        if t:
            u.sub_(spikes[t - 1])
        if charge == "gen1":
            u.add_((currents[t] - u).mul_(gain))
        elif t:
            u.mul_(tau).add_(currents[t])
        else:
            u.copy_(currents[t])
        torch.round(torch.clamp(u, 0, levels), out=spikes[t])
        torch.logical_and(u >= 0, u <= levels, out=window[t].view(torch.bool))
    return spikes, window


def backward(grad_spikes: torch.Tensor, window: torch.Tensor, tau: float, charge: str) -> torch.Tensor:
    """dL/dI from dL/ds: dL/du_t = dL/ds_t * window_t + tau * dL/du_{t+1} (the reset is detached), and
    dL/dI_t = dL/du_t ("leak") or (1 - tau) * dL/du_t ("gen1"); in window's layout."""
    grad = torch.empty_like(window, dtype=grad_spikes.dtype)
    T = grad_spikes.shape[0]
    for t in reversed(range(T)):
        torch.mul(grad_spikes[t], window[t], out=grad[t])
        if t + 1 < T:
            grad[t].add_(grad[t + 1], alpha=tau)
    return grad.mul_(1 - tau) if charge == "gen1" else grad
