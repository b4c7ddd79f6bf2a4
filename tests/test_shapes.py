"""Tests for the built-in synthetic shapes dataset (ems_yolo.data.shapes)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

# Keep ultralytics (imported lazily below) off the network and out of the user's config folder.
os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ems-yolo-test-cfg-"))

from ems_yolo.data import shapes  # noqa: E402
from ems_yolo.data.shapes import CLASS_NAMES, default_root, make_shapes_dataset  # noqa: E402

SMALL = {"n_train": 8, "n_val": 4, "imgsz": 64, "seed": 3}


def _files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every image and label file under a dataset folder."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for sub in ("images", "labels")
        for p in sorted((folder / sub).rglob("*"))
        if p.is_file()
    }


def _read_labels(folder: Path) -> list[np.ndarray]:
    """All label files of a dataset, each as an (n, 5) float array."""
    out = []
    for p in sorted((folder / "labels").rglob("*.txt")):
        rows = [line.split() for line in p.read_text().splitlines()]
        assert all(len(r) == 5 for r in rows), p
        out.append(np.array(rows, dtype=float).reshape(-1, 5))
    return out


def test_layout_and_yaml(tmp_path):
    yaml_path = make_shapes_dataset(tmp_path, **SMALL)
    folder = tmp_path.resolve() / "shapes-64px-8-4-s3"
    assert yaml_path == folder / "data.yaml"
    data = yaml.safe_load(yaml_path.read_text())
    assert data == {
        "path": str(folder),
        "train": "images/train",
        "val": "images/val",
        "nc": len(CLASS_NAMES),
        "names": dict(enumerate(CLASS_NAMES)),
    }
    assert 4 <= len(CLASS_NAMES) <= 6
    for split, n in (("train", 8), ("val", 4)):
        names = [f"{i:06d}" for i in range(n)]
        assert sorted(p.stem for p in (folder / "images" / split).iterdir()) == names
        assert sorted(p.name for p in (folder / "labels" / split).iterdir()) == [f"{s}.txt" for s in names]
    assert json.loads((folder / ".complete").read_text())["imgsz"] == 64
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


def test_deterministic_across_roots(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", **SMALL).parent
    b = make_shapes_dataset(tmp_path / "b", **SMALL).parent
    files = _files(a)
    assert len(files) == 2 * (8 + 4)
    assert files == _files(b)
    assert (a / ".complete").read_bytes() == (b / ".complete").read_bytes()
    c = make_shapes_dataset(tmp_path / "c", **{**SMALL, "seed": 4}).parent
    assert _files(c) != files  # the seed matters
    train, val = (a / "images" / s / "000000.png" for s in ("train", "val"))
    assert train.read_bytes() != val.read_bytes()  # splits are drawn independently


def test_labels_well_formed_and_all_classes(tmp_path):
    folder = make_shapes_dataset(tmp_path, n_train=24, n_val=8, imgsz=96, seed=0).parent
    labels = _read_labels(folder)
    assert len(labels) == 32
    seen = set()
    for lab in labels:
        assert 1 <= len(lab) <= 6
        cls, cx, cy, w, h = lab.T
        assert np.all(cls == np.round(cls)) and np.all((cls >= 0) & (cls < len(CLASS_NAMES)))
        assert np.all((w > 0) & (h > 0))
        eps = 1e-6
        assert np.all(cx - w / 2 >= -eps) and np.all(cx + w / 2 <= 1 + eps)
        assert np.all(cy - h / 2 >= -eps) and np.all(cy + h / 2 <= 1 + eps)
        seen.update(cls.astype(int).tolist())
    assert seen == set(range(len(CLASS_NAMES)))
    sizes = np.concatenate([np.maximum(lab[:, 3], lab[:, 4]) for lab in labels])
    assert sizes.min() < 0.15 and sizes.max() > 0.35  # small and large objects


def test_files_match_render_and_boxes_are_tight(tmp_path):
    """Saved files equal a re-render, and each label is the bounding box of that object's visible pixels."""
    import cv2

    folder = make_shapes_dataset(tmp_path, **SMALL).parent
    for split_id, split in enumerate(("train", "val")):
        for i in range(SMALL[f"n_{split}"]):
            image, labels, owner = shapes._render(np.random.default_rng((SMALL["seed"], split_id, i)), 64)
            assert np.array_equal(cv2.imread(str(folder / "images" / split / f"{i:06d}.png")), image)
            lines = (folder / "labels" / split / f"{i:06d}.txt").read_text().splitlines()
            assert len(lines) == len(labels) == owner.max() + 1
            for k, (line, row) in enumerate(zip(lines, labels)):
                ys, xs = np.nonzero(owner == k)
                assert len(xs) >= shapes._MIN_VISIBLE_PIXELS
                assert tuple(row) == (row[0], xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                cls, cx, cy, w, h = map(float, line.split())
                box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * 64
                np.testing.assert_allclose(box, row[1:], atol=1e-3)
                assert int(cls) == row[0]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_shape_masks_have_expected_geometry(name):
    """An unrotated object rasterises to its analytic extent and a class-specific silhouette."""
    cls, n, c, size = CLASS_NAMES.index(name), 100, 50.0, 60.0
    r = size / 2
    mask = shapes._shape_mask(cls, c, c, size, 0.0, (n, n))
    ys, xs = np.nonzero(mask)
    x0, x1 = (-r * np.sqrt(3) / 2, r * np.sqrt(3) / 2) if name == "triangle" else (-r, r)
    y0, y1 = (-r, r / 2) if name == "triangle" else (-r, r)
    np.testing.assert_allclose([xs.min(), xs.max() + 1, ys.min(), ys.max() + 1], np.add([x0, x1, y0, y1], c), atol=1.5)
    centre, corner, arm = mask[50, 50], mask[50 + 27, 50 + 27], mask[50, 50 + 27]
    expected = {  # (centre filled, near-corner filled, arm tip filled)
        "circle": (True, False, True),
        "square": (True, True, True),
        "triangle": (True, False, False),
        "cross": (True, False, True),
        "ring": (False, False, True),
    }[name]
    assert (bool(centre), bool(corner), bool(arm)) == expected


def test_reuse_does_not_rewrite(tmp_path):
    yaml_path = make_shapes_dataset(tmp_path, **SMALL)
    folder = yaml_path.parent
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert make_shapes_dataset(tmp_path, **SMALL) == yaml_path
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps


def test_moved_dataset_yaml_is_repointed(tmp_path):
    old = make_shapes_dataset(tmp_path / "old", **SMALL).parent
    new = tmp_path / "new" / old.name
    shutil.copytree(old, new)
    png = new / "images" / "train" / "000000.png"
    stamp = png.stat().st_mtime_ns
    yaml_path = make_shapes_dataset(tmp_path / "new", **SMALL)
    assert yaml.safe_load(yaml_path.read_text())["path"] == str(new.resolve())
    assert png.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["no_marker", "stale_marker"])
