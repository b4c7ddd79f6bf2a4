"""Argument checks and normalisation shared across the package."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value: object, minimum: int, why: str = "") -> int:
    """Return `value` as int if it is an integer (not a bool) >= minimum, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")
    return int(value)


def image_hw(imgsz: int | list | tuple) -> tuple[int, int]:
    """(h, w) of an image size given as an int or an [h, w] pair."""
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))
