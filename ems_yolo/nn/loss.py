"""YOLOv5-style detection loss for the EMS-YOLO anchor head (model-spec §7).

Targets are assigned per level to the anchors whose shape ratio passes `anchor_t`, in the cell holding the box
centre plus its two nearest neighbour cells. The loss is CIoU for boxes, BCE on the whole objectness map (target =
IoU at assigned cells) weighted per level, and BCE on one-hot classes. The return convention matches Ultralytics'
`v8DetectionLoss`, so the stock trainer can consume it unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.utils.metrics import bbox_iou

LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")  # Ultralytics' '*_loss' naming: results.csv columns, plotted

DEFAULT_HYP: dict = {
    "box": 0.05,  # base box gain, before the 3/nl rescale
    "obj": 1.0,  # base objectness gain, before the (imgsz/640)^2 * 3/nl rescale
    "cls": 0.5,  # base class gain, before the nc/80 * 3/nl rescale
    "anchor_t": 4.0,  # max allowed target/anchor side ratio (either direction)
    "balance": (4.0, 1.0),  # objectness weight per level, P4 then P5
    "gr": 1.0,  # objectness target mix: (1 - gr) + gr * IoU
    "label_smoothing": 0.0,
    "obj_imgsz": None,  # image size for the objectness gain; None = the real network input size
}

def _number(x, low: float = 0.0, high: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high and math.isfinite(x)


# What each `loss:` value must be (checked when the model is built, not at the first training step).
_HYP_CHECKS = {
    "box": (_number, "a non-negative gain"),
    "obj": (_number, "a non-negative gain"),
    "cls": (_number, "a non-negative gain"),
    "anchor_t": (lambda x: _number(x, 1.0), "a side ratio >= 1"),
    "balance": (lambda x: isinstance(x, (list, tuple)) and all(_number(b) for b in x),
                "a list of non-negative weights, one per level"),
    "gr": (lambda x: _number(x, 0.0, 1.0), "a number in [0, 1]"),
    "label_smoothing": (lambda x: _number(x, 0.0, 1.0), "a number in [0, 1]"),
    "obj_imgsz": (lambda x: x is None or (_number(x) and x > 0), "a positive image size or null"),
}

# Cell offsets (in units of the neighbour offset g): centre, left, up, right, down.
_CELL_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


class LevelTargets(NamedTuple):
    """Targets assigned on one level, one row per (target, anchor, cell) assignment."""

    img: torch.Tensor  # [M] image index in the batch
    anchor: torch.Tensor  # [M] anchor index within the level
    gy: torch.Tensor  # [M] grid row of the assigned cell
    gx: torch.Tensor  # [M] grid column of the assigned cell
    box: torch.Tensor  # [M, 4] target cx, cy (relative to the assigned cell), w, h, in grid units
    anchor_wh: torch.Tensor  # [M, 2] matched anchor size in grid units
    cls: torch.Tensor  # [M] class index


class YOLOv5Loss:
    """YOLOv5 detection loss (CIoU box, objectness BCE with IoU target, class BCE) for an anchor head."""

    def __init__(self, nc: int, anchors: torch.Tensor, stride: torch.Tensor, hyp: dict | None = None):
        """Store head geometry (`anchors` [nl, na, 2] in grid units, `stride` [nl]) and validated hyperparameters."""
        hyp = self.check_hyp(hyp)
        self.hyp = {**DEFAULT_HYP, **hyp}
        self.nc = int(nc)
        self.anchors = anchors.detach().float().clone()
        self.stride = stride.detach().float().flatten().clone()
        self.nl, self.na = self.anchors.shape[:2]
        if self.stride.numel() != self.nl:
            raise ValueError(f"stride has {self.stride.numel()} entries but anchors define {self.nl} levels")
        self.balance = [float(b) for b in self.hyp["balance"]]
        if len(self.balance) != self.nl:
            raise ValueError(f"loss.balance: {len(self.balance)} entries but the head has {self.nl} levels, "
                             "expected one weight per level")

    @staticmethod
    def check_hyp(hyp: dict | None) -> dict:
        """The `loss:` section of a model YAML as a dict, each value checked; errors name the key."""
        if not isinstance(hyp or {}, dict):
            raise ValueError(f"loss: expected a mapping of hyperparameters, got {hyp!r}")
        for key, value in (hyp or {}).items():
            if key not in DEFAULT_HYP:
                raise ValueError(f"Unknown loss hyperparameter {key!r}; expected one of {sorted(DEFAULT_HYP)}")
            ok, expected = _HYP_CHECKS[key]
            if not ok(value):
                raise ValueError(f"loss.{key}: expected {expected}, got {value!r}")
        return dict(hyp or {})

    @classmethod
    def from_model(cls, model) -> YOLOv5Loss:
        """Build the loss from a model whose last module is the anchor head; `model.yaml['loss']` overrides hyp."""
        head = model.model[-1]
        cfg = getattr(model, "yaml", None) or {}
        return cls(head.nc, head.anchor_grid, head.stride, cfg.get("loss"))

    def gains(self, imgsz: float) -> tuple[float, float, float]:
        """Return the (box, obj, cls) gains rescaled for nl levels, nc classes and image size (model-spec §7)."""
        level_scale = 3.0 / self.nl
        if self.hyp["obj_imgsz"] is not None:
            imgsz = float(self.hyp["obj_imgsz"])
        box = self.hyp["box"] * level_scale
        obj = self.hyp["obj"] * (imgsz / 640.0) ** 2 * level_scale
        cls = self.hyp["cls"] * (self.nc / 80.0) * level_scale
        return box, obj, cls

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (stacked gain-weighted [box, obj, cls] × batch size, dict of detached components)."""
        levels = preds[1] if isinstance(preds, tuple) else preds
        device = levels[0].device
        bs, _, ny, nx, _ = levels[0].shape
        stride0 = float(self.stride[0])
        box_gain, obj_gain, cls_gain = self.gains(max(ny * stride0, nx * stride0))

        targets = torch.cat(
            (
                batch["batch_idx"].reshape(-1, 1).to(device, torch.float32),
                batch["cls"].reshape(-1, 1).to(device, torch.float32),
                batch["bboxes"].reshape(-1, 4).to(device, torch.float32),
            ),
            dim=1,
        )
        assigned = self.build_targets(levels, targets)

        zero = torch.zeros((), device=device)
        l_box, l_obj, l_cls = zero, zero, zero
        with torch.autocast(device_type=device.type, enabled=False):
            for p, t, balance in zip(levels, assigned, self.balance):
                box, obj, cls = self._level_loss(p.float(), t)
                l_box, l_obj, l_cls = l_box + box, l_obj + obj * balance, l_cls + cls

        loss = torch.stack((l_box * box_gain, l_obj * obj_gain, l_cls * cls_gain))
        return loss * bs, dict(zip(LOSS_NAMES, loss.detach()))

    def build_targets(self, levels: list[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Assign targets [N, 6] = (image, class, cx, cy, w, h normalised) to anchors and cells on every level."""
        device = targets.device
        g = 0.5
        offsets = torch.tensor(_CELL_OFFSETS, device=device, dtype=torch.float32) * g
        out = []
        for i, p in enumerate(levels):
            ny, nx = p.shape[2:4]
            anchors = self.anchors[i].to(device)
            grid_wh = torch.tensor([nx, ny], device=device, dtype=torch.float32)
            gxy = targets[:, 2:4] * grid_wh
            gwh = targets[:, 4:6] * grid_wh

            # Anchor-major pairing keeps YOLOv5's write order for the "last write wins" objectness rule.
            ratio = gwh[None] / anchors[:, None]  # [na, N, 2]
            keep = torch.max(ratio, 1.0 / ratio).amax(-1) < self.hyp["anchor_t"]
            a, ti = keep.nonzero(as_tuple=True)
            pxy = gxy[ti]
            frac = pxy % 1
            # Neighbours are distinct cells: an exactly integer centre (frac 0) gets only the left / up one.
            near_low = ((frac < g) & (pxy > 1)).T  # left / up neighbour
            near_high = ((frac > g) & (grid_wh - pxy > 1)).T  # right / down neighbour
            use = torch.cat((torch.ones_like(near_low[:1]), near_low, near_high))  # [5, M], offset-major
            k, m = use.nonzero(as_tuple=True)

            cell = (pxy[m] - offsets[k]).floor().long()
            gx = cell[:, 0].clamp(0, nx - 1)
            gy = cell[:, 1].clamp(0, ny - 1)
            cell_xy = torch.stack((gx, gy), dim=1).float()
            tbox = torch.cat((pxy[m] - cell_xy, gwh[ti[m]]), dim=1)
            tgt = targets[ti[m]]
            out.append(LevelTargets(tgt[:, 0].long(), a[m], gy, gx, tbox, anchors[a[m]], tgt[:, 1].long()))
        return out

    def _level_loss(self, p: torch.Tensor, t: LevelTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the unweighted (box, obj, cls) losses of one float32 level map p [B, na, H, W, nc + 5]."""
        zero = p.new_zeros(())
        tobj = p.new_zeros(p.shape[:4])
        if t.img.numel() == 0:
            return zero, F.binary_cross_entropy_with_logits(p[..., 4], tobj), zero

        ps = p[t.img, t.anchor, t.gy, t.gx]
        pxy = ps[:, :2].sigmoid() * 2 - 0.5
        pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * t.anchor_wh
        iou = bbox_iou(torch.cat((pxy, pwh), 1), t.box, xywh=True, CIoU=True).squeeze(-1)
        l_box = (1.0 - iou).mean()

        gr = self.hyp["gr"]
        self._write_last(tobj, t, (1.0 - gr) + gr * iou.detach().clamp(0))
        l_obj = F.binary_cross_entropy_with_logits(p[..., 4], tobj)

        l_cls = zero
        if self.nc > 1:
            eps = self.hyp["label_smoothing"]
            tcls = torch.full_like(ps[:, 5:], 0.5 * eps)
            tcls[torch.arange(len(t.cls), device=p.device), t.cls] = 1.0 - 0.5 * eps
            l_cls = F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
        return l_box, l_obj, l_cls

    @staticmethod
    def _write_last(tobj: torch.Tensor, t: LevelTargets, values: torch.Tensor) -> None:
        """Write values into tobj at the assigned cells; on duplicate cells the last assignment wins on any device."""
        _, na, ny, nx = tobj.shape
        flat = ((t.img * na + t.anchor) * ny + t.gy) * nx + t.gx
        cells, inverse = torch.unique(flat, return_inverse=True)
        order = torch.arange(len(flat), device=flat.device)
        last = torch.zeros_like(cells).scatter_reduce(0, inverse, order, reduce="amax", include_self=False)
        tobj.view(-1)[flat[last]] = values[last]
