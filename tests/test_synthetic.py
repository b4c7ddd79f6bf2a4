"""Tests for `ems_yolo.events.synthetic`: file layout, readable events and boxes, label rules, caching, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ems_yolo.events import BBOX_DTYPE_V1, read_bbox, read_dat, read_dat_header
from ems_yolo.events.synthetic import make_synthetic_gen1

SMALL = dict(n_train=2, n_val=1, n_test=1, duration_s=1.5, fps=500, seed=0)
TINY = dict(n_train=1, n_val=0, n_test=1, duration_s=1.0, fps=500, seed=3)
LABEL_TIMES = {750_000, 1_000_000, 1_250_000, 1_500_000}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_gen1(tmp_path_factory.mktemp("synth") / "gen1", **SMALL)


def _recordings(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (read_dat(dat), read_bbox(dat.with_name(dat.name.replace("_td.dat", "_bbox.npy"))))
        for dat in sorted(root.glob("*/*_td.dat"))
    ]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_layout(dataset):
    names = {str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file()}
    expected = {".complete"} | {
        f"{split}/synth_{split}_{i:04d}{suffix}"
        for split, n in (("train", 2), ("val", 1), ("test", 1))
        for i in range(n)
        for suffix in ("_td.dat", "_bbox.npy")
    }
    assert names == expected
    assert json.loads((dataset / ".complete").read_text())["n_train"] == 2
    assert not list(dataset.parent.glob(".*tmp*"))


def test_events_are_gen1_like(dataset):
    for dat in dataset.glob("*/*_td.dat"):
        header = read_dat_header(dat)
        assert (header.width, header.height) == (304, 240)
        events = read_dat(dat)
        assert events.size > 10_000
        assert np.all(np.diff(events["t"]) >= 0)
        assert events["t"][0] >= 0 and events["t"][-1] <= 1_500_000
        assert events["x"].max() < 304 and events["y"].max() < 240
        assert set(np.unique(events["p"])) == {0, 1}


def test_boxes_follow_gen1_label_rules(dataset):
    classes = set()
    for npy in dataset.glob("*/*_bbox.npy"):
        assert np.load(npy).dtype == BBOX_DTYPE_V1
        boxes = read_bbox(npy)
        assert boxes.size > 0
        assert np.all(np.diff(boxes["t"]) >= 0)
        assert set(boxes["t"].tolist()) <= LABEL_TIMES
        x, y, w, h = boxes["x"], boxes["y"], boxes["w"], boxes["h"]
        assert np.all((x >= 0) & (y >= 0) & (x + w <= 304) & (y + h <= 240))
        assert np.all((w >= 10) & (h >= 10) & (w**2 + h**2 >= 30**2))
        assert np.all(boxes["class_confidence"] == 1.0)
        for ts in np.unique(boxes["t"]):
            tracks = boxes["track_id"][boxes["t"] == ts]
            assert len(set(tracks.tolist())) == tracks.size  # one box per object per label time
        classes |= set(boxes["class_id"].tolist())
    assert classes == {0, 1}


def test_events_concentrate_on_labelled_objects(dataset):
    inside = outside = inside_area = outside_area = 0
    for events, boxes in _recordings(dataset):
        for ts in np.unique(boxes["t"]):
            window = events[(events["t"] >= ts - 50_000) & (events["t"] < ts)]
            mask = np.zeros((240, 304), bool)
            for box in boxes[boxes["t"] == ts]:
                mask[int(box["y"]) : int(box["y"] + box["h"]), int(box["x"]) : int(box["x"] + box["w"])] = True
            hits = int(mask[window["y"], window["x"]].sum())
            inside, outside = inside + hits, outside + window.size - hits
            inside_area, outside_area = inside_area + int(mask.sum()), outside_area + int((~mask).sum())
    assert inside / inside_area > 5 * outside / outside_area


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_gen1(tmp_path / "a", **TINY)
    b = make_synthetic_gen1(tmp_path / "b", **TINY)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = make_synthetic_gen1(tmp_path / "c", **{**TINY, "seed": 4})
    assert (c / "train/synth_train_0000_bbox.npy").read_bytes() != (a / "train/synth_train_0000_bbox.npy").read_bytes()


def test_complete_dataset_is_reused_untouched(dataset):
    before = _snapshot(dataset)
    assert make_synthetic_gen1(dataset, **SMALL) == dataset
    assert _snapshot(dataset) == before


def test_incomplete_or_different_dataset_is_regenerated(tmp_path):
    root = make_synthetic_gen1(tmp_path / "ds", **TINY)
    reference = (root / "test/synth_test_0000_bbox.npy").read_bytes()

    (root / "test/synth_test_0000_bbox.npy").unlink()
    make_synthetic_gen1(root, **TINY)
    assert (root / "test/synth_test_0000_bbox.npy").read_bytes() == reference

    (root / ".complete").unlink()
    make_synthetic_gen1(root, **TINY)
    assert (root / ".complete").is_file()

    make_synthetic_gen1(root, **{**TINY, "n_test": 0})
    assert json.loads((root / ".complete").read_text())["n_test"] == 0
    assert not (root / "test").exists()  # no empty split folder (preprocessing refuses one)
    assert not list(tmp_path.glob(".*tmp*"))


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_synthetic_gen1(foreign, **TINY)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_root_under_ems_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMS_YOLO_HOME", str(tmp_path / "home"))
    root = make_synthetic_gen1(n_train=1, n_val=0, n_test=0, duration_s=0.75, seed=1)
    assert root.parent == (tmp_path / "home" / "datasets").resolve()
    assert root.name.startswith("gen1-synthetic-")
    assert (root / "train/synth_train_0000_td.dat").is_file()


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": -1}, {"n_val": 1.5}, {"fps": 30}, {"duration_s": 0.5}, {"seed": -2}, {"duration_s": float("nan")}],
)
def test_invalid_parameters(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_gen1(tmp_path / "x", **kwargs)
