"""AutoAnchor (model-spec §6.2): check that the anchors fit the training boxes, re-fit them when they do not.

The best possible recall (BPR) counts the boxes that some anchor matches within the loss's ratio limit
`anchor_t` (max(w/a_w, a_w/w, h/a_h, a_h/h) < anchor_t). When BPR < 0.98, k-means on the box sizes followed by a
short genetic refinement proposes new anchors, which replace the old ones only if they recall more.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.data.utils import exif_size
from ultralytics.utils import LOGGER

from ems_yolo.data.events import EventDetectionDataset

BPR_THRESHOLD = 0.98


def label_sizes(dataset, imgsz: int) -> np.ndarray:
    """Box sizes (w, h) in network-input pixels of every training label: images letterboxed to `imgsz` (long side),
    event samples stretched to `imgsz` x `imgsz`."""
    stretch = isinstance(dataset, EventDetectionDataset)
    sizes = []
    for label in dataset.labels:
        if "shape" in label:
            h, w = label["shape"]
        else:  # rect=True: Ultralytics' set_rectangle took the shapes out of the labels; measured as it does
            with Image.open(label["im_file"]) as im:
                w, h = exif_size(im)
        scale = np.array([imgsz, imgsz]) if stretch else np.array([w, h]) * imgsz / max(h, w)
        sizes.append(np.asarray(label["bboxes"])[:, 2:4] * scale)
    wh = np.concatenate(sizes) if sizes else np.zeros((0, 2))
    return wh[(wh >= 2.0).all(1)]  # ignore boxes of under 2 pixels, as YOLOv5 does


def _best_ratio(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """For each box the best anchor's worst side ratio, as min(r, 1/r) in (0, 1]."""
    r = wh[:, None] / anchors[None]
    return np.minimum(r, 1 / r).min(2).max(1)


def bpr(wh: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    """Best possible recall: fraction of boxes matched by at least one anchor within the ratio limit."""
    return float((_best_ratio(wh, anchors) > 1 / thr).mean()) if len(wh) else 1.0


def fit_anchors(wh: np.ndarray, n: int, thr: float, generations: int = 300, seed: int = 0) -> np.ndarray:
    """k-means on box sizes, then mutation of the anchors kept when they raise the match fitness; sorted by area."""
    rng = np.random.default_rng(seed)
    s = np.maximum(wh.std(0), 1e-6)  # identical boxes have zero spread
    x = wh / s
    k = x[rng.choice(len(x), n, replace=len(x) < n)]
    for _ in range(30):  # Lloyd iterations
        assign = ((x[:, None] - k[None]) ** 2).sum(-1).argmin(1)
        k = np.stack([x[assign == j].mean(0) if (assign == j).any() else k[j] for j in range(n)])
    k = k * s

    def fitness(a: np.ndarray) -> float:
        best = _best_ratio(wh, a)
        return float((best * (best > 1 / thr)).mean())

    f = fitness(k)
    for _ in range(generations):
        mutation = np.where(rng.random(k.shape) < 0.9, rng.normal(1.0, 0.1, k.shape), 1.0).clip(0.3, 3.0)
        candidate = (k * mutation).clip(2.0)
        fc = fitness(candidate)
        if fc > f:
            k, f = candidate, fc
    return k[np.argsort(k.prod(1))]


def check_anchors(model: torch.nn.Module, dataset, imgsz: int, thr: float = 4.0) -> bool:
    """Re-fit the head's anchors to the dataset when BPR < 0.98 and the fit recalls more; True when changed."""
    head = model.model[-1]
    wh = label_sizes(dataset, imgsz)
    if not len(wh):
        return False
    stride = head.stride.view(-1, 1, 1).to(head.anchor_grid)
    current = (head.anchor_grid * stride).view(-1, 2).cpu().numpy()
    old = bpr(wh, current, thr)
    if old >= BPR_THRESHOLD:
        LOGGER.info(f"AutoAnchor: best possible recall {old:.4f} with the model's anchors, kept")
        return False
    proposal = fit_anchors(wh, len(current), thr)
    new = bpr(wh, proposal, thr)
    if new <= old:
        LOGGER.info(f"AutoAnchor: best possible recall {old:.4f}; a re-fit reached only {new:.4f}, anchors kept")
        return False
    grid = torch.tensor(proposal, dtype=head.anchor_grid.dtype, device=head.anchor_grid.device)
    head.anchor_grid.copy_(grid.view_as(head.anchor_grid) / stride)
    model.criterion = None  # rebuilt from the new anchors on the next loss call
    LOGGER.info(
        f"AutoAnchor: best possible recall {old:.4f} -> {new:.4f}; anchors (pixels) now "
        f"{np.round(proposal).astype(int).tolist()}"
    )
    return True
