"""Detection metrics on event recordings with the Prophesee / RVT protocol (events-spec §6.1, "protocol A"), for
Gen1 and the 1 Mpx dataset (`ems_yolo.events.protocols` holds each dataset's numbers).

Ground truth and detections are lists with one v2 box array per recording. Both sides are filtered alike
(first ``skip_us`` ignored, minimum diagonal and side), every unique ground-truth timestamp of every recording
becomes one COCO image, and the detections within ``±time_tol_us`` (inclusive) of that timestamp are its
predictions. pycocotools' ``COCOeval`` then computes the usual AP numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ems_yolo.events.io import BBOX_DTYPE, convert_boxes
from ems_yolo.events.protocols import GEN1, DatasetProtocol, get_protocol
from ems_yolo.utils.coco import coco_bbox_eval

__all__ = ["evaluate_detections"]

_METRICS = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")


def _prepare(boxes: np.ndarray, source: str, skip_us: int, min_diag: float, min_side: float, n_classes: int):
    """Convert to v2 (checking time order), check class ids and apply the protocol's time and size filter."""
    boxes = convert_boxes(np.asarray(boxes), BBOX_DTYPE, source)
    bad = np.flatnonzero(boxes["class_id"] >= n_classes)
    if bad.size:
        raise ValueError(f"{source}: row {bad[0]} has class_id {boxes['class_id'][bad[0]]}, expected < {n_classes}")
    w = boxes["w"].astype(np.float64)
    h = boxes["h"].astype(np.float64)
    keep = (boxes["t"] > skip_us) & (w * w + h * h >= min_diag * min_diag) & (w >= min_side) & (h >= min_side)
    return boxes[keep]


def _coco_dataset(
    gt: list[np.ndarray], dt: list[np.ndarray], height: int, width: int, time_tol_us: int, classes: tuple[str, ...]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO ground-truth dataset (one image per recording and GT timestamp) and the matching result list."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for gt_boxes, dt_boxes in zip(gt, dt):
        dt_t = dt_boxes["t"]
        for ts in np.unique(gt_boxes["t"]):
            image_id = len(images) + 1
            images.append({"id": image_id, "height": height, "width": width})
            # Annotation ids start at 1: COCOeval treats a matched id of 0 as "unmatched".
            for box in gt_boxes[gt_boxes["t"] == ts]:
                w, h = float(box["w"]), float(box["h"])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": int(box["class_id"]) + 1,
                    "bbox": [float(box["x"]), float(box["y"]), w, h], "area": w * h, "iscrowd": 0,
                })
            lo = np.searchsorted(dt_t, ts - time_tol_us, side="left")
            hi = np.searchsorted(dt_t, ts + time_tol_us, side="right")
            for box in dt_boxes[lo:hi]:
                results.append({
                    "image_id": image_id, "category_id": int(box["class_id"]) + 1,
                    "bbox": [float(box["x"]), float(box["y"]), float(box["w"]), float(box["h"])],
                    "score": float(box["class_confidence"]),
                })
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def evaluate_detections(
    gt: list[np.ndarray],
    dt: list[np.ndarray],
    protocol: str | DatasetProtocol = GEN1,
    downsampled: bool = False,
    height: int | None = None,
    width: int | None = None,
    skip_us: int | None = None,
    min_diag: float | None = None,
    min_side: float | None = None,
    time_tol_us: int | None = None,
    classes: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """COCO AP of detections ``dt`` against ground truth ``gt`` (one box array per recording, sorted by t).

    The protocol (``gen1``, ``gen4`` or a DatasetProtocol) gives the sensor size, filters, time tolerance and
    classes; ``downsampled=True`` scores boxes at the protocol's reduced input resolution (RVT's 1 Mpx setting:
    size and filters divided by ``downsample``). Any of the keyword values overrides the protocol's.
    Arrays may use the v2 (``BBOX_DTYPE``) or v1 layout; ``class_confidence`` is the detection score and
    ``category_id = class_id + 1``. Returns ``mAP50-95`` (the headline number), ``mAP50``, ``mAP75``,
    ``mAP_small/medium/large`` (pycocotools' "no ground truth" placeholder -1 reported as 0.0), and the counts
    ``images``, ``gt_boxes`` and ``detections`` that entered the evaluation. Without any ground-truth image
    or any matched detection every AP is 0.0.
    """
    p = get_protocol(protocol)
    scale = p.downsample if downsampled else 1
    height = p.height // scale if height is None else height
    width = p.width // scale if width is None else width
    skip_us = p.skip_us if skip_us is None else skip_us
    min_diag = p.min_diag / scale if min_diag is None else min_diag
    min_side = p.min_side / scale if min_side is None else min_side
    time_tol_us = p.time_tol_us if time_tol_us is None else time_tol_us
    classes = p.classes if classes is None else classes
    if len(gt) != len(dt):
        raise ValueError(f"gt has {len(gt)} recordings but dt has {len(dt)}; pass one array per recording to both")
    filters = (skip_us, min_diag, min_side, len(classes))
    gt = [_prepare(boxes, f"ground truth of recording {i}", *filters) for i, boxes in enumerate(gt)]
    dt = [_prepare(boxes, f"detections of recording {i}", *filters) for i, boxes in enumerate(dt)]
    dataset, results = _coco_dataset(gt, dt, height, width, time_tol_us, classes)

    metrics: dict[str, float] = dict.fromkeys(_METRICS, 0.0)
    metrics.update(images=len(dataset["images"]), gt_boxes=len(dataset["annotations"]), detections=len(results))
    if not dataset["images"] or not results:
        return metrics

    stats, _ = coco_bbox_eval(dataset, results, [image["id"] for image in dataset["images"]])
    for key, value in zip(_METRICS, stats):
        metrics[key] = max(float(value), 0.0)
    return metrics
