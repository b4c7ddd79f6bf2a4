"""Built-in synthetic "shapes" detection dataset in Ultralytics YOLO format.

``ems-yolo train`` must work offline on a fresh machine, so the default dataset is generated locally instead of
downloaded: images of a few geometric shapes (the classes) with varied size, colour, rotation and texture, drawn over
cluttered backgrounds (gradients, low-frequency blotches, noise, thin lines and soft blobs that are not objects).

Generation is deterministic: image ``i`` of a split is drawn from ``numpy.random.default_rng((seed, split, i))`` and
saved as lossless PNG, so the same parameters give byte-identical files. Labels are exact: every object is rasterised
as a hard-edged mask and its box is the bounding box of the pixels of that object still visible in the final image
(after clipping at the border and occlusion by later objects). Placements that would leave an object, new or old,
with less than half of its area visible are rejected, so every drawn object is labelled and clearly visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml

from ems_yolo.cfg import ems_home
from ems_yolo.utils.checks import check_int
from ems_yolo.utils.files import build_folder_once

__all__ = ["CLASS_NAMES", "default_root", "held_out_image", "make_shapes_dataset", "write_held_out_video"]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

_GENERATOR_VERSION = 1  # bump whenever the rendering changes, so cached datasets are regenerated
_SPLITS = ("train", "val")
_SIZE_RANGE = (0.08, 0.45)  # object size (side of its unrotated bounding square) as a fraction of the image side
_MAX_OBJECTS = 6
_MIN_VISIBLE_FRACTION = 0.5  # of an object's full area that must stay visible (border clipping plus occlusion)
_MIN_VISIBLE_PIXELS = 12
_MIN_CONTRAST = 110.0  # Euclidean RGB distance between an object colour and the mean colour beneath it
_RING_HOLE = 0.55  # inner radius of a ring relative to its outer radius
_CROSS_ARM = 0.35  # half-width of a cross arm relative to the cross half-size
_SHIFT = 4  # fixed-point bits for sub-pixel cv2 drawing
_MARKER = ".complete"


def default_root() -> Path:
    """Return the dataset cache folder, ``$EMS_YOLO_HOME/datasets`` (EMS_YOLO_HOME defaults to ~/.cache/ems-yolo)."""
    return ems_home() / "datasets"


def make_shapes_dataset(
    root: str | Path | None = None, n_train: int = 256, n_val: int = 64, imgsz: int = 160, seed: int = 0
) -> Path:
    """Generate (once) the dataset and return the path of its data YAML.

    The dataset lives in ``<root>/shapes-<imgsz>px-<n_train>-<n_val>-s<seed>``. A complete folder (marker file
    ``.complete`` matching these parameters) is reused untouched; anything else is generated in a temporary sibling
    folder and renamed into place, so a half-written dataset is never used.
    """
    for name, value, minimum in (("n_train", n_train, 1), ("n_val", n_val, 1), ("imgsz", imgsz, 32), ("seed", seed, 0)):
        check_int(name, value, minimum)
    params = {
        "generator": _GENERATOR_VERSION,
        "imgsz": int(imgsz),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "seed": int(seed),
    }
    root = Path(root).expanduser() if root is not None else default_root()
    final = root.resolve() / f"shapes-{imgsz}px-{n_train}-{n_val}-s{seed}"
    yaml_path = final / "data.yaml"
    if _is_complete(final, params):
        if yaml.safe_load(yaml_path.read_text())["path"] != str(final):  # folder was moved: re-point its YAML
            _write_yaml(final, final)
        return yaml_path

    build_folder_once(final, lambda f: _is_complete(f, params), lambda tmp: _write_dataset(tmp, final, params))
    return yaml_path


def held_out_image(i: int, imgsz: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image `i` of a third split drawn as the built-in dataset's but used neither in training nor in validation:
    the uint8 BGR image and its objects as `(cls, x0, y0, x1, y1)` pixel boxes (x1, y1 exclusive)."""
    image, labels, _ = _render(np.random.default_rng((seed, len(_SPLITS), i)), imgsz)
    return image, labels


