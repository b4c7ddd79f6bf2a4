"""Loud checks of a frame dataset split before Ultralytics caches it.

Ultralytics skips a sample whose image or label it cannot use, with a warning that names the image but not the
label line (one bad line drops every box of the image) and, for an empty or non-image file, an unrelated reason
("No module named 'pi_heif'"). ems-yolo refuses such data instead, naming the file, the line and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.data.utils import IMG_FORMATS, VID_FORMATS, img2label_paths

# Leading bytes of the common image formats (others are only checked to be non-empty).
SIGNATURES = {"jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "bmp": (b"BM",)}
LABEL_FORM = "'class x_center y_center width height' (or a polygon 'class x1 y1 x2 y2 ...')"


def image_files(img_path: str | Path | list) -> list[Path]:
    """The images of a split as Ultralytics lists them: a folder (recursive) or a text file of paths."""
    out: list[Path] = []
    for p in img_path if isinstance(img_path, list) else [img_path]:
        p = Path(p)
        if p.is_dir():
            out += [f for f in p.rglob("*.*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file():
            lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
            out += [Path(x.replace("./", f"{p.parent}{os.sep}", 1) if x.startswith("./") else x) for x in lines]
    return sorted(out)


def check_image_file(path: Path) -> None:
    """An image file must be non-empty and, for JPEG/PNG/BMP, start like one."""
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise FileNotFoundError(f"{path}: image listed in the dataset not found")
    if size == 0:
        raise ValueError(f"{path}: empty file, expected an image")
    signatures = SIGNATURES.get(path.suffix[1:].lower())
    if signatures:
        with path.open("rb") as f:
            head = f.read(8)
        if not head.startswith(signatures):
            raise ValueError(f"{path}: not a {path.suffix[1:].upper()} image (starts with {head[:8]!r}), expected a "
                             "readable image")


def check_label_file(path: Path, nc: int) -> None:
    """Every line of a YOLO label file: a class in 0..nc-1 and normalised coordinates."""
    text = path.read_text(encoding="utf-8-sig")
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if not (len(fields) == 5 or len(fields) >= 7 and len(fields) % 2 == 1):
            raise ValueError(f"{where}: {len(fields)} fields {line.strip()!r}, expected {LABEL_FORM}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{where}: non-numeric field in {line.strip()!r}, expected {LABEL_FORM}") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise ValueError(f"{where}: class {fields[0]}, expected an integer in 0..{nc - 1} (the dataset has "
                             f"{nc} classes)")
        if not all(0.0 <= v <= 1.0 for v in values[1:]):
            raise ValueError(f"{where}: coordinates {' '.join(fields[1:])} outside [0, 1], expected coordinates "
                             "normalised by the image size")


def verify_image_split(img_path: str | Path | list, nc: int) -> None:
    """Check every image and label file of a split; the first problem is an error naming its file (and line)."""
    images = image_files(img_path)
    for image, label in zip(images, img2label_paths([str(i) for i in images])):
        check_image_file(image)
        if os.path.isfile(label):
            check_label_file(Path(label), nc)


def check_media_source(source) -> None:
    """A single image or video file given as a prediction source must be readable (Ultralytics would warn and
    predict nothing); folders, globs, streams and arrays are left to Ultralytics."""
    if not isinstance(source, (str, Path)) or not Path(source).is_file():
        return
    path = Path(source)
    kind = path.suffix[1:].lower()
    if kind in IMG_FORMATS:
        check_image_file(path)
        if cv2.imread(str(path)) is None:
            raise ValueError(f"{path}: cannot be decoded as an image (OpenCV), expected a readable image")
    elif kind in VID_FORMATS:
        cap = cv2.VideoCapture(str(path))
        ok = cap.isOpened() and cap.read()[0]
        cap.release()
        if not ok:
            raise ValueError(f"{path}: cannot be read as a video (OpenCV), expected a video file")
