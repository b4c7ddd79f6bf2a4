"""EMSValidator: Ultralytics' DetectionValidator, with COCO-style mAP computed by pycocotools.

With `save_json=True` Ultralytics writes predictions in COCO format and builds the ground truth from the dataset
(or reads `annotations/instances_val2017.json` for COCO) but scores them with `faster-coco-eval`, which it would
try to pip-install. This validator scores them with pycocotools instead and reports the result next to the
Ultralytics metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import LOGGER


def cocoeval_bbox(anno: dict | str | Path, preds: list[dict] | str | Path, img_ids: list[int] | None = None):
    """Run pycocotools' bbox evaluation; return the COCOeval object (stats[0] = AP50-95, stats[1] = AP50)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = anno if isinstance(anno, dict) else json.loads(Path(anno).read_text())
        gt.createIndex()
        dt = gt.loadRes(preds if isinstance(preds, list) else json.loads(Path(preds).read_text()))
    ev = COCOeval(gt, dt, "bbox")
    if img_ids is not None:
        ev.params.imgIds = img_ids
    return ev


class EMSValidator(DetectionValidator):
    """Detection validator whose COCO-format evaluation uses pycocotools (never installs anything)."""

    coco_stats: dict[str, float] | None = None

    def coco_evaluate(self, stats: dict[str, Any], pred_json, anno_json, iou_types="bbox", suffix="Box"):
        """Score the saved COCO-format predictions with pycocotools and add `coco/mAP50-95`, `coco/mAP50`."""
        if not (self.args.save_json and self.jdict and (self.is_coco or self.gdict)):
            return stats
        if isinstance(anno_json, Path) and not anno_json.is_file():
            LOGGER.warning(f"pycocotools evaluation skipped: {anno_json} not found")
            return stats
        img_ids = None if self.gdict else [int(Path(x).stem) for x in self.dataloader.dataset.im_files]
        ev = cocoeval_bbox(anno_json, pred_json, img_ids)
        LOGGER.info("\nEvaluating pycocotools mAP...")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        LOGGER.info(buf.getvalue().rstrip())
        self.coco_stats = {"coco/mAP50-95": float(ev.stats[0]), "coco/mAP50": float(ev.stats[1])}
        self.metrics.coco = self.coco_stats
        if self.is_coco and not self.training:  # the official protocol replaces the approximation for COCO itself
            stats["metrics/mAP50(B)"], stats["metrics/mAP50-95(B)"] = ev.stats[1], ev.stats[0]
            stats["fitness"] = 0.9 * ev.stats[0] + 0.1 * ev.stats[1]
        LOGGER.info(f"pycocotools: mAP50-95 {ev.stats[0]:.4f}, mAP50 {ev.stats[1]:.4f}")
        return stats
