"""EMSDetect: the paper's anchor-based two-level detection head (model-spec §6).

It subclasses Ultralytics' `Detect` only so that the engines recognise it (export flags, stride moves, task
guessing); none of Detect's anchor-free layers are built. Training output: per-level raw logits
`[B, na, H, W, nc + 5]` averaged over T. Inference output: the Ultralytics layout `(B, 4 + nc, N)` with boxes as
centre-xywh in input pixels and scores obj * cls, so the stock NMS, validator, predictor and exporter take it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.nn.modules import Detect

from ems_yolo.nn.loss import YOLOv5Loss
from ems_yolo.nn.neuron import unfold_time


class EMSDetect(Detect):
    """Anchor head: one biased 1x1 conv per level on the time-averaged block output, YOLOv5 decoding."""

    legacy = False  # pinned: stock parse_model sets Detect.legacy process-wide
    cv2 = cv3 = dfl = one2one_cv2 = one2one_cv3 = None  # no anchor-free, DFL or one-to-one branches (engines read them)

    def __init__(self, nc: int = 80, anchors: list | tuple = (), ch: list | tuple = (), time_steps: int = 1):
        nn.Module.__init__(self)  # Detect.__init__ would build the anchor-free branches (ultralytics_compat hook 3)
        if len(anchors) != len(ch):
            raise ValueError(f"EMSDetect: {len(anchors)} anchor levels for {len(ch)} input layers")
        if any(len(a) % 2 or len(a) != len(anchors[0]) for a in anchors):
            raise ValueError("EMSDetect: every anchor level needs the same number of (w, h) pairs")
        self.nc, self.nl, self.na, self.no = nc, len(ch), len(anchors[0]) // 2, nc + 5
        self.reg_max = 1
        self.time_steps = time_steps
        self.stride = torch.zeros(self.nl)  # set by the model after a probe forward
        self.register_buffer("anchor_grid", torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in ch)
        for conv in self.m:
            conv.spike_input = False

    @property
    def end2end(self) -> bool:
        """Always False: the anchor head needs NMS (there is no one-to-one branch)."""
        return False

    @end2end.setter
    def end2end(self, value: bool) -> None:
        if value:
            raise ValueError("EMSDetect has no NMS-free (end-to-end) branch")

    @staticmethod
    def check_hyp(hyp: dict | None) -> None:
        """Check the YAML's `loss:` section (the YOLOv5 loss's gains)."""
        YOLOv5Loss.check_hyp(hyp)

    def criterion(self, model: nn.Module) -> YOLOv5Loss:
        """YOLOv5-style loss with the gains of the YAML's `loss:` section."""
        return YOLOv5Loss.from_model(model)

    def set_stride(self, stride: torch.Tensor) -> None:
        """Store level strides, express anchors in grid units (ascending with stride) and initialise biases."""
        self.stride = stride.float()
        area = self.anchor_grid.prod(-1).mean(-1)
        if (area[-1] - area[0]).sign() != (self.stride[-1] - self.stride[0]).sign():
            self.anchor_grid.copy_(self.anchor_grid.flip(0))
        self.anchor_grid /= self.stride.view(-1, 1, 1)
        self.bias_init()

    def bias_init(self) -> None:
        """YOLOv5 prior: ~8 objects per 640 image for objectness, 0.6/(nc - 0.99) for classes."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.data.view(self.na, self.no)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, x: list[torch.Tensor]):
        """Raw per-level logits in training; `(decoded, raw)` in eval; `decoded` alone when exporting."""
        raw = []
        for i, conv in enumerate(self.m):
            p = conv(unfold_time(x[i], self.time_steps).mean(0))  # linear conv: mean over T first is exact
            b, _, h, w = p.shape
            raw.append(p.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        y = self.decode(raw)
        return y if self.export else (y, raw)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """YOLOv5 decoding to `(B, 4 + nc, N)`, N flattened in level, anchor, row, column order."""
        out = []
        for i, p in enumerate(raw):
            b, _, h, w, _ = p.shape
            gy, gx = torch.meshgrid(
                torch.arange(h, device=p.device, dtype=p.dtype),
                torch.arange(w, device=p.device, dtype=p.dtype),
                indexing="ij",
            )
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
            anchor_px = (self.anchor_grid[i] * self.stride[i]).view(1, self.na, 1, 1, 2).to(p.dtype)
            y = p.sigmoid()
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor_px
            scores = y[..., 4:5] * y[..., 5:]
            out.append(torch.cat((xy, wh, scores), -1).view(b, -1, 4 + self.nc))
        return torch.cat(out, 1).transpose(1, 2)

    def fuse(self) -> None:
        """Nothing to strip: the head has a single branch."""