def write_held_out_video(out: str | Path, frames: int = 40, fps: int = 4, imgsz: int = 160, seed: int = 0) -> Path:
    """Write `frames` images drawn as the built-in dataset's, but from a third split that neither training nor
    validation uses, as a video (.mp4: mp4v, otherwise MJPG): what a model trained on the built-in data has not
    seen, to predict on."""
    check_int("frames", frames, 1)
    out = Path(out)
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.suffix.lower() == ".mp4" else "MJPG"))
    writer = cv2.VideoWriter(str(out), fourcc, fps, (imgsz, imgsz))
    if not writer.isOpened():
        raise OSError(f"{out}: OpenCV cannot write this video file")
    try:
        for i in range(frames):
            writer.write(held_out_image(i, imgsz, seed)[0])
    finally:
        writer.release()
    return out


def _is_complete(folder: Path, params: dict) -> bool:
    """Whether ``folder`` holds a finished dataset generated with ``params``."""
    try:
        return json.loads((folder / _MARKER).read_text()) == params and (folder / "data.yaml").is_file()
    except (OSError, ValueError):
        return False


def _write_yaml(folder: Path, final: Path) -> None:
    """Write ``folder/data.yaml`` pointing at the dataset's final location ``final``."""
    data = {
        "path": str(final),
        "train": "images/train",
        "val": "images/val",
        "nc": len(CLASS_NAMES),
        "names": dict(enumerate(CLASS_NAMES)),
    }
    (folder / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _write_dataset(folder: Path, final: Path, params: dict) -> None:
    """Render every image and label into ``folder``; the marker file is written last."""
    for split_id, split in enumerate(_SPLITS):
        img_dir, lbl_dir = folder / "images" / split, folder / "labels" / split
        img_dir.mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        for i in range(params[f"n_{split}"]):
            image, labels, _ = _render(np.random.default_rng((params["seed"], split_id, i)), params["imgsz"])
            if not cv2.imwrite(str(img_dir / f"{i:06d}.png"), image):
                raise OSError(f"could not write {img_dir / f'{i:06d}.png'}")
            (lbl_dir / f"{i:06d}.txt").write_text("".join(_format_label(row, params["imgsz"]) for row in labels))
    _write_yaml(folder, final)
    (folder / _MARKER).write_text(json.dumps(params, sort_keys=True))


def _format_label(row: np.ndarray, imgsz: int) -> str:
    """Turn a ``(cls, x0, y0, x1, y1)`` pixel box (x1, y1 exclusive) into a normalised YOLO label line."""
    cls, x0, y0, x1, y1 = (int(v) for v in row)
    cx, cy, w, h = (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz, (x1 - x0) / imgsz, (y1 - y0) / imgsz
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n"


def _shape_mask(cls: int, cx: float, cy: float, size: float, angle: float, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise one object of class ``cls`` (hard edges, no anti-aliasing) into a boolean mask of ``shape``.

    ``size`` is the side of the object's unrotated bounding square and ``angle`` its rotation in radians.
    """
    mask = np.zeros(shape, np.uint8)
    r = size / 2
    scale = 1 << _SHIFT
    center = (round(cx * scale), round(cy * scale))
    name = CLASS_NAMES[cls]
    if name in ("circle", "ring"):
        cv2.circle(mask, center, round(r * scale), 1, -1, cv2.LINE_8, _SHIFT)
        if name == "ring":
            cv2.circle(mask, center, round(r * _RING_HOLE * scale), 0, -1, cv2.LINE_8, _SHIFT)
        return mask.astype(bool)
    if name == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64)
    elif name == "triangle":  # equilateral, inscribed in the circle of radius r
        a = np.deg2rad([-90.0, 30.0, 150.0])
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    else:  # cross
        w = _CROSS_ARM
        pts = np.array(
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        )
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
    cv2.fillPoly(mask, [np.round(pts * scale).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Cluttered ``n x n`` float32 BGR background: gradient, blotches, thin lines, soft blobs and pixel noise."""
    c0, c1 = rng.uniform(20, 235, (2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    t = x * np.cos(theta) + y * np.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    img = (c0 + t[..., None] * (c1 - c0)).astype(np.float32)
    k = int(rng.integers(2, 6))
    img += cv2.resize(rng.normal(0, 25, (k, k, 3)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 7))):  # thin distractor lines
        p0, p1 = np.round(rng.uniform(0, n, (2, 2))).astype(int)
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), tuple(rng.uniform(0, 255, 3).tolist()), 1)
    for _ in range(int(rng.integers(0, 4))):  # soft, semi-transparent elongated blobs
        layer = np.zeros((n, n), np.float32)
        axes = np.round(rng.uniform(0.02, 0.07, 2) * n).astype(int) + 1
        center = tuple(map(int, rng.integers(0, n, 2)))
        cv2.ellipse(layer, center, tuple(map(int, axes)), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), float(axes.min()) / 2 + 0.5)[..., None] * rng.uniform(0.3, 0.6)
        img = img * (1 - layer) + layer * rng.uniform(0, 255, 3).astype(np.float32)
    return img + rng.normal(0, rng.uniform(0, 12), img.shape).astype(np.float32)


def _pick_colour(rng: np.random.Generator, beneath: np.ndarray) -> np.ndarray:
    """A random colour that contrasts with ``beneath`` (the mean colour under the object), best of 8 candidates."""
    cand = rng.uniform(0, 255, (8, 3))
    dist = np.linalg.norm(cand - beneath, axis=1)
    ok = dist >= _MIN_CONTRAST
    return cand[int(np.argmax(ok)) if ok.any() else int(np.argmax(dist))]


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, size: float) -> None:
    """Fill the ``mask`` pixels of ``img`` with a random solid, striped, checkered or noisy texture."""
    ys, xs = np.nonzero(mask)
    beneath = img[ys, xs].mean(0)
    c1 = _pick_colour(rng, beneath)
    texture = int(rng.integers(4))
    if texture == 0:  # solid
        colours = np.broadcast_to(c1, (len(ys), 3))
    elif texture == 3:  # noise around the base colour
        colours = c1 + rng.normal(0, 30, (len(ys), 3))
    else:  # two-colour stripes or checker at a random angle
        c2 = _pick_colour(rng, beneath)
        a = rng.uniform(0, np.pi)
        u = xs * np.cos(a) + ys * np.sin(a)
        if texture == 1:
            sel = np.floor(u / rng.uniform(2, max(3, size / 3))) % 2
        else:
            v = -xs * np.sin(a) + ys * np.cos(a)
            cell = rng.uniform(2, max(3, size / 4))
            sel = (np.floor(u / cell) + np.floor(v / cell)) % 2
        colours = np.where(sel[:, None] > 0, c2, c1)
    img[ys, xs] = colours


