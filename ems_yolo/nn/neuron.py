"""Multi-step neurons on time-folded tensors.

Every stateless layer runs on `[T*B, C, H, W]` (time-major: row t*B + b). A neuron views that tensor as
`[T, B, ...]`, runs its recurrence over T inside `forward` and folds the result back. No membrane state outlives
a call, so deep copies (EMA, validator, export) need no reset hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ems_yolo.nn.surrogate import DEFAULT_ALPHA, Rectangle, get_surrogate


@dataclass(frozen=True)
class NeuronConfig:
    """Neuron settings shared by every spiking layer of a model (the `neuron:` section of a model YAML).

    kind: "lif" (the paper's neuron) or "relu" (the ANN twin, used with time_steps=1).
    """

    kind: str = "lif"
    tau: float = 0.25
    vth: float = 0.5
    surrogate: str = "rectangle"
    alpha: float | None = None
    detach_reset: bool = True

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "neuron") -> NeuronConfig:
        """Build from a YAML mapping, rejecting unknown keys with the list of valid ones."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}, expected some of {sorted(known)}")
        cfg = cls(**d)
        if cfg.kind not in ("lif", "relu"):
            raise ValueError(f"{where}.kind: expected 'lif' or 'relu', got {cfg.kind!r}")
        get_surrogate(cfg.surrogate)  # validates the name
        return cfg


def unfold_time(x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """View `[T*B, ...]` as `[T, B, ...]` (batch stays dynamic in traced graphs)."""
    return x.view(time_steps, -1, *x.shape[1:])


class MultiStepLIF(torch.autograd.Function):
    """The LIF recurrence over all T steps as one autograd node, with a hand-written backward.

    With the reset detached, dL/du_t = dL/ds_t * h(u_t) + dL/du_{t+1} * tau * (1 - s_t), so backward needs only the
    surrogate derivative h(u_t) and the spikes s_t: both are saved as bool for the rectangular surrogate (a 1-byte
    mask each instead of the several float tensors per step that the step-by-step graph keeps).
    """

    @staticmethod
    def forward(ctx, currents: torch.Tensor, tau: float, vth: float, alpha: float, surrogate: type) -> torch.Tensor:
        rect = surrogate is Rectangle
        spikes = torch.empty_like(currents)
        deriv = torch.empty(currents.shape, dtype=torch.bool if rect else currents.dtype, device=currents.device)
        u = currents[0]
        for t in range(currents.shape[0]):
            if t:
                u = tau * u * (1 - spikes[t - 1]) + currents[t]
            x = u - vth
            spikes[t] = x > 0
            deriv[t] = x.abs() < alpha / 2 if rect else surrogate.derivative(x, alpha)
        ctx.save_for_backward(deriv, spikes.bool())
        ctx.tau, ctx.scale = tau, (1 / alpha if rect else 1.0)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        deriv, spikes = ctx.saved_tensors
        grad = torch.empty_like(grad_spikes)
        carry = None
        for t in reversed(range(grad_spikes.shape[0])):
            g = grad_spikes[t] * deriv[t] * ctx.scale
            if carry is not None:
                g = g + carry * ctx.tau * (~spikes[t])
            grad[t] = carry = g
        return grad, None, None, None, None


class LIF(nn.Module):
    """Leaky integrate-and-fire neuron of EMS-YOLO (model-spec §2).

    u_t = tau * u_{t-1} * (1 - sg(s_{t-1})) + I_t,  s_t = [u_t > V_th].  Hard multiplicative reset through the
    detached previous spike; full BPTT through the membrane. The surrogate gradient is used only in training, the
    eval path is a plain comparison so it can be traced and exported.
    """

    def __init__(
        self,
        time_steps: int = 1,
        tau: float = 0.25,
        vth: float = 0.5,
        surrogate: str = "rectangle",
        alpha: float | None = None,
        detach_reset: bool = True,
    ):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        self._spike_fn = get_surrogate(surrogate)
        self.time_steps = time_steps
        self.tau = tau
        self.vth = vth
        self.surrogate = surrogate
        self.alpha = DEFAULT_ALPHA[surrogate.lower()] if alpha is None else alpha
        self.detach_reset = detach_reset

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        """Spike where the membrane exceeds the threshold (strict `>` in both paths)."""
        if self.training and torch.is_grad_enabled():
            return self._spike_fn.apply(u - self.vth, self.alpha)
        return (u > self.vth).to(u.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map input currents `[T*B, ...]` to binary spikes of the same shape.

        Training with the default detached reset runs the fused `MultiStepLIF`; inference (and the non-detached
        variant) runs the plain per-step loop, which traces and exports.
        """
        currents = unfold_time(x, self.time_steps)
        if self.training and self.detach_reset and torch.is_grad_enabled():
            return MultiStepLIF.apply(currents, self.tau, self.vth, self.alpha, self._spike_fn).flatten(0, 1)
        u = currents[0]
        s = self.fire(u)
        spikes = [s]
        for t in range(1, self.time_steps):
            keep = 1 - (s.detach() if self.detach_reset else s)
            u = self.tau * u * keep + currents[t]
            s = self.fire(u)
            spikes.append(s)
        return torch.stack(spikes).flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"time_steps={self.time_steps}, tau={self.tau}, vth={self.vth}, surrogate={self.surrogate}, "
            f"alpha={self.alpha}, detach_reset={self.detach_reset}"
        )


class SiLUNeuron(nn.Module):
    """Non-spiking pseudo-neuron of the original COCO configs: the LIF recurrence with SiLU in place of the step.

    Its output is real-valued, so it is never counted as a spiking layer (model-spec §2.4).
    """

    def __init__(self, time_steps: int = 1, tau: float = 0.25):
        super().__init__()
        self.time_steps = time_steps
        self.tau = tau
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map currents `[T*B, ...]` to SiLU outputs of the same shape."""
        currents = unfold_time(x, self.time_steps)
        u = currents[0]
        o = self.act(u)
        outs = [o]
        for t in range(1, self.time_steps):
            u = self.tau * u * (1 - o.detach()) + currents[t]
            o = self.act(u)
            outs.append(o)
        return torch.stack(outs).flatten(0, 1)


def make_neuron(cfg: NeuronConfig, time_steps: int) -> nn.Module:
    """Instantiate the neuron a model's config asks for."""
    if cfg.kind == "relu":
        return nn.ReLU()
    return LIF(time_steps, cfg.tau, cfg.vth, cfg.surrogate, cfg.alpha, cfg.detach_reset)
