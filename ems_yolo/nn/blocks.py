"""The residual blocks of EMS-ResNet (model-spec §5).

Every block starts with a LIF (inside its LCBs) and returns a real-valued sum, so every conv reads spikes except
the documented real-input ones (MS-Block projection, SiLU conv layer). Each residual branch ends with a tdBN
initialised at alpha = 0.2 so that the block starts close to its shortcut.
"""

from __future__ import annotations

import torch
from torch import nn

from ems_yolo.nn.layers import LCB, conv_bn, lcb_chain, max_pool
from ems_yolo.nn.neuron import NeuronConfig, SiLUNeuron, make_neuron

RESIDUAL_ALPHA = 0.2  # tdBN alpha of the last BN of every residual branch


class ResidualBlock(nn.Module):
    """Residual branch LCB(c1 -> hidden, k, s, alpha 1) -> LCB(hidden -> c2, k, 1, alpha 0.2) plus the `shortcut`
    that each block defines (a module or a method)."""

    def __init__(self, c1: int, hidden: int, c2: int, k: int, s: int, time_steps: int, neuron: NeuronConfig):
        super().__init__()
        self.residual = nn.Sequential(
            LCB(c1, hidden, k, s, 1.0, time_steps, neuron),
            LCB(hidden, c2, k, 1, RESIDUAL_ALPHA, time_steps, neuron),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return lcb_chain(self.residual, x) + self.shortcut(x)


class EMSBlock1(ResidualBlock):
    """EMS-Block1: residual of two LCBs; projection shortcut MaxPool -> LIF -> Conv 1x1 -> tdBN (full-spike).

    `hidden` widens the residual branch (the wide head block of the original configs uses 1024).
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, hidden: int | None = None, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        neuron = neuron or NeuronConfig()
        super().__init__(c1, hidden or c2, c2, k, s, time_steps, neuron)
        if s == 1 and c1 == c2:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(max_pool(s, neuron.backend), LCB(c1, c2, 1, 1, 1.0, time_steps, neuron))


class WideBlock(EMSBlock1):
    """EMS-Block1 with a fixed 1024-wide residual bottleneck (original `BasicBlock_1`)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, hidden: int = 1024, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__(c1, c2, k, s, hidden, time_steps, neuron)


class EMSBlock2(ResidualBlock):
    """EMS-Block2: concat shortcut that computes only the c2 - c1 missing channels from spikes.

    shortcut = MaxPool(concat[LCB_1x1(x), x]) for pool_order "last" (original code, released weights) or
    concat[LCB_1x1(MaxPool(x)), MaxPool(x)] for "first" (paper figure). Hidden width of the residual is e * c2.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, e: float = 0.5, pool_order: str = "last",
                 time_steps: int = 1, neuron: NeuronConfig | None = None):
        if c1 > c2:
            raise ValueError(f"EMSBlock2 needs c1 <= c2 (its shortcut keeps the input channels), got {c1} > {c2}")
        if pool_order not in ("last", "first"):
            raise ValueError(f"pool_order must be 'last' or 'first', got {pool_order!r}")
        neuron = neuron or NeuronConfig()
        super().__init__(c1, int(c2 * e), c2, k, s, time_steps, neuron)
        self.pool_order = pool_order
        self.new = LCB(c1, c2 - c1, 1, 1, 1.0, time_steps, neuron) if c2 > c1 else None
        self.pool = max_pool(s, neuron.backend)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Concat shortcut in the configured pooling order."""
        if self.new is None:
            return self.pool(x)
        if self.pool_order == "last":  # pool(concat(a, b)) = concat(pool(a), pool(b)): concat the smaller tensors
            return torch.cat((self.pool(self.new(x)), self.pool(x)), 1)
        x = self.pool(x)
        return torch.cat((self.new(x), x), 1)


class MSBlock(ResidualBlock):
    """MS-ResNet block: residual LCB(c1 -> c2/2) -> LCB(c2/2 -> c2); projection MaxPool -> Conv 1x1 -> tdBN.

    As in the paper models the projection reads the real-valued block input (no LIF; a MAC layer). `shortcut_lif`
    inserts a LIF there to make the block full-spike (not part of the paper, off by default).
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, shortcut_lif: bool = False, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        neuron = neuron or NeuronConfig()
        super().__init__(c1, c2 // 2, c2, k, s, time_steps, neuron)
        if s == 1 and c1 == c2:
            self.shortcut = nn.Identity()
        else:
            lif = [make_neuron(neuron, time_steps)] if shortcut_lif else []
            spike_input = shortcut_lif and neuron.kind != "relu"
            self.shortcut = nn.Sequential(max_pool(s, neuron.backend), *lif,
                                          *conv_bn(c1, c2, 1, 1, 1.0, neuron, spike_input))


class SiLUConv(nn.Module):
    """Conv -> tdBN -> SiLU pseudo-neuron (original `Conv` of the COCO configs); reads and emits real values."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__()
        neuron = neuron or NeuronConfig()
        self.conv, self.bn = conv_bn(c1, c2, k, s, 1.0, neuron, spike_input=False)
        self.act = SiLUNeuron(time_steps if neuron.kind == "lif" else 1, neuron.tau)  # the ANN twin: plain SiLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.bn(self.conv(x)))
