"""Basic spiking layers: threshold-dependent BatchNorm, the encoding layer and the LIF-Conv-BN unit (LCB).

All of them work on time-folded tensors `[T*B, C, H, W]`; only the encoding layer sees a 4-D model input and
expands it to T steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class SpikeConvFunction(torch.autograd.Function):
    """Convolution of binary spikes that saves its input for backward as bool (1 byte instead of 2-4).

    Backward is the regular convolution backward on the restored spikes; under autocast it runs in the dtype the
    forward ran in.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple, padding: tuple) -> torch.Tensor:
        out = F.conv2d(x, weight, None, stride, padding)
        ctx.save_for_backward(x.to(torch.bool), weight)
        ctx.conf = (stride, padding, x.dtype, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        spikes, weight = ctx.saved_tensors
        stride, padding, x_dtype, dtype = ctx.conf
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.to(dtype), spikes.to(dtype), weight.to(dtype), None, stride, padding, (1, 1), False, (0, 0), 1,
            (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False),
        )
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
        )


class SpikeConv2d(nn.Conv2d):
    """Bias-free conv whose input is binary spikes: trains through `SpikeConvFunction` (compact saved input),
    infers as a plain conv (traceable)."""

    spike_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training and torch.is_grad_enabled():
            return SpikeConvFunction.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


def spike_conv(c1: int, c2: int, k: int = 1, s: int = 1, spike_input: bool = True) -> nn.Conv2d:
    """Bias-free 'same' conv tagged with whether it reads binary spikes (drives the energy model).

    Spike-fed convs are `SpikeConv2d`; the others (real-valued input, or every conv of an ANN twin) are plain.
    """
    conv = (SpikeConv2d if spike_input else nn.Conv2d)(c1, c2, k, s, k // 2, bias=False)
    conv.spike_input = spike_input
    return conv


class MaxPool(nn.MaxPool2d):
    """s x s max-pool with stride s. Without autograd, 2 x 2 pooling is an elementwise max of the four strided
    views: the same values, several times faster on CPU than `max_pool2d` (which also computes indices)."""

    def __init__(self, s: int):
        super().__init__(s, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.kernel_size != 2 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        return torch.maximum(
            torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
            torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]),
        )


def max_pool(s: int) -> nn.Module:
    """s x s max-pool with stride s, or identity for s = 1."""
    return MaxPool(s) if s > 1 else nn.Identity()


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
        self.conv = spike_conv(c1, c2, k, s, spike_input=neuron.kind == "lif")
        self.bn = TDBatchNorm2d(c2, alpha, neuron.vth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn(self.conv(self.lif(x)))
