"""AutoAnchor: best possible recall, re-fitting when the anchors do not fit the data, and the trainer hook."""

import numpy as np
import pytest
import torch

from ems_yolo.engine.autoanchor import bpr, check_anchors, fit_anchors, label_sizes
from ems_yolo.nn import EMSDetectionModel


class Labels:
    """A dataset stand-in: Ultralytics-style labels on 100 x 200 (h x w) images."""

    def __init__(self, wh_norm: np.ndarray):
        self.labels = [{"shape": (100, 200), "bboxes": np.c_[np.full((len(wh_norm), 2), 0.5), wh_norm]}]


def test_bpr_counts_boxes_within_the_ratio_limit():
    anchors = np.array([[10.0, 10.0]])
    wh = np.array([[10, 10], [39, 39], [41, 10], [2, 10]], float)
    assert bpr(wh, anchors, 4.0) == pytest.approx(0.5)  # 41/10 and 10/2 exceed the limit of 4


def test_label_sizes_letterbox_to_imgsz():
    wh = label_sizes(Labels(np.array([[0.5, 0.5]])), 320)  # 100 x 200 image -> 160 x 320 letterboxed
    np.testing.assert_allclose(wh, [[160.0, 80.0]])


def test_fit_anchors_recalls_clustered_sizes():
    rng = np.random.default_rng(0)
    wh = np.concatenate([rng.normal(c, 1.0, (50, 2)) for c in (4, 12, 40, 90, 150, 220)]).clip(2)
    anchors = fit_anchors(wh, 6, 4.0)
    assert anchors.shape == (6, 2) and np.all(np.diff(anchors.prod(1)) >= 0)
    assert bpr(wh, anchors, 4.0) == 1.0


def test_check_anchors_replaces_bad_anchors_and_keeps_good_ones(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2), verbose=False)
    before = model.model[-1].anchor_grid.clone()
    tiny_boxes = Labels(np.full((40, 2), 0.01) + np.random.default_rng(0).random((40, 2)) * 0.005)  # ~2-3 px
    assert check_anchors(model, tiny_boxes, 320)
    after = model.model[-1].anchor_grid * model.model[-1].stride.view(-1, 1, 1)
    assert not torch.equal(before, model.model[-1].anchor_grid)
    assert bpr(label_sizes(tiny_boxes, 320), after.view(-1, 2).numpy(), 4.0) > 0.98
    same = Labels(np.array([[23 / 320, 27 / 160]] * 10))  # identical boxes re-fit without a zero spread
    assert check_anchors(model, same, 320)
    fresh = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2), verbose=False)
    kept = fresh.model[-1].anchor_grid.clone()
    assert not check_anchors(fresh, same, 320)  # 23 x 27 is one of the COCO anchors: nothing to change
    assert torch.equal(kept, fresh.model[-1].anchor_grid)