def test_incomplete_folder_is_regenerated(tmp_path, damage):
    reference = _files(make_shapes_dataset(tmp_path / "ref", **SMALL).parent)
    folder = make_shapes_dataset(tmp_path / "x", **SMALL).parent
    marker = folder / ".complete"
    if damage == "no_marker":
        marker.unlink()
    else:
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "generator": -1}))
    (folder / "images" / "train" / "000001.png").unlink()
    (folder / "labels" / "val" / "000000.txt").write_text("garbage\n")
    (folder / "images" / "train" / "stray.png").write_bytes(b"x")
    make_shapes_dataset(tmp_path / "x", **SMALL)
    assert _files(folder) == reference
    assert shapes._is_complete(folder, json.loads(marker.read_text()))
    assert [p.name for p in (tmp_path / "x").iterdir()] == [folder.name]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"imgsz": 31}, "imgsz"),
        ({"imgsz": 64.0}, "imgsz"),
        ({"n_train": True}, "n_train"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_shapes_dataset(tmp_path, **{**SMALL, **kwargs})
    assert not any(tmp_path.iterdir())


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EMS_YOLO_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "datasets"
    assert make_shapes_dataset(**SMALL).parent.parent == (tmp_path / "home" / "datasets").resolve()
    monkeypatch.delenv("EMS_YOLO_HOME")
    assert default_root() == Path.home() / ".cache" / "ems-yolo" / "datasets"


def test_ultralytics_accepts_yaml(tmp_path, monkeypatch):
    from ultralytics.data import utils as data_utils

    monkeypatch.setattr(data_utils, "check_font", lambda *args, **kwargs: None)  # would download Arial.ttf
    yaml_path = make_shapes_dataset(tmp_path, **SMALL)
    data = data_utils.check_det_dataset(str(yaml_path))
    assert data["nc"] == len(CLASS_NAMES)
    assert data["names"] == dict(enumerate(CLASS_NAMES))
    assert Path(data["train"]) == yaml_path.parent / "images" / "train"
    assert Path(data["val"]) == yaml_path.parent / "images" / "val"
