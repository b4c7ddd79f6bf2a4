"""Argument checks and normalisation shared across the package."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def check_int(name: str, value: object, minimum: int, why: str = "") -> int:
    """Return `value` as int if it is an integer (not a bool) >= minimum, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")
    return int(value)


def image_hw(imgsz: int | list | tuple) -> tuple[int, int]:
    """(h, w) of an image size given as an int or an [h, w] pair."""
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))


def check_exported_model(path: Path) -> None:
    """An exported model given as model= must be one: an .onnx file an ONNX protobuf with a graph, a .torchscript
    file a TorchScript (zip) archive; other files are left to their loaders."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            import onnx
        except ImportError:  # Ultralytics' loader says what to install
            return
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as e:  # protobuf's DecodeError and friends
            raise ValueError(f"{path}: not an ONNX model ({' '.join(str(e).split())}), expected a file written by "
                             "'ems-yolo export format=onnx'") from None
        if not graph.node or not graph.output:
            raise ValueError(f"{path}: ONNX file without a model graph, expected a file written by 'ems-yolo export "
                             "format=onnx'")
    elif suffix == ".torchscript" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a TorchScript archive, expected a file written by 'ems-yolo export "
                         "format=torchscript'")
