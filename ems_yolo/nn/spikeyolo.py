"""SpikeYOLO's blocks and its anchor-free SpikeDetect head (Luo et al., ECCV 2024) on time-folded tensors.

SpikeYOLO's code (a fork of Ultralytics 8.0.197) carries `[T, B, C, H, W]` tensors between layers; ems-yolo folds
time into the batch, `[T*B, C, H, W]` time-major, so every stateless layer runs once on all steps and each neuron
(I-LIF, `neuron: {kind: ilif}`) views its input as `[T, B, ...]`. Every block reads real values, fires I-LIF spikes
(integers 0..D) and feeds them to bias-free convolutions followed by BatchNorm. The sub-module layout follows the
original so that its checkpoints map tensor for tensor. Names, YAML rows and the original class each replaces:

| ems-yolo (YAML name)  | SpikeYOLO                     | row arguments                                   |
| --------------------- | ----------------------------- | ----------------------------------------------- |
| `TimeRepeat`          | `MS_GetT`                     | `[]` (T is the model's `time_steps`)            |
| `SpikeDownsample`     | `MS_DownSampling`             | `[c2, k, s, p, first]`                          |
| `SpikeAllConvBlock`   | `MS_AllConvBlock`             | `[ratio, k]` (keeps the input width)            |
| `SpikeConvBlock`      | `MS_ConvBlock`                | `[ratio, k]` (keeps the input width)            |
| `SpikeSPPF`           | `SpikeSPPF`                   | `[c2, k]`                                       |
| `SpikeConv`           | `MS_StandardConv`, `SpikeConv`| `[c2, k, s]`                                    |
| `nn.Upsample`         | `nn.Upsample` `(1, 2, 2)`     | `[None, 2, nearest]` (folded: a 2-D upsample)   |
| `Concat`              | `Concat` dim 2                | `[1]` (folded: channels are dim 1)              |
| `SpikeDetect`         | `SpikeDetect`                 | `[nc]`                                          |

Inner pieces: `SpikeSepConv` = `SepConv`, `SepRepConv` = `SepRepConv`, `RepConv` = `RepConv`, `BNAndPad` =
`BNAndPadLayer`, `SpikeConvNoBN` = `SpikeConvWithoutBN`, Ultralytics' `DFL` = `SpikeDFL` (whose unused neuron has no
tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.nn.modules import DFL, Detect

from ems_yolo.nn.neuron import NeuronConfig, make_neuron, unfold_time

ILIF_NEURON = NeuronConfig(kind="ilif")


def _neuron(neuron: NeuronConfig | None, time_steps: int) -> nn.Module:
    return make_neuron(neuron or ILIF_NEURON, time_steps)


class TimeRepeat(nn.Module):
    """The model input at every time step: frames `[B, C, H, W]` repeated T times to `[T*B, C, H, W]` (SpikeYOLO's
    `MS_GetT`); events `[B, T*C, H, W]` (time-major channels) split into their T bins."""

    def __init__(self, c1: int, time_steps: int = 1, input_kind: str = "frames"):
        super().__init__()
        if input_kind == "events" and c1 % time_steps:
            raise ValueError(f"event input has {c1} channels, not a multiple of time_steps={time_steps}")
        self.c1, self.time_steps, self.input_kind = c1, time_steps, input_kind

    @staticmethod
    def out_channels(c1: int, time_steps: int = 1, input_kind: str = "frames") -> int:
        """Channels per time step."""
        return c1 // time_steps if input_kind == "events" else c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        T = self.time_steps
        if self.input_kind == "frames":
            return torch.cat([x] * T) if T > 1 else x
        b, _, h, w = x.shape
        return x.view(b, T, -1, h, w).transpose(0, 1).reshape(T * b, -1, h, w)


class SpikeDownsample(nn.Module):
    """[I-LIF ->] Conv k x k (stride s, with bias) -> BN: SpikeYOLO's `MS_DownSampling`. The first one reads the
    image (no neuron)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2, p: int = 1, first: bool = False,
                 time_steps: int = 1, neuron: NeuronConfig | None = None):
        super().__init__()
        self.encode_conv = nn.Conv2d(c1, c2, k, s, p)
        self.encode_bn = nn.BatchNorm2d(c2)
        if not first:
            self.encode_lif = _neuron(neuron, time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if hasattr(self, "encode_lif"):
            x = self.encode_lif(x)
        return self.encode_bn(self.encode_conv(x))


class SpikeConv(nn.Module):
    """I-LIF -> bias-free Conv k x k (stride s) -> BN: SpikeYOLO's `MS_StandardConv` and `SpikeConv`."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.lif = _neuron(neuron, time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn(self.conv(self.lif(x)))


class SpikeConvNoBN(nn.Module):
    """I-LIF -> Conv with bias: the last conv of each SpikeDetect branch (`SpikeConvWithoutBN`)."""

    def __init__(self, c1: int, c2: int, k: int = 1, time_steps: int = 1, neuron: NeuronConfig | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2)
        self.lif = _neuron(neuron, time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv(self.lif(x))


class BNAndPad(nn.Module):
    """BatchNorm, then a `pad`-pixel border filled with what BN makes of a zero input (`BNAndPadLayer`): a conv
    that follows with no padding of its own sees the border a padded conv *before* the BN would see, which is what
    lets the 1x1 -> BN -> k x k chain fold into one conv (re-parameterisation)."""

    def __init__(self, pad: int, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.bn(x)
        if self.pad <= 0:
            return y
        bn = self.bn
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        border_value = (bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1).to(y.dtype)
        border = F.pad(torch.zeros_like(y[:1, :1]), [self.pad] * 4, value=1.0) > 0
        return torch.where(border, border_value, F.pad(y, [self.pad] * 4))


class SepRepConv(nn.Module):
    """BNAndPad -> Conv 1x1 (c1 -> c2) -> depthwise Conv k x k, no padding (`SepRepConv`)."""

    def __init__(self, c1: int, c2: int, k: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            BNAndPad((k - 1) // 2, c1),
            nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), nn.Conv2d(c2, c2, k, groups=c2, bias=False)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.body(x)


class RepConv(nn.Module):
    """Conv 1x1 -> BNAndPad -> depthwise Conv k x k -> Conv 1x1 (c1 -> c2) -> BN: a k x k conv in training form
    (SpikeYOLO's `RepConv`)."""

    def __init__(self, c1: int, c2: int, k: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c1, c1, 1, bias=False),
            BNAndPad((k - 1) // 2, c1),
            nn.Sequential(
                nn.Conv2d(c1, c1, k, groups=c1, bias=False),
                nn.Conv2d(c1, c2, 1, bias=False),
                nn.BatchNorm2d(c2),
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.body(x)


class SpikeSepConv(nn.Module):
    """Inverted separable conv, spiking: I-LIF -> 1x1 (c -> 2c) -> BN -> I-LIF -> depthwise k x k -> BN -> I-LIF ->
    SepRepConv (2c -> c) -> BN (SpikeYOLO's `SepConv`)."""

    def __init__(self, c: int, k: int = 7, time_steps: int = 1, neuron: NeuronConfig | None = None):
        super().__init__()
        mid = 2 * c
        self.pwconv1 = nn.Conv2d(c, mid, 1, bias=False)
        self.dwconv2 = nn.Conv2d(mid, mid, k, padding=(k - 1) // 2, groups=mid, bias=False)
        self.pwconv3 = SepRepConv(mid, c)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(mid), nn.BatchNorm2d(mid), nn.BatchNorm2d(c)
        self.lif1, self.lif2, self.lif3 = (_neuron(neuron, time_steps) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.bn1(self.pwconv1(self.lif1(x)))
        x = self.bn2(self.dwconv2(self.lif2(x)))
        return self.bn3(self.pwconv3(self.lif3(x)))


class _SepConvResidual(nn.Module):
    """x + SepConv(x), then x + mix(x), mix being a residual branch widened `ratio` times that each block builds; the
    output has the input's width, so the YAML arguments leave out the channels."""

    def __init__(self, c1: int, k: int, time_steps: int, neuron: NeuronConfig | None):
        super().__init__()
        self.Conv = SpikeSepConv(c1, k, time_steps, neuron)

    @staticmethod
    def out_channels(c1: int, **_) -> int:
        """Output channels = input channels."""
        return c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.Conv(x) + x
        return x + self.mix(x)


class SpikeConvBlock(_SepConvResidual):
    """x + SepConv(x), then a residual of two re-parameterisable convs widened `ratio` times (`MS_ConvBlock`)."""

    def __init__(self, c1: int, ratio: float = 4, k: int = 7, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__(c1, k, time_steps, neuron)
        hidden = int(c1 * ratio)
        self.lif1, self.lif2 = _neuron(neuron, time_steps), _neuron(neuron, time_steps)
        self.conv1, self.bn1 = RepConv(c1, hidden), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = RepConv(hidden, c1), nn.BatchNorm2d(c1)

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn2(self.conv2(self.lif2(self.bn1(self.conv1(self.lif1(x))))))


class SpikeAllConvBlock(_SepConvResidual):
    """x + SepConv(x), then a residual of two standard 3x3 spiking convs widened `ratio` times (`MS_AllConvBlock`)."""

    def __init__(self, c1: int, ratio: float = 4, k: int = 7, time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        super().__init__(c1, k, time_steps, neuron)
        hidden = int(c1 * ratio)
        self.conv1 = SpikeConv(c1, hidden, 3, 1, time_steps, neuron)
        self.conv2 = SpikeConv(hidden, c1, 3, 1, time_steps, neuron)

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv2(self.conv1(x))


class SpikeSPPF(nn.Module):
    """Spiking SPPF: SpikeConv 1x1 (c1 -> c1/2), three chained k x k max-pools, concat, SpikeConv 1x1 -> c2."""

    def __init__(self, c1: int, c2: int, k: int = 5, time_steps: int = 1, neuron: NeuronConfig | None = None):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = SpikeConv(c1, c_, 1, 1, time_steps, neuron)
        self.cv2 = SpikeConv(c_ * 4, c2, 1, 1, time_steps, neuron)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SpikeDetect(Detect):
    """SpikeYOLO's anchor-free head: per level a box branch (SpikeConv 3x3, SpikeConv 3x3, SpikeConvNoBN 1x1 ->
    4 * reg_max DFL logits) and a class branch (the same -> nc logits), averaged over T.

    Outputs follow the pip Ultralytics Detect: training returns `{"boxes", "scores", "feats"}` with `feats` the
    per-level raw maps `[B, 4 * reg_max + nc, H, W]` (what `v8DetectionLoss` reads); eval returns `(decoded, that
    dict)` with `decoded` = `[B, 4 + nc, anchors]` (centre-xywh pixels, sigmoid scores), `decoded` alone when
    exporting. Trained with Ultralytics' `v8DetectionLoss` (gains: train args box, cls, dfl).
    """

    legacy = False  # pinned: stock parse_model sets Detect.legacy process-wide

    def __init__(self, nc: int = 80, ch: list | tuple = (), time_steps: int = 1,
                 neuron: NeuronConfig | None = None):
        nn.Module.__init__(self)  # Detect.__init__ would build its own (non-spiking) branches
        self.nc, self.nl, self.reg_max = nc, len(ch), 16
        self.no = nc + 4 * self.reg_max
        self.time_steps = time_steps
        self.stride = torch.zeros(self.nl)
        c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 100))

        def branch(c: int, hidden: int, out: int) -> nn.Sequential:
            return nn.Sequential(SpikeConv(c, hidden, 3, 1, time_steps, neuron),
                                 SpikeConv(hidden, hidden, 3, 1, time_steps, neuron),
                                 SpikeConvNoBN(hidden, out, 1, time_steps, neuron))

        self.cv2 = nn.ModuleList(branch(c, c2, 4 * self.reg_max) for c in ch)
        self.cv3 = nn.ModuleList(branch(c, c3, nc) for c in ch)
        self.dfl = DFL(self.reg_max)

    @staticmethod
    def check_hyp(hyp: dict | None) -> None:
        """The v8 loss takes its gains from the train arguments, not from a YAML `loss:` section."""
        if hyp:
            raise ValueError("loss: SpikeDetect models are trained with Ultralytics' v8 loss, whose gains are the "
                             "train arguments box=, cls= and dfl=; expected no 'loss:' section")

    def criterion(self, model: nn.Module):
        """Ultralytics' v8 detection loss (task-aligned assignment, CIoU + DFL, BCE classes)."""
        from ultralytics.utils.loss import v8DetectionLoss

        return v8DetectionLoss(model)

    def set_stride(self, stride: torch.Tensor) -> None:
        """Store the level strides and initialise the biases."""
        self.stride = stride.float()
        self.bias_init()

    def bias_init(self) -> None:
        """SpikeYOLO's priors: box logits 1.0, class logits for ~5 objects of nc classes per 640 image."""
        for a, b, s in zip(self.cv2, self.cv3, self.stride.tolist()):
            a[-1].conv.bias.data[:] = 1.0
            b[-1].conv.bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def forward(self, x: list[torch.Tensor]):
        """Raw per-level maps averaged over T, as the dict Ultralytics' loss reads; decoded too in eval."""
        feats = [
            torch.cat((unfold_time(box(xi), self.time_steps).mean(0), unfold_time(cls(xi), self.time_steps).mean(0)), 1)
            for xi, box, cls in zip(x, self.cv2, self.cv3)
        ]
        b = feats[0].shape[0]
        flat = torch.cat([f.view(b, self.no, -1) for f in feats], 2)
        boxes, scores = flat.split((4 * self.reg_max, self.nc), 1)
        preds = {"boxes": boxes, "scores": scores, "feats": feats}
        if self.training:
            return preds
        y = self._inference(preds)
        return y if self.export else (y, preds)

    def fuse(self) -> None:
        """Nothing to strip: the head has one branch pair."""
