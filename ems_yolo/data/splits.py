"""One dataset split, whatever it holds: an event cache becomes an `EventDetectionDataset`; an image split is
checked (`verify_image_split`) and then built by Ultralytics' own builder (the trainer's, validator's or energy's)."""

from __future__ import annotations

from collections.abc import Callable

from ems_yolo.data.events import build_event_dataset, is_event_split
from ems_yolo.data.verify import verify_image_split


def build_split_dataset(img_path, args, data: dict, mode: str, frames: Callable[[], object]):
    """The dataset of split `img_path`: events from its cache, or `frames()` after the image and label checks."""
    if is_event_split(img_path):
        return build_event_dataset(img_path, args, mode, data)
    verify_image_split(img_path, data["nc"])
    return frames()
