"""Naive EMS-YOLO forward pass, computed the way the original EMS-YOLO code does it (benchmark baseline only).

The original (BICLab/EMS-YOLO) keeps a 5-D tensor `[T, B, C, H, W]` between layers and wraps every stateless
layer in a Python loop over T that fills a freshly zero-filled output buffer step by step (model-spec §10 row 5):

* conv, max-pool and upsample: `out = torch.zeros(T, B, ...)`, then `out[t] = layer(x[t])` for every t;
* tdBN: BatchNorm3d on the transposed, contiguous `[B, C, T, H, W]` copy (statistics over T, B, H, W jointly);
* LIF: membrane in Python variables (`mem_old = mem.clone()` after each step), spikes from the surrogate autograd
  function at every step (also in eval), written into a zero-filled buffer;
* frames: the image is copied into a `[T, B, C, H, W]` buffer and the encoding conv runs at every step;
* head: the detection conv runs at every step, the raw logits are averaged over T.

`NaiveEMS(model)` shares the parameters and buffers of an `EMSDetectionModel` (it holds the model itself and reads
its layers' weights), so both compute the same function; outputs and gradients agree up to float rounding. As
in the original, the conv buffers take the parameters' dtype (float32 outputs even under AMP autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Concat

from ems_yolo.nn.blocks import EMSBlock1, EMSBlock2, MSBlock
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import LCB, EncodingConv
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.neuron import LIF

# What a layer returns: a `[T, B, C, H, W]` tensor, or the head's output (raw list; decoded, or (decoded, raw))
Output = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]


def naive_lif(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """Per-step LIF on `[T, B, ...]` in the original style (surrogate function at every step, even in eval)."""
    out = torch.zeros_like(x)
    spike = torch.zeros_like(x[0])
    mem_old = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        if t == 0:
            mem = x[0]
        else:
            keep = 1 - (spike.detach() if lif.detach_reset else spike)
            mem = mem_old * lif.tau * keep + x[t]
        spike = lif._spike_fn.apply(mem - lif.vth, lif.alpha)
        mem_old = mem.clone()
        out[t] = spike
    return out


def naive_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv applied step by step into a zero-filled `[T, B, C_out, H_out, W_out]` buffer."""
    T, B, _, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    h, w = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out = torch.zeros(T, B, conv.out_channels, h, w, device=x.device, dtype=conv.weight.dtype)
    for t in range(T):
        out[t] = F.conv2d(x[t], conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out


def naive_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """tdBN as the original: BatchNorm3d on `[B, C, T, H, W]` (transposed copies in and out)."""
    y = x.transpose(0, 2).contiguous().transpose(0, 1).contiguous()  # [T,B,C,H,W] -> [C,B,T,..] -> [B,C,T,H,W]
    if bn.training:
        bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, momentum, bn.eps)
    return y.contiguous().transpose(0, 1).contiguous().transpose(0, 2)


def naive_pool(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """s x s max-pool (stride s, no padding) applied step by step into a zero-filled buffer."""
    T, B, C, H, W = x.shape
    out = torch.zeros(T, B, C, H // pool.stride, W // pool.stride, device=x.device, dtype=x.dtype)
    for t in range(T):
        out[t] = F.max_pool2d(x[t], pool.kernel_size, pool.stride)
    return out


def naive_upsample(up: nn.Upsample, x: torch.Tensor) -> torch.Tensor:
    """Integer-factor upsampling applied step by step into a zero-filled buffer."""
    T, B, C, H, W = x.shape
    s = int(up.scale_factor)
    out = torch.zeros(T, B, C, H * s, W * s, device=x.device, dtype=x.dtype)
    for t in range(T):
        out[t] = up(x[t])
    return out


class NaiveEMS(nn.Module):
    """The EMS-YOLO forward pass with per-step loops around every layer, sharing `model`'s parameters.

    Train mode returns the per-level raw logits `[B, na, H, W, nc + 5]`; eval mode returns what the model
    returns (`(decoded, raw)`, or `decoded` alone when the head's `export` flag is set).
    """

    def __init__(self, model: EMSDetectionModel):
        super().__init__()
        self.model = model
        self.time_steps = model.time_steps

    def forward(self, x: torch.Tensor) -> Output:
        """Run the layer graph of `model.model` (Ultralytics `_predict_once` routing) on 4-D input `[B, C, H, W]`."""
        y: list[torch.Tensor | None] = []
        for m in self.model.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = self.layer(m, x)
            y.append(x if m.i in self.model.save else None)
        return x

    def layer(self, m: nn.Module, x: torch.Tensor | list[torch.Tensor]) -> Output:
        """Apply one module to `[T, B, C, H, W]` input (a list for Concat / the head) the per-step way."""
        if isinstance(m, EncodingConv):
            return self.encode(m, x)
        if isinstance(m, LIF):
            return naive_lif(m, x)
        if isinstance(m, nn.Conv2d):
            return naive_conv(m, x)
        if isinstance(m, nn.BatchNorm2d):
            return naive_bn(m, x)
        if isinstance(m, nn.MaxPool2d) and m.kernel_size == m.stride and not m.padding:
            return naive_pool(m, x)
        if isinstance(m, nn.Upsample) and m.size is None and float(m.scale_factor).is_integer():
            return naive_upsample(m, x)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, LCB):
            return self.layer(m.bn, self.layer(m.conv, self.layer(m.lif, x)))
        if isinstance(m, nn.Sequential):
            for sub in m:
                x = self.layer(sub, x)
            return x
        if isinstance(m, (EMSBlock1, MSBlock)):
            return self.layer(m.residual, x) + self.layer(m.shortcut, x)
        if isinstance(m, EMSBlock2):
            return self.layer(m.residual, x) + self.ems2_shortcut(m, x)
        if isinstance(m, Concat):
            return torch.cat(x, m.d + 1 if m.d >= 0 else m.d)
        if isinstance(m, EMSDetect):
            return self.detect(m, x)
        raise NotImplementedError(f"NaiveEMS: no per-step implementation of {type(m).__name__}")

    def encode(self, m: EncodingConv, x: torch.Tensor) -> torch.Tensor:
        """Build the `[T, B, C, H, W]` input (frame copied to every step, or event bins) and encode each step."""
        T, B = self.time_steps, x.shape[0]
        if m.input_kind == "frames":
            steps = torch.zeros(T, *x.shape, device=x.device, dtype=x.dtype)
            for t in range(T):
                steps[t] = x
        else:
            steps = x.view(B, T, -1, *x.shape[2:]).transpose(0, 1)
        return naive_bn(m.bn, naive_conv(m.conv, steps))

    def ems2_shortcut(self, m: EMSBlock2, x: torch.Tensor) -> torch.Tensor:
        """EMS-Block2 concat shortcut in the block's pooling order (channel axis 2 in the 5-D layout)."""
        if m.new is None:
            return self.layer(m.pool, x)
        if m.pool_order == "last":
            return self.layer(m.pool, torch.cat((self.layer(m.new, x), x), 2))
        x = self.layer(m.pool, x)
        return torch.cat((self.layer(m.new, x), x), 2)

    def detect(self, head: EMSDetect, xs: list[torch.Tensor]) -> Output:
        """Detection conv at every step, raw logits averaged over T, then the model's own YOLOv5 decoding."""
        raw = []
        for x, conv in zip(xs, head.m):
            p = naive_conv(conv, x).mean(0)
            b, _, h, w = p.shape
            raw.append(p.view(b, head.na, head.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        if head.training:
            return raw
        y = head.decode(raw)
        return y if head.export else (y, raw)
