"""EMSValidator: Ultralytics' DetectionValidator, with COCO-style mAP computed by pycocotools.

With `save_json=True` Ultralytics writes predictions in COCO format and builds the ground truth from the dataset
(or reads `annotations/instances_val2017.json` for COCO) but scores them with `faster-coco-eval`, which it would
try to pip-install. This validator scores them with pycocotools instead and reports the result next to the
Ultralytics metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import LOGGER, RANK

from ems_yolo.data.datasets import check_input_channels, warn_class_mismatch
from ems_yolo.data.events import EventDetectionDataset
from ems_yolo.data.splits import build_split_dataset
from ems_yolo.events.io import concat_boxes, detections_to_boxes
from ems_yolo.utils.coco import coco_bbox_eval
from ems_yolo.utils.files import atomic_write_text, claim_run


def _sensor_rows(xyxy, cls, conf, t: int, scale: np.ndarray) -> np.ndarray:
    """Boxes in network pixels (xyxy tensors) as Gen1 v2 rows in sensor pixels at time t."""
    b = xyxy.detach().cpu().numpy().reshape(-1, 4) * scale
    confidence = 1.0 if conf is None else conf.detach().cpu().numpy()
    return detections_to_boxes(b, cls.detach().cpu().numpy(), confidence, t)


class EMSValidator(DetectionValidator):
    """Detection validator whose COCO-format evaluation uses pycocotools (never installs anything).

    On event data it also scores the Prophesee/RVT protocol of the cache's dataset (`evaluate_detections`, Gen1 or
    1 Mpx) in sensor coordinates (RVT's halved ones for 1 Mpx), next to the
    per-frame YOLO-style mAP that the EMS-YOLO paper reports.
    """

    _model = None  # what get_dataloader checks the data against (set by __call__)
    coco_stats: dict[str, float] | None = None
    prophesee_stats: dict[str, float] | None = None

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        claim_run(self.save_dir)  # a failed stand-alone validation removes this folder if it made it

    def build_dataset(self, img_path: str, mode: str = "val", batch: int | None = None):
        """Event caches (.h5 splits) get EventDetectionDataset; image folders are checked and go to Ultralytics."""
        frames = super().build_dataset
        return build_split_dataset(img_path, self.args, self.data, mode, lambda: frames(img_path, mode, batch))

    def get_dataloader(self, dataset_path: str, batch_size: int):
        """Ultralytics' loader; for a stand-alone validation of a PyTorch model first the check that the data is as
        wide as the model's input (before the progress bar and the first batch; exports keep their own checks)."""
        if isinstance(getattr(self._model, "yaml", None), dict):
            check_input_channels(self._model.yaml, str(self.args.model), self.data, str(dataset_path))
        return super().get_dataloader(dataset_path, batch_size)

    @property
    def events(self) -> bool:
        """Whether the data being validated is an event cache."""
        return isinstance(getattr(self.dataloader, "dataset", None), EventDetectionDataset)

    def init_metrics(self, model) -> None:  # noqa: D102
        super().init_metrics(model)
        if not self.training:
            warn_class_mismatch(self.names, self.data["names"])
        self._event_gt: dict[int, list] = {}
        self._event_dt: dict[int, list] = {}

    def update_metrics(self, preds: list[dict], batch: dict) -> None:
        """Ultralytics' metrics, plus per-recording boxes in sensor pixels for the Prophesee protocol."""
        super().update_metrics(preds, batch)
        if not self.events:
            return
        rep = self.dataloader.dataset.rep
        h, w = batch["img"].shape[2:]
        scale = np.array([rep.width / w, rep.height / h] * 2, dtype=np.float32)
        for si, pred in enumerate(preds):
            rec, t = batch["recording"][si], batch["t_us"][si]
            gt = self._prepare_batch(si, batch)
            self._event_gt.setdefault(rec, []).append(_sensor_rows(gt["bboxes"], gt["cls"], None, t, scale))
            self._event_dt.setdefault(rec, []).append(_sensor_rows(pred["bboxes"], pred["cls"], pred["conf"], t, scale))

    def gather_stats(self) -> None:
        """Ultralytics' gathering of every DDP rank's statistics on rank 0, and the event boxes with them (each rank
        validates a shard; the Prophesee protocol is scored on rank 0 over all of them)."""
        super().gather_stats()
        if not (self.events and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts = [None] * dist.get_world_size() if RANK == 0 else None
        dist.gather_object((self._event_gt, self._event_dt), parts, dst=0)
        if RANK == 0:
            self._event_gt, self._event_dt = {}, {}
            for gt, dt in parts:
                for mine, theirs in ((self._event_gt, gt), (self._event_dt, dt)):
                    for rec, boxes in theirs.items():
                        mine.setdefault(rec, []).extend(boxes)

    def get_stats(self) -> dict[str, Any]:  # noqa: D102
        stats = super().get_stats()
        if self.events:
            from ems_yolo.events.evaluation import evaluate_detections

            recs = sorted(self._event_gt)
            gt = [concat_boxes(self._event_gt[r]) for r in recs]
            dt = [concat_boxes(self._event_dt.get(r, [])) for r in recs]
            cache = self.dataloader.dataset.cache
            rep = cache.representation  # the input resolution: the sensor's, or RVT's halved 1 Mpx one
            p = cache.protocol
            self.prophesee_stats = evaluate_detections(gt, dt, p, p.downsample > 1, rep.height, rep.width)
            self.metrics.prophesee = self.prophesee_stats
        return stats

    def print_results(self) -> None:
        """Ultralytics' table; on event data followed by both protocols, clearly labelled."""
        super().print_results()
        if self.events and self.prophesee_stats is not None:
            g, m, p = self.prophesee_stats, self.metrics.box, self.dataloader.dataset.cache.protocol
            scale = p.downsample
            LOGGER.info(
                f"{p.name} per-frame YOLO-style mAP (protocol B, as reported in the EMS-YOLO paper): "
                f"mAP50 {m.map50:.4f}, mAP50-95 {m.map:.4f}\n"
                f"{p.name} Prophesee/RVT protocol (protocol A: first {p.skip_us / 1e6:g} s skipped, boxes >= "
                f"{p.min_diag / scale:g} px diagonal and {p.min_side / scale:g} px sides at "
                f"{p.input_width}x{p.input_height}, +-{p.time_tol_us // 1000} ms matching, pycocotools): "
                f"mAP50-95 {g['mAP50-95']:.4f}, mAP50 {g['mAP50']:.4f}, mAP75 {g['mAP75']:.4f} over {g['images']} "
                "labelled timestamps"
            )

    def __call__(self, trainer=None, model=None):
        """Ultralytics' validation; with `save_json=True` and no detection at all (where Ultralytics writes no JSON
        and scores nothing) an empty predictions.json and a pycocotools mAP of 0 are reported."""
        self._model = None if trainer is not None else model  # the PyTorch model of a stand-alone validation
        stats = super().__call__(trainer, model)
        if self.args.save_json and not self.jdict and not self.training and (self.is_coco or self.gdict):
            atomic_write_text(self.save_dir / "predictions.json", "[]")
            self.coco_stats = {"coco/mAP50-95": 0.0, "coco/mAP50": 0.0}
            self.metrics.coco = self.coco_stats
            LOGGER.warning(f"no detections at conf={self.args.conf}: empty {self.save_dir / 'predictions.json'}, "
                           "pycocotools: mAP50-95 0.0000, mAP50 0.0000")
        return stats

    def coco_evaluate(self, stats: dict[str, Any], pred_json, anno_json, iou_types="bbox", suffix="Box"):
        """Score the saved COCO-format predictions with pycocotools and add `coco/mAP50-95`, `coco/mAP50`."""
        if not (self.args.save_json and self.jdict and (self.is_coco or self.gdict)):
            return stats
        if isinstance(anno_json, Path) and not anno_json.is_file():
            LOGGER.warning(f"pycocotools evaluation skipped: {anno_json} not found")
            return stats
        img_ids = None if self.gdict else [int(Path(x).stem) for x in self.dataloader.dataset.im_files]
        gt = anno_json if isinstance(anno_json, dict) else json.loads(Path(anno_json).read_text())
        preds = pred_json if isinstance(pred_json, list) else json.loads(Path(pred_json).read_text())
        LOGGER.info("\nEvaluating pycocotools mAP...")
        ap, summary = coco_bbox_eval(gt, preds, img_ids)
        LOGGER.info(summary.rstrip())
        self.coco_stats = {"coco/mAP50-95": float(ap[0]), "coco/mAP50": float(ap[1])}
        self.metrics.coco = self.coco_stats
        if self.is_coco and not self.training:  # the official protocol replaces the approximation for COCO itself
            stats["metrics/mAP50(B)"], stats["metrics/mAP50-95(B)"] = ap[1], ap[0]
            stats["fitness"] = 0.9 * ap[0] + 0.1 * ap[1]
        LOGGER.info(f"pycocotools: mAP50-95 {ap[0]:.4f}, mAP50 {ap[1]:.4f}")
        return stats
