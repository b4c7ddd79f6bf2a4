"""EventDetectionDataset: samples of a Gen1 / 1 Mpx HDF5 cache (or of an RVT preprocessed folder) in the batch
format of Ultralytics' detection engine.

Each item is the representation of one labelled window as a `[T*C, imgsz, imgsz]` uint8 image (time-major
channels; the model's encoding layer splits them into T steps) with its boxes, stretched from the sensor size to
a square input as in the EMS-YOLO protocol (box IoU is invariant to an axis-aligned stretch). Metrics are
computed in network coordinates (`ori_shape` = input size); `t_us` and `recording` travel with the batch so that
the validator can also score the Prophesee protocol in sensor coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.data.dataset import YOLODataset

from ems_yolo.cfg import EVENT_CACHE_SUFFIXES
from ems_yolo.events.automotive import EventCache, read_representation
from ems_yolo.events.representations import EventRepresentation, resize_channels
from ems_yolo.events.rvt import RVTSplit, is_rvt_split
from ems_yolo.utils.checks import image_hw


def is_event_split(path: str | Path) -> bool:
    """Whether a dataset split path is event samples (an HDF5 cache, or a folder of RVT sequences) rather than
    images."""
    return str(path).endswith(EVENT_CACHE_SUFFIXES) or is_rvt_split(path)


def open_event_split(path: str | Path, rvt: dict | None = None) -> EventCache | RVTSplit:
    """The samples of an event split: an ems-yolo cache, or an RVT folder read with the data YAML's `rvt:` options
    (steps, representation, cutoff, protocol)."""
    if is_rvt_split(path):
        options = dict(rvt or {})
        unknown = sorted(set(options) - {"steps", "representation", "cutoff", "protocol"})
        if unknown:
            raise ValueError(f"rvt: unknown keys {unknown}, expected steps, representation, cutoff, protocol")
        return RVTSplit(path, **options)
    return EventCache(path)


def split_representation(path: str | Path, rvt: dict | None = None) -> EventRepresentation:
    """The representation of an event split: a cache's attributes (no labels read), or an RVT folder's."""
    return open_event_split(path, rvt).representation if is_rvt_split(path) else read_representation(path)


class EventDetectionDataset(torch.utils.data.Dataset):
    """Detection samples from one split's event cache; optional horizontal flips as augmentation."""

    collate_fn = staticmethod(YOLODataset.collate_fn)

    def __init__(self, cache: str | Path | EventCache | RVTSplit, imgsz: int = 320, fliplr: float = 0.0, seed: int = 0,
                 fraction: float | int = 1.0):
        """`fraction`: the first part of the samples used, a ratio or a count (Ultralytics' `fraction=`)."""
        self.cache = cache if isinstance(cache, (EventCache, RVTSplit)) else open_event_split(cache)
        self.rep = self.cache.representation
        self.imgsz = int(imgsz)
        self.fliplr = fliplr
        self.rng = np.random.default_rng(seed)
        n = len(self.cache)
        n = min(n, fraction) if isinstance(fraction, int) else min(n, max(1, round(n * fraction)))
        self.im_files = [f"{self.cache.recordings[r]}@{t}us" for r, t in zip(self.cache.recording[:n],
                                                                                self.cache.t_us[:n])]
        self.labels = [self._label(i) for i in range(n)]

    def _label(self, i: int) -> dict:
        """Ultralytics-style label dict: class [n, 1] and normalised centre-xywh boxes [n, 4]."""
        b = self.cache.boxes(i)
        w, h = self.rep.width, self.rep.height
        xywh = np.stack(((b[:, 1] + b[:, 3] / 2) / w, (b[:, 2] + b[:, 4] / 2) / h, b[:, 3] / w, b[:, 4] / h), 1)
        return {"cls": b[:, :1].copy(), "bboxes": xywh.astype(np.float32), "im_file": self.im_files[i],
                "shape": (h, w), "normalized": True, "bbox_format": "xywh"}

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Model input of sample i: uint8 [T*C, imgsz, imgsz]."""
        return resize_channels(self.rep.to_model(self.cache.stored(i)), self.imgsz)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i]
        img, boxes = self.image(i), label["bboxes"].copy()
        if self.fliplr and self.rng.random() < self.fliplr:
            img, boxes[:, 0] = img[:, :, ::-1], 1 - boxes[:, 0]
        n = len(boxes)
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img)),
            "cls": torch.from_numpy(label["cls"]),
            "bboxes": torch.from_numpy(boxes),
            "batch_idx": torch.zeros(n),
            "im_file": self.im_files[i],
            "ori_shape": (self.imgsz, self.imgsz),
            "resized_shape": (self.imgsz, self.imgsz),
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0)),
            "t_us": int(self.cache.t_us[i]),
            "recording": int(self.cache.recording[i]),
        }

    def close_mosaic(self, hyp=None) -> None:
        """No mosaic here; present because the trainer calls it when `close_mosaic` is set."""


def build_event_dataset(path: str | Path, args, mode: str = "val", data: dict | None = None) -> EventDetectionDataset:
    """EventDetectionDataset of one split at the engine's image size; horizontal flips only in training."""
    fliplr = args.fliplr if mode == "train" else 0.0
    split = open_event_split(path, (data or {}).get("rvt"))
    fraction = getattr(args, "fraction", 1.0) if mode == "train" else 1.0
    return EventDetectionDataset(split, max(image_hw(args.imgsz)), fliplr=fliplr, seed=args.seed, fraction=fraction)
