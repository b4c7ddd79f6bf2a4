"""Basic spiking layers: threshold-dependent BatchNorm, the encoding layer and the LIF-Conv-BN unit (LCB).

All of them work on time-folded tensors `[T*B, C, H, W]`; only the encoding layer sees a 4-D model input and
expands it to T steps.
"""

from __future__ import annotations

import torch
from torch import nn

from ems_yolo.nn.neuron import NeuronConfig, make_neuron


class TDBatchNorm2d(nn.BatchNorm2d):
    """tdBN (Zheng et al. 2021): BatchNorm over (T, B, H, W) jointly with gamma initialised to alpha * V_th.

    On the folded tensor this is plain BatchNorm2d. Being a subclass, Ultralytics' `initialize_weights` (which
    rewrites eps/momentum of exact `nn.BatchNorm2d` instances) leaves it at eps 1e-5 / momentum 0.1.
    """

    def __init__(self, num_features: int, alpha: float = 1.0, vth: float = 0.5):
        self.alpha, self.vth = alpha, vth  # read by reset_parameters() during the base __init__
        super().__init__(num_features)

    def reset_parameters(self) -> None:  # noqa: D102
        super().reset_parameters()
        nn.init.constant_(self.weight, self.alpha * self.vth)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, vth={self.vth}"


def spike_conv(c1: int, c2: int, k: int = 1, s: int = 1, spike_input: bool = True) -> nn.Conv2d:
    """Bias-free 'same' conv tagged with whether it reads binary spikes (drives the energy model)."""
    conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
    conv.spike_input = spike_input
    return conv


def max_pool(s: int) -> nn.Module:
    """s x s max-pool with stride s, or identity for s = 1."""
    return nn.MaxPool2d(s, s) if s > 1 else nn.Identity()


class EncodingConv(nn.Module):
    """The only layer fed analog input: Conv + tdBN (no activation) that expands the input to T steps.

    frames: input `[B, C, H, W]`, the same image at every step, so conv + BN run once and the result is tiled T
    times (identical to per-step evaluation). events: input `[B, T*C, H, W]` with time-major channels
    (channel t*C + c), split into `[T*B, C, H, W]` so step t sees bin t.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 2,
        time_steps: int = 1,
        neuron: NeuronConfig | None = None,
        input_kind: str = "frames",
    ):
        super().__init__()
        if input_kind not in ("frames", "events"):
            raise ValueError(f"input must be 'frames' or 'events', got {input_kind!r}")
        if input_kind == "events" and c1 % time_steps:
            raise ValueError(
                f"event input has {c1} channels, which is not a multiple of time_steps={time_steps} "
                "(expected T*C time-major channels)"
            )
        self.time_steps, self.input_kind, self.in_channels = time_steps, input_kind, c1
        step_channels = c1 // time_steps if input_kind == "events" else c1
        vth = (neuron or NeuronConfig()).vth
        self.conv = spike_conv(step_channels, c2, k, s, spike_input=False)
        self.bn = TDBatchNorm2d(c2, 1.0, vth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode `[B, C_in, H, W]` to `[T*B, c2, H/s, W/s]`."""
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"{self.input_kind} input must be [B, {self.in_channels}, H, W], got {list(x.shape)}"
                + (f" (T={self.time_steps} bins x {self.in_channels // self.time_steps} channels)"
                   if self.input_kind == "events" else "")
            )
        T = self.time_steps
        if self.input_kind == "frames":
            y = self.bn(self.conv(x))
            return y.repeat(T, 1, 1, 1) if T > 1 else y
        b, _, h, w = x.shape
        steps = x.view(b, T, -1, h, w).transpose(0, 1).reshape(T * b, -1, h, w)
        return self.bn(self.conv(steps))


class LCB(nn.Module):
    """LIF -> Conv k x k (stride s) -> tdBN(alpha): the paper's basic unit; its conv always reads spikes."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        alpha: float = 1.0,
        time_steps: int = 1,
        neuron: NeuronConfig | None = None,
    ):
        super().__init__()
        neuron = neuron or NeuronConfig()
        self.lif = make_neuron(neuron, time_steps)
        self.conv = spike_conv(c1, c2, k, s)
        self.bn = TDBatchNorm2d(c2, alpha, neuron.vth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn(self.conv(self.lif(x)))
