"""pycocotools bbox evaluation from in-memory ground truth and detections, with its printing captured."""

from __future__ import annotations

import contextlib
import io

import numpy as np


def coco_bbox_eval(gt: dict, detections: list[dict], img_ids: list[int] | None = None) -> tuple[np.ndarray, str]:
    """COCOeval (iouType bbox) of `detections` against the COCO-format dict `gt`.

    Returns pycocotools' 12 summary stats (stats[0] AP50-95, [1] AP50, [2] AP75, ...) and its printed summary.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats, out.getvalue()
