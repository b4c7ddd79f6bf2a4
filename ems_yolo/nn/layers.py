"""Basic spiking layers: threshold-dependent BatchNorm, the encoding layer and the LIF-Conv-BN unit (LCB).

All of them work on time-folded tensors `[T*B, C, H, W]`; only the encoding layer sees a 4-D model input and
expands it to T steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ems_yolo.nn.neuron import (
    LIF,
    NeuronConfig,
    check_backend,
    lif_backward,
    lif_forward,
    make_neuron,
    spikes_from_state,
    tracing,
    unfold_time,
)
from ems_yolo.nn.ops import bn_lif as bn_lif_ops
from ems_yolo.nn.ops import lif as lif_ops
from ems_yolo.nn.ops import max_pool2
from ems_yolo.nn.ops import runtime


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if a 4-D tensor is laid out that way, else contiguous (what `torch.empty` should use to give a
    gradient the layout of its activation: BatchNorm's CPU backward is several times slower on mixed layouts)."""
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else (
        torch.contiguous_format)


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over all processes; the gradient is summed likewise (every process's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class TDBatchNorm2d(nn.BatchNorm2d):
    """tdBN (Zheng et al. 2021): BatchNorm over (T, B, H, W) jointly with gamma initialised to alpha * V_th.

    On the folded tensor this is plain BatchNorm2d. Being a subclass, Ultralytics' `initialize_weights` (which
    rewrites eps/momentum of exact `nn.BatchNorm2d` instances) leaves it at eps 1e-5 / momentum 0.1.
    With `sync = True` (the model YAML's `sync_bn: true`) and a process group of several processes, training
    batches are normalised with the statistics of every process's batch together (on CPU/gloo too, where
    `nn.SyncBatchNorm` does not run); otherwise it is the plain layer.
    """

    sync = False

    def __init__(self, num_features: int, alpha: float = 1.0, vth: float = 0.5):
        self.alpha, self.vth = alpha, vth  # read by reset_parameters() during the base __init__
        super().__init__(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.sync and self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return self._synced(x)
        return super().forward(x)

    def _synced(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics summed over all processes (an autograd-aware all-reduce, so gradients flow to every
        process's inputs as in one large batch); running statistics updated as BatchNorm2d does."""
        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), x.numel() // c)
        stats = _AllReduceSum.apply(torch.cat((xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count)))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale.view(1, c, 1, 1).to(x.dtype) + shift.view(1, c, 1, 1).to(x.dtype)

    def fusable(self) -> bool:
        """Whether a following LIF may apply this layer itself (`ems_yolo::bn_lif_forward`): training with batch
        statistics, not synced over processes, no hooks to honour."""
        synced = self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return (self.training and self.track_running_stats and self.affine and not synced
                and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks))

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, invstd: torch.Tensor, count: int) -> None:
        """Running statistics updated from a training batch's (mean, 1/sqrt(var + eps)) over `count` values per
        channel, as BatchNorm2d's forward does (unbiased variance, momentum or a cumulative average)."""
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
        var = invstd.pow(-2) - self.eps
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / max(count - 1, 1))).to(self.running_var.dtype), factor)

    def reset_parameters(self) -> None:  # noqa: D102
        super().reset_parameters()
        nn.init.constant_(self.weight, self.alpha * self.vth)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, vth={self.vth}"


def conv_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a bias-free conv for input `x` restored from compact storage, in the dtype the forward ran in
    (that of `grad`, e.g. under autocast); the weight gradient in the weight's dtype. ctx carries stride/padding."""
    dtype = grad.dtype
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x.to(dtype), weight.to(dtype), None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), 1,
        (need_x, need_w, False),
    )
    return grad_x, None if grad_w is None else grad_w.to(weight.dtype)