def _render(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image.

    Returns the uint8 BGR image, the labels as an int array of ``(cls, x0, y0, x1, y1)`` pixel boxes (x1, y1
    exclusive) and the ``owner`` map giving, per pixel, the index of the object visible there (-1 for background).
    """
    img = _background(rng, imgsz)
    owner = np.full((imgsz, imgsz), -1, np.int16)
    classes: list[int] = []
    full_areas: list[int] = []
    pad = int(np.ceil(_SIZE_RANGE[1] * imgsz / np.sqrt(2))) + 2  # room for the largest object centred at a border
    canvas = (imgsz + 2 * pad, imgsz + 2 * pad)
    target = int(rng.integers(1, _MAX_OBJECTS + 1))
    for _ in range(10 * target):
        if len(classes) == target:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = imgsz * rng.uniform(*_SIZE_RANGE)
        cx, cy = rng.uniform(0, imgsz, 2)
        full = _shape_mask(cls, cx + pad, cy + pad, size, rng.uniform(0, 2 * np.pi), canvas)
        area = int(np.count_nonzero(full))
        mask = full[pad:-pad, pad:-pad]
        if np.count_nonzero(mask) < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * area):
            continue
        if classes:  # objects drawn earlier must stay visible enough once this one covers them
            n = len(classes)
            drawn = owner >= 0
            remaining = np.bincount(owner[drawn], minlength=n) - np.bincount(owner[mask & drawn], minlength=n)
            if np.any(remaining < np.maximum(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * np.array(full_areas))):
                continue
        _paint(rng, img, mask, size)
        owner[mask] = len(classes)
        classes.append(cls)
        full_areas.append(area)
    img += rng.normal(0, rng.uniform(0, 6), img.shape).astype(np.float32)
    labels = np.zeros((len(classes), 5), np.int64)
    for k, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == k)
        labels[k] = (cls, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, owner
