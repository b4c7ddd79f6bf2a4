"""The multi-step LIF with the rectangular surrogate in plain torch: the definition its kernels must equal.

Forward returns the spikes and one uint8 code per neuron and step (bit 0 = surrogate window |u - V_th| < alpha / 2,
bit 1 = spike), all that backward needs. Currents are `[T, ...]`; the membrane is updated in place per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def membrane(currents: torch.Tensor, tau: float, vth: float) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The recurrence u_t = tau * u_{t-1} * (1 - s_{t-1}) + I_t, s_t = [u_t > vth] over `[T, ...]` currents: yields
    (t, u_t - vth, s_t) per step. Both tensors are buffers reused by the next step; the caller may overwrite the
    first (the rectangle's window does, in place)."""
    fired = torch.empty_like(currents[0], dtype=torch.bool)
    u = currents[0].clone()  # the membrane, updated in place
    x = torch.empty_like(u)
    for t in range(currents.shape[0]):
        if t:
            u.mul_(tau).mul_(~fired).add_(currents[t])  # the rounding of (tau * u) * (1 - s) + I
        torch.sub(u, vth, out=x)
        torch.gt(x, 0, out=fired)
        yield t, x, fired


def forward(currents: torch.Tensor, tau: float, vth: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spikes in the currents' dtype, uint8 code) of the `membrane` recurrence."""
    spikes = torch.empty_like(currents)
    code = torch.empty_like(currents, dtype=torch.uint8)
    window = torch.empty_like(currents[0], dtype=torch.bool)
    for t, x, fired in membrane(currents, tau, vth):
        spikes[t] = fired
        torch.lt(x.abs_(), alpha / 2, out=window)
        torch.add(window.view(torch.uint8), fired.view(torch.uint8), alpha=2, out=code[t])
    return spikes, code


def backward(grad_spikes: torch.Tensor, code: torch.Tensor, tau: float, scale: float) -> torch.Tensor:
    """dL/dI from dL/ds: dL/du_t = dL/ds_t * window_t * scale + dL/du_{t+1} * tau * (1 - s_t), in code's layout."""
    grad = torch.empty_like(code, dtype=grad_spikes.dtype)
    T = grad_spikes.shape[0]
    for t in reversed(range(T)):
        torch.mul(grad_spikes[t], code[t] & 1, out=grad[t])
        if scale != 1.0:
            grad[t].mul_(scale)
        if t + 1 < T:
            grad[t].addcmul_(grad[t + 1], code[t] < 2, value=tau)
    return grad


def decode(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spikes (bit 1 of the code) in `dtype`."""
    return (code >> 1).to(dtype)