class SpikeConvFunction(torch.autograd.Function):
    """Convolution of binary spikes that saves its input for backward as bool (1 byte instead of 2-4)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple, padding: tuple) -> torch.Tensor:
        out = F.conv2d(x, weight, None, stride, padding)
        ctx.save_for_backward(x.to(torch.bool), weight)
        ctx.stride, ctx.padding, ctx.x_dtype = stride, padding, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        spikes, weight = ctx.saved_tensors
        grad_x, grad_w = conv_backward(ctx, grad, spikes, weight, *ctx.needs_input_grad[:2])
        return None if grad_x is None else grad_x.to(ctx.x_dtype), grad_w, None, None


class LIFConvFunction(torch.autograd.Function):
    """LIF then bias-free conv as one node: the conv's input spikes are rebuilt in backward from the LIF's own
    saved state, so the pair keeps one byte per spike (rectangular surrogate) instead of a second copy."""

    @staticmethod
    def forward(ctx, currents: torch.Tensor, weight: torch.Tensor, lif: LIF, stride: tuple, padding: tuple):
        spikes, state = lif_forward(unfold_time(currents, lif.time_steps), lif)
        out = F.conv2d(spikes.flatten(0, 1), weight, None, stride, padding)
        ctx.save_for_backward(weight, *state)
        ctx.stride, ctx.padding, ctx.dtype, ctx.lif = stride, padding, currents.dtype, lif
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, *state = ctx.saved_tensors
        spikes = spikes_from_state(state, grad.dtype, ctx.lif).flatten(0, 1)
        grad_spikes, grad_w = conv_backward(ctx, grad, spikes, weight, *ctx.needs_input_grad[:2])
        grad_currents = None
        if grad_spikes is not None:
            grad_spikes = unfold_time(grad_spikes.to(ctx.dtype), ctx.lif.time_steps)
            grad_currents = lif_backward(grad_spikes, state, ctx.lif).flatten(0, 1)
        return grad_currents, grad_w, None, None, None


class BNLIFConvFunction(torch.autograd.Function):
    """tdBN (training) -> LIF -> bias-free conv as one node: the BatchNorm output is never written (the LIF kernel
    normalizes its input itself) and the conv's input spikes are rebuilt in backward from the LIF's 1-byte code.
    Returns the conv output and the batch (mean, 1/sqrt(var + eps)) for the running statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, weight: torch.Tensor,
                eps: float, lif: LIF, stride: tuple, padding: tuple):
        kernel = runtime.use_kernels(lif.backend, unfold_time(x, lif.time_steps))
        spikes, code, mean, invstd = bn_lif_ops.forward(
            x, bn_weight, bn_bias, eps, lif.time_steps, lif.tau, lif.vth, lif.alpha, kernel)
        out = F.conv2d(spikes, weight, None, stride, padding)
        ctx.save_for_backward(x, bn_weight, weight, code, mean, invstd)
        ctx.stride, ctx.padding, ctx.eps, ctx.lif, ctx.kernel = stride, padding, eps, lif, kernel
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean, _grad_invstd):
        x, bn_weight, weight, code, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_spikes, grad_w = conv_backward(ctx, grad, lif_ops.decode(code, grad.dtype, ctx.kernel), weight,
                                            any(needs[:3]), needs[3])
        grads = (None, None, None)
        if grad_spikes is not None:
            lif = ctx.lif
            grads = bn_lif_ops.backward(grad_spikes, x, code, bn_weight, mean, invstd, ctx.eps, lif.time_steps,
                                        lif.tau, lif.alpha, ctx.kernel, tuple(needs[:3]))
        return (*grads, grad_w, None, None, None, None)


class SpikeConv2d(nn.Conv2d):
    """Bias-free conv whose input is binary spikes: trains through `SpikeConvFunction` (compact saved input),
    infers as a plain conv (traceable)."""

    spike_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training and torch.is_grad_enabled():
            return SpikeConvFunction.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


