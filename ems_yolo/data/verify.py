"""Loud checks of a frame dataset split before Ultralytics caches it.

Ultralytics skips a sample whose image or label it cannot use, with a warning that names the image but not the
label line (one bad line drops every box of the image) and, for an empty or non-image file, an unrelated reason
("No module named 'pi_heif'"). ems-yolo refuses such data instead, naming the file, the line and what was expected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
from PIL import Image

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.data.utils import IMG_FORMATS, VID_FORMATS, exif_size, img2label_paths
from ultralytics.utils import patches

# Pillow's own `Image.open`: Ultralytics' patched one answers a file Pillow cannot identify by looking for the HEIF
# plugin ("No module named 'pi_heif'"), which is not what is wrong with a text file named .webp.
PIL_OPEN = getattr(patches, "_image_open", Image.open)

# Leading bytes of the common image formats (others are only checked to be non-empty).
SIGNATURES = {"jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "bmp": (b"BM",)}
LABEL_FORM = "'class x_center y_center width height' (or a polygon 'class x1 y1 x2 y2 ...')"
MIN_IMAGE_SIDE = 10  # pixels; Ultralytics drops smaller images


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (with or without a byte-order mark), as Ultralytics reads labels and image lists; other
    bytes are an error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8, expected {what} "
                         "as UTF-8 text") from None


def image_files(img_path: str | Path | list) -> list[Path]:
    """The images of a split as Ultralytics lists them: a folder (recursive) or a text file of paths."""
    out: list[Path] = []
    for p in img_path if isinstance(img_path, list) else [img_path]:
        p = Path(p)
        if p.is_dir():
            out += [f for f in p.rglob("*.*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file():
            lines = read_text(p, "a list of image paths").strip().splitlines()
            out += [Path(x.replace("./", f"{p.parent}{os.sep}", 1) if x.startswith("./") else x) for x in lines]
    return sorted(out)


def check_image_file(path: Path) -> None:
    """An image file must be non-empty, for JPEG/PNG/BMP start like one, and be a whole image (PIL's verify) of at
    least MIN_IMAGE_SIDE pixels a side, as Ultralytics requires (it would drop the image with a warning)."""
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
    try:
        with PIL_OPEN(path) as im:
            im.verify()
            width, height = exif_size(im)
    except Exception as e:  # PIL reports a bad file with many types (OSError, SyntaxError, ValueError, ...)
        reason = " ".join(str(e).replace(f"'{path}'", "").replace(str(path), "").split()) or type(e).__name__
        raise ValueError(f"{path}: cannot be read as an image ({reason}), expected a whole image file") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{path}: image of {width}x{height} pixels, expected at least {MIN_IMAGE_SIDE} pixels a side")


def check_label_file(path: Path, nc: int) -> None:
    """Every line of a YOLO label file: a class in 0..nc-1 and normalised coordinates."""
    text = read_text(path, "YOLO labels")
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
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{where}: non-finite field in {line.strip()!r}, expected {LABEL_FORM} as finite numbers")
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
