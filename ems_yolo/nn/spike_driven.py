"""Spike-driven inference: an I-LIF model (integer spikes 0..D at T steps) rewritten, exactly, as a binary-spike model
(0/1 spikes at T x D sub-steps) in which every spike-fed conv does additions only (SpikeYOLO's claim, Luo et al.
ECCV 2024, which its code leaves out).

Layout: every tensor after the encoding layer is time-folded over T x D sub-steps, `[T*D*B, ...]` (row
(t*D + d)*B + b), and a current's D sub-steps sum to the integer model's current at step t. Then
- each I-LIF becomes a `ThermometerILIF`: it sums its D sub-step inputs, fires the integer spike s_t as the I-LIF
  does, and emits the thermometer code of s_t, D binary sub-spikes [s_t > d] (the first s_t are ones);
- every affine layer after the encoding layer (conv, BatchNorm in inference form, BNAndPad's border) runs per
  sub-step with its bias divided by D (SpikeYOLO issue #73): sum_d (W x_d + b / D) = W x + b;
- the encoding layer (the last layer before the first neuron) sees the real input at T steps; its current is placed
  at sub-step 0 (`SubStepScatter`);
- non-linear layers on currents (max-pools, SiLU) run on the summed current and place it at sub-step 0
  (`SubStepGather`); a max-pool of spikes would commute with the thermometer code, but the models here pool currents;
- SpikeYOLO's re-parameterisable chains (RepConv, SepRepConv: 1x1 -> BN with border -> k x k ...) become the one
  k x k conv they equal, so each reads the spikes directly;
- the head's per-step output convs take D x their weights at T x D sub-steps, so the head's mean over sub-steps is
  the integer model's mean over steps.
The result is an inference model (BatchNorm must use its running statistics); `to_spike_driven` checks its outputs
need no more than float rounding to equal the integer model's (the tests compare them in float64).
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from ems_yolo.nn.ilif import ILIF, integer_spikes
from ems_yolo.nn.neuron import LIF, ReLUNeuron, SiLUNeuron
from ems_yolo.nn.spikeyolo import RepConv, SepRepConv


class ThermometerILIF(nn.Module):
    """An I-LIF at T steps read and written at T x D sub-steps: sums the D sub-step currents of each step, fires
    the integer spike s (0..D), emits D binary sub-spikes [s > d]. `time_steps` is T x D (what spike counters see)."""

    def __init__(self, ilif: ILIF):
        super().__init__()
        self.steps, self.sub_steps = ilif.time_steps, ilif.levels
        self.time_steps = self.steps * self.sub_steps
        self.tau, self.charge, self.backend = ilif.tau, ilif.charge, ilif.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        T, D = self.steps, self.sub_steps
        currents = x.view(T, D, -1, *x.shape[1:]).sum(1)
        spikes = integer_spikes(currents, D, self.tau, self.charge, self.backend)
        d = torch.arange(D, device=x.device, dtype=x.dtype).view(1, D, *[1] * (spikes.dim() - 1))
        return (spikes.unsqueeze(1) > d).to(x.dtype).flatten(0, 2)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, sub_steps={self.sub_steps}, tau={self.tau}, charge={self.charge}"


def _at_sub_step_0(y: torch.Tensor, T: int, D: int) -> torch.Tensor:
    """`[T*B, ...]` -> `[T*D*B, ...]` with each step's value at sub-step 0 and zeros at the others."""
    out = y.new_zeros(T, D, y.shape[0] // T, *y.shape[1:])
    out[:, 0] = y.view(T, -1, *y.shape[1:])
    return out.flatten(0, 2)


class SubStepScatter(nn.Module):
    """The encoding layer: runs on the real input at T steps, its current placed at sub-step 0 of each step."""

    def __init__(self, module: nn.Module, steps: int, sub_steps: int):
        super().__init__()
        self.module, self.steps, self.sub_steps = module, steps, sub_steps

    def forward(self, x):  # noqa: D102
        return _at_sub_step_0(self.module(x), self.steps, self.sub_steps)


class SubStepGather(nn.Module):
    """A non-linear layer on currents: applied to each step's summed current, the result placed at sub-step 0."""

    def __init__(self, module: nn.Module, steps: int, sub_steps: int):
        super().__init__()
        self.module, self.steps, self.sub_steps = module, steps, sub_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        T, D = self.steps, self.sub_steps
        return _at_sub_step_0(self.module(x.view(T, D, -1, *x.shape[1:]).sum(1).flatten(0, 1)), T, D)


def _neurons(model: nn.Module) -> list[ILIF]:
    return [m for m in model.modules() if isinstance(m, ILIF)]


def _head_output_convs(head: nn.Module) -> list[nn.Conv2d]:
    """The convs whose per-step outputs a head averages over T: EMSDetect's level convs, the last conv of each of
    SpikeDetect's branches."""
    if hasattr(head, "cv2") and isinstance(head.cv2, nn.ModuleList):
        return [branch[-1].conv for branches in (head.cv2, head.cv3) for branch in branches]
    return list(head.m)


def _copy_layer_attributes(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Keep the Ultralytics layer-loop attributes (from-index, index, type, ...) of a wrapped top-level layer."""
    for key in ("f", "i", "type", "np", "n", "args"):
        if hasattr(src, key):
            setattr(dst, key, getattr(src, key))
    return dst


def to_spike_driven(model: nn.Module) -> nn.Module:
    """A binary-spike copy of an I-LIF detection model (`model.model` holds its layers, the head last), in eval mode.

    Raises ValueError (one line) for a model without I-LIF neurons or with neurons of different T or D.
    """
    neurons = _neurons(model)
    if not neurons:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (LIF, SiLUNeuron, ReLUNeuron))})
        raise ValueError("spike_driven=True needs a model with I-LIF neurons (neuron: {kind: ilif}), got one with "
                         f"{', '.join(kinds) or 'no spiking neurons'}")
    shapes = {(m.time_steps, m.levels) for m in neurons}
    if len(shapes) > 1:
        raise ValueError(f"spike_driven=True needs one T and one D for all I-LIF neurons, got (T, D) {sorted(shapes)}")
    (T, D), = shapes
    model = deepcopy(model).eval()
    layers = model.model
    first = next(i for i, m in enumerate(layers) if _neurons(m))
    if first == 0:
        raise ValueError("spike_driven=True needs an encoding layer before the first I-LIF, got a neuron first")
    head = layers[-1]
    head_convs = set(_head_output_convs(head))
    for layer in list(layers)[first:]:
        _replace(layer, T, D)
        for m in layer.modules():
            if isinstance(m, nn.Conv2d) and m in head_convs:
                m.weight.data.mul_(D)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.data.div_(D)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.div_(D)
                if m.bias is not None:
                    m.bias.data.div_(D)
    layers[first - 1] = _copy_layer_attributes(layers[first - 1], SubStepScatter(layers[first - 1], T, D))
    head.time_steps = T * D
    return model


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BatchNorm in inference form."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_rep_conv(m: RepConv | SepRepConv) -> nn.Conv2d:
    """SpikeYOLO's re-parameterisable chain as the one k x k conv (with bias) it equals in inference: BNAndPad's
    border is what its BN makes of zero, so BN then a valid k x k conv is a zero-padded conv of the BN's input."""
    if isinstance(m, RepConv):
        pw1, bnpad, (dw, pw, bn) = m.body
        a1, b1 = _bn_affine(bnpad.bn)
        a2, b2 = _bn_affine(bn)
        weight = torch.einsum("om,m,mhw,mi->oihw", pw.weight[:, :, 0, 0], a1, dw.weight[:, 0], pw1.weight[:, :, 0, 0])
        weight = weight * a2.view(-1, 1, 1, 1)
        bias = a2 * (pw.weight[:, :, 0, 0] @ (b1 * dw.weight.sum((1, 2, 3)))) + b2
    else:
        bnpad, (pw, dw) = m.body
        a, b = _bn_affine(bnpad.bn)
        weight = dw.weight * (pw.weight[:, :, 0, 0] * a).unsqueeze(-1).unsqueeze(-1)
        bias = dw.weight.sum((1, 2, 3)) * (pw.weight[:, :, 0, 0] @ b)
    k = weight.shape[-1]
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], k, 1, (k - 1) // 2).to(weight)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    return conv


def _replace(module: nn.Module, T: int, D: int) -> None:
    """Swap, below `module`, each I-LIF for its thermometer form, each re-parameterisable chain for its conv, and
    wrap each non-linear layer on currents."""
    for name, child in module.named_children():
        if isinstance(child, (RepConv, SepRepConv)):
            setattr(module, name, fold_rep_conv(child))
        elif isinstance(child, ILIF):
            setattr(module, name, ThermometerILIF(child))
        elif isinstance(child, (nn.MaxPool2d, SiLUNeuron, ReLUNeuron)):
            setattr(module, name, SubStepGather(child, T, D))
        else:
            _replace(child, T, D)
