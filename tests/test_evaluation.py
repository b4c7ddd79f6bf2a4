"""Tests for `ems_yolo.events.evaluation.evaluate_detections` (Prophesee / RVT protocol A) on synthetic recordings."""

from __future__ import annotations

import numpy as np
import pytest

from ems_yolo.events import BBOX_DTYPE, BBOX_DTYPE_V1, evaluate_detections

LABEL_TIMES = np.arange(750_000, 2_500_001, 250_000)  # every 250 ms after the first 0.5 s


def _boxes(rows: list[tuple]) -> np.ndarray:
    """v2 boxes from (t, x, y, w, h, class_id, score) tuples, sorted by t (stable)."""
    boxes = np.zeros(len(rows), dtype=BBOX_DTYPE)
    for i, (t, x, y, w, h, class_id, score) in enumerate(rows):
        boxes[i] = (t, x, y, w, h, class_id, i, score)
    return boxes[np.argsort(boxes["t"], kind="stable")]


def _gt(recordings: int = 3) -> list[np.ndarray]:
    """Per label time two cars and two pedestrians in separate cells of a 4 x 4 grid; all pass the size filter.

    The first car of every label is 30 x 32 px (COCO "small", area < 32²), the rest are "medium".
    """
    rng = np.random.default_rng(0)
    gt = []
    for _ in range(recordings):
        rows = []
        for t in LABEL_TIMES:
            cells = rng.permutation(16)[:4]
            for j, cell in enumerate(cells):
                w, h = (30.0, 32.0) if j == 0 else (float(rng.integers(36, 70)), float(rng.integers(36, 56)))
                x, y = 76 * (cell % 4) + 2.0, 60 * (cell // 4) + 2.0
                rows.append((int(t), x, y, w, h, j // 2, 1.0))
        gt.append(_boxes(rows))
    return gt


def _shifted(gt: list[np.ndarray], dt_us: int) -> list[np.ndarray]:
    out = []
    for boxes in gt:
        shifted = boxes.copy()
        shifted["t"] += dt_us
        out.append(shifted)
    return out


def test_gt_as_detections_is_perfect():
    gt = _gt()
    metrics = evaluate_detections(gt, [b.copy() for b in gt])
    assert metrics["mAP50-95"] == metrics["mAP50"] == metrics["mAP75"] == 1.0
    assert metrics["mAP_small"] == metrics["mAP_medium"] == 1.0
    assert metrics["mAP_large"] == 0.0  # no large GT: pycocotools' -1 is reported as 0
    assert metrics["images"] == 3 * len(LABEL_TIMES)
    assert metrics["gt_boxes"] == metrics["detections"] == 3 * len(LABEL_TIMES) * 4


def test_v1_input_is_accepted():
    gt = _gt(2)
    v1 = []
    for boxes in gt:
        old = np.zeros(boxes.size, dtype=BBOX_DTYPE_V1)
        old["ts"], old["confidence"] = boxes["t"], boxes["class_confidence"]
        for name in ("x", "y", "w", "h", "class_id", "track_id"):
            old[name] = boxes[name]
        v1.append(old)
    assert evaluate_detections(v1, gt) == evaluate_detections(gt, gt)


@pytest.mark.parametrize(
    "shift, expected", [(40_000, 1.0), (50_000, 1.0), (-50_000, 1.0), (50_001, 0.0), (100_000, 0.0)]
)
def test_time_tolerance_is_inclusive(shift, expected):
    gt = _gt()
    metrics = evaluate_detections(gt, _shifted(gt, shift))
    assert metrics["mAP50-95"] == metrics["mAP50"] == expected


def test_filters_apply_to_both_sides():
    gt = _gt()
    dt = []
    for boxes in gt:
        d = boxes.copy()
        d["class_confidence"] = 0.9
        dt.append(d)
    # Recording 0 gains a label at 520 ms (kept: t > 0.5 s) with an ordinary box and its detection ...
    extra_gt = [(520_000, 10.0, 10.0, 40.0, 40.0, 0, 1.0)]
    extra_dt = [(520_000, 10.0, 10.0, 40.0, 40.0, 0, 0.9)]
    # ... GT boxes the size filter drops, left undetected: 5 x 5, 40 x 8 (side < 10), 20 x 20 (diagonal < 30) ...
    t0 = int(LABEL_TIMES[0])
    extra_gt += [(t0, 150.0, 100.0, 5.0, 5.0, 0, 1.0), (t0, 150.0, 150.0, 40.0, 8.0, 1, 1.0),
                 (t0, 200.0, 200.0, 20.0, 20.0, 0, 1.0)]
    # ... and confident false detections the filters drop: one in the first 0.5 s (within 50 ms of the 520 ms
    # label) and a tiny one at a label time.
    extra_dt += [(480_000, 200.0, 100.0, 40.0, 40.0, 0, 1.0), (t0, 250.0, 10.0, 8.0, 8.0, 1, 1.0)]
    gt[0] = _boxes([tuple(b) for b in gt[0][["t", "x", "y", "w", "h", "class_id", "class_confidence"]]] + extra_gt)
    dt[0] = _boxes([tuple(b) for b in dt[0][["t", "x", "y", "w", "h", "class_id", "class_confidence"]]] + extra_dt)

    metrics = evaluate_detections(gt, dt)
    assert metrics["mAP50-95"] == metrics["mAP50"] == 1.0
    assert metrics["images"] == 3 * len(LABEL_TIMES) + 1
    assert metrics["gt_boxes"] == metrics["detections"] == 3 * len(LABEL_TIMES) * 4 + 1

    # The same data without the filters: the extra boxes become misses and false positives.
    unfiltered = evaluate_detections(gt, dt, skip_us=0, min_diag=0, min_side=0)
    assert unfiltered["gt_boxes"] == metrics["gt_boxes"] + 3
    assert unfiltered["mAP50"] < 1.0


def test_class_mismatch_scores_zero():
    gt = _gt()
    dt = [b.copy() for b in gt]
    for d in dt:
        d["class_id"] = 1 - d["class_id"]
    metrics = evaluate_detections(gt, dt)
    assert metrics["mAP50-95"] == metrics["mAP50"] == 0.0
    assert metrics["detections"] == metrics["gt_boxes"]


def test_half_detected_is_recall_limited():
    gt = _gt()
    # keep the first car and the first pedestrian of every label: recall 0.5 per class at precision 1
    dt = []
    for boxes in gt:
        keep = np.zeros(boxes.size, dtype=bool)
        for t in np.unique(boxes["t"]):
            for c in (0, 1):
                keep[np.flatnonzero((boxes["t"] == t) & (boxes["class_id"] == c))[0]] = True
        dt.append(boxes[keep])
    metrics = evaluate_detections(gt, dt)
    # COCO's 101-point precision is 1 at recall thresholds 0.00 .. 0.50 (51 points) and 0 above.
    expected = 51 / 101
    assert 0.0 < metrics["mAP50-95"] < 1.0
    assert metrics["mAP50-95"] == pytest.approx(expected)
    assert metrics["mAP50"] == pytest.approx(expected) and metrics["mAP75"] == pytest.approx(expected)


def test_unsorted_and_mismatched_inputs_raise():
    gt = _gt()
    bad = [b.copy() for b in gt]
    bad[1] = bad[1][::-1].copy()
    with pytest.raises(ValueError, match=r"ground truth of recording 1.*not sorted"):
        evaluate_detections(bad, gt)
    with pytest.raises(ValueError, match=r"detections of recording 1.*not sorted"):
        evaluate_detections(gt, bad)
    with pytest.raises(ValueError, match="3 recordings but dt has 2"):
        evaluate_detections(gt, gt[:2])
    wrong_class = [b.copy() for b in gt]
    wrong_class[0]["class_id"][0] = 2
    with pytest.raises(ValueError, match="class_id 2"):
        evaluate_detections(gt, wrong_class)


def test_empty_inputs_give_zeros():
    gt = _gt()
    empty = [np.zeros(0, dtype=BBOX_DTYPE) for _ in gt]
    aps = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")

    no_detections = evaluate_detections(gt, empty)
    assert all(no_detections[k] == 0.0 for k in aps)
    assert no_detections["images"] == 3 * len(LABEL_TIMES) and no_detections["detections"] == 0

    no_gt = evaluate_detections(empty, gt)
    assert all(no_gt[k] == 0.0 for k in aps) and no_gt["images"] == 0

    early = [b[b["t"] <= 500_000] for b in _shifted(gt, -1_000_000)]  # labels only in the skipped first 0.5 s
    assert all(b.size for b in early)
    filtered_out = evaluate_detections(early, early)
    assert all(filtered_out[k] == 0.0 for k in aps) and filtered_out["gt_boxes"] == 0

    assert evaluate_detections([], [])["images"] == 0