def spike_conv(c1: int, c2: int, k: int = 1, s: int = 1, spike_input: bool = True, binary: bool = True) -> nn.Conv2d:
    """Bias-free 'same' conv tagged with whether it reads spikes (drives the energy model).

    Convs fed binary spikes are `SpikeConv2d` (compact saved input); those fed integer spikes (an I-LIF,
    `binary=False`) are plain convs tagged as spike-fed; the others (real-valued input, or every conv of an ANN
    twin) are plain.
    """
    conv = (SpikeConv2d if spike_input and binary else nn.Conv2d)(c1, c2, k, s, k // 2, bias=False)
    conv.spike_input = spike_input
    return conv


def conv_bn(c1: int, c2: int, k: int, s: int, alpha: float, neuron: NeuronConfig, spike_input: bool) -> tuple[
        nn.Conv2d, TDBatchNorm2d]:
    """`spike_conv` (binary spikes when the neuron is a LIF) and the tdBN(alpha, the neuron's V_th) after it: every
    conv of the model is such a pair."""
    return spike_conv(c1, c2, k, s, spike_input, binary=neuron.kind == "lif"), TDBatchNorm2d(c2, alpha, neuron.vth)


class MaxPoolFunction(torch.autograd.Function):
    """s x s max-pool (stride s) that saves only its argmax indices, as int32.

    `max_pool2d`'s autograd node keeps its whole input and int64 indices (4 * s^2 + 8 bytes per output in float32);
    backward needs only the indices, and a plane index always fits in 32 bits (4 bytes per output).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, [s, s], [s, s])
        ctx.save_for_backward(indices.to(torch.int32))
        ctx.s, ctx.shape, ctx.format = s, x.shape, memory_format(x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        s = ctx.s
        # the input argument only gives the gradient's shape and layout: its values are never read
        like = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, like, [s, s], [s, s], [0, 0], [1, 1], False, indices.long()
        )
        return grad_x, None


class MaxPool(nn.MaxPool2d):
    """s x s max-pool with stride s, the same values as `max_pool2d`. With autograd it runs `MaxPoolFunction`
    (int32 indices are all it saves), or for s = 2 where the Triton kernels run (`backend`, as the LIF's) the op
    `ems_yolo::max_pool2_forward` (a 1-byte argmax); in eager inference the element-wise maximum of the s * s
    strided views of the input, up to 9x faster on CPU (no indices); traced or exported, `max_pool2d`."""

    backend = "auto"

    def __init__(self, s: int, backend: str = "auto"):
        super().__init__(s, s)
        if backend != "auto":
            check_backend(backend)
            self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = self.kernel_size
        if torch.is_grad_enabled() and x.requires_grad:
            if s == 2 and runtime.use_kernels(self.backend, x, steps=False):
                return max_pool2.forward(x, True)
            return MaxPoolFunction.apply(x, s)
        if tracing():
            return super().forward(x)
        h, w = x.shape[-2] // s * s, x.shape[-1] // s * s
        out = x[..., 0:h:s, 0:w:s]
        for i in range(s):
            for j in range(s):
                if i or j:
                    out = torch.maximum(out, x[..., i:h:s, j:w:s])
        return out


def max_pool(s: int, backend: str = "auto") -> nn.Module:
    """s x s max-pool with stride s, or identity for s = 1."""
    return MaxPool(s, backend) if s > 1 else nn.Identity()


class EncodingConv(nn.Module):
    """The only layer fed analog input: Conv + tdBN (no activation) that expands the input to T steps.

    frames: input `[B, C, H, W]`, the same image at every step, so conv + BN run once and the result is tiled T
    times (identical to per-step evaluation). events: input `[B, T*C, H, W]` with time-major channels
    (channel t*C + c), split into `[T*B, C, H, W]` so step t sees bin t.

    The encoded tensor is channels_last, and every later layer keeps that layout: convolutions and BatchNorm run
    about 25% and 3x faster that way on CPU (oneDNN), and strided pooling views stay vectorised.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2, time_steps: int = 1,
                 neuron: NeuronConfig | None = None, input_kind: str = "frames"):
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
        self.conv, self.bn = conv_bn(step_channels, c2, k, s, 1.0, neuron or NeuronConfig(), spike_input=False)

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
            y = self.bn(self.conv(x.contiguous(memory_format=torch.channels_last)))
            return torch.cat([y] * T) if T > 1 else y
        b, _, h, w = x.shape
        steps = x.view(b, T, -1, h, w).transpose(0, 1).reshape(T * b, -1, h, w)
        return self.bn(self.conv(steps.contiguous(memory_format=torch.channels_last)))


class LCB(nn.Module):
    """LIF -> Conv k x k (stride s) -> tdBN(alpha): the paper's basic unit; its conv always reads spikes."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, alpha: float = 1.0, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__()
        neuron = neuron or NeuronConfig()
        self.lif = make_neuron(neuron, time_steps)
        self.conv, self.bn = conv_bn(c1, c2, k, s, alpha, neuron, spike_input=neuron.kind != "relu")

    fuse_bn = True  # apply the previous LCB's tdBN inside this LIF in training (`configure_kernels`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn(self.pre_bn(x))

    def pre_bn(self, x: torch.Tensor) -> torch.Tensor:
        """LIF -> conv, the unit without its tdBN."""
        if self._fused():
            return LIFConvFunction.apply(x, self.conv.weight, self.lif, self.conv.stride, self.conv.padding)
        return self.conv(self.lif(x))

    def fuses(self, bn: nn.Module) -> bool:
        """Whether this unit applies `bn` (the tdBN that feeds its LIF) inside its LIF kernel."""
        return (self.fuse_bn and self._fused() and self.lif.rectangular and type(bn) is TDBatchNorm2d
                and bn.fusable())

    def pre_bn_after(self, x: torch.Tensor, bn: TDBatchNorm2d) -> torch.Tensor:
        """`pre_bn(bn(x))` as one `BNLIFConvFunction` node (see `fuses`); updates bn's running statistics."""
        conv = self.conv
        out, mean, invstd = BNLIFConvFunction.apply(x, bn.weight, bn.bias, conv.weight, bn.eps, self.lif,
                                                    conv.stride, conv.padding)
        bn.update_running_stats(mean, invstd, x.numel() // x.shape[1])
        return out

    def _fused(self) -> bool:
        """Train LIF + conv as one `LIFConvFunction` node: detached-reset LIF, spike conv, no hooks to honour."""
        lif, conv = self.lif, self.conv
        return (
            self.training
            and torch.is_grad_enabled()
            and isinstance(lif, LIF)
            and lif.detach_reset
            and isinstance(conv, SpikeConv2d)
            and not (lif._forward_hooks or lif._forward_pre_hooks or conv._forward_hooks or conv._forward_pre_hooks)
        )


def lcb_chain(units: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a Sequential of LCBs; in training, each tdBN that feeds the next LCB's LIF is applied inside that LIF
    (`LCB.pre_bn_after`), so its output is never written. Same values as `units(x)`."""
    if units._forward_hooks or units._forward_pre_hooks or not all(isinstance(m, LCB) for m in units):
        return units(x)
    bn = None  # the tdBN still to apply to x
    for unit in units:
        if bn is None:
            x = unit.pre_bn(x)
        elif unit.fuses(bn):
            x = unit.pre_bn_after(x, bn)
        else:
            x = unit.pre_bn(bn(x))
        bn = unit.bn
    return bn(x)


def configure_kernels(model: nn.Module, backend: str | None = None, fuse_bn: bool | None = None) -> nn.Module:
    """Set the kernel backend ('auto', 'torch', 'triton') of every LIF and max-pool and/or whether LCBs fuse the
    tdBN that feeds them (benchmarks compare the paths on one model); returns the model."""
    if backend is not None:
        check_backend(backend)
    for m in model.modules():
        if backend is not None and isinstance(m, (LIF, MaxPool)):
            m.backend = backend
        if fuse_bn is not None and isinstance(m, LCB):
            m.fuse_bn = fuse_bn
    return model
