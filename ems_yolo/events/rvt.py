"""RVT's preprocessed Gen1 / 1 Mpx folders read in place as an ems-yolo dataset split (no reprocessing of 200 GB).

Layout written by RVT (github.com/uzh-rpg/RVT, scripts/genx/preprocess_dataset.py), one folder per sequence:

    <split>/<sequence>/labels_v2/labels.npz            labels (Prophesee box rows, sensor pixels),
                                                       objframe_idx_2_label_idx (first row of each label frame)
    <split>/<sequence>/labels_v2/timestamps_us.npy     time of each label frame
    <split>/<sequence>/event_representations_v2/<name>/event_representations[_ds2_nearest].h5
                                                       'data' uint8 [N, 2 * nbins, H, W] (blosc), one stacked
                                                       histogram per `dt` ms, polarity-major (OFF bins, ON bins)
    <split>/<sequence>/event_representations_v2/<name>/objframe_idx_2_repr_idx.npy
                                                       the histogram that ends at each label frame

`<name>` is e.g. `stacked_histogram_dt=50_nbins=10`. A sample is the label frame's histogram and the `steps - 1`
before it, each summed over its bins and clipped at `cutoff` counts: exactly ems-yolo's `histogram`
representation with `steps` bins over `steps * dt` ms (a bin's count reaches the cutoff in both or in neither), so
the model sees the same input as from an ems-yolo cache. Histograms before the first of a sequence are empty.
`_ds2_nearest` files (RVT's 1 Mpx at 640x360) have their boxes halved, as RVT loads them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from ems_yolo.events.protocols import GEN1, GEN4, DatasetProtocol, get_protocol
from ems_yolo.events.representations import EventRepresentation

__all__ = ["RVTSplit", "is_rvt_split"]

_NAME = re.compile(r"^stacked_histogram_dt=(\d+)_nbins=(\d+)$")
_SIZES = {(304, 240): GEN1, (640, 360): GEN4, (1280, 720): replace(GEN4, downsample=1)}  # histogram size -> dataset


def is_rvt_split(path: str | Path) -> bool:
    """Whether `path` is a folder of RVT sequences (any child holding labels_v2/labels.npz)."""
    path = Path(path)
    return path.is_dir() and any((seq / "labels_v2" / "labels.npz").is_file() for seq in path.iterdir())


def _representation_dir(seq: Path, name: str | None) -> Path:
    """The sequence's representation folder `name`, or its only one."""
    parent = seq / "event_representations_v2"
    found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    if name is None:
        if len(found) != 1:
            raise ValueError(f"{parent}: expected one representation folder, found {found or 'none'}; name one "
                             "with 'rvt: {representation: <folder>}' in the data YAML")
        name = found[0]
    if name not in found:
        raise FileNotFoundError(f"{parent / name}: not found, this sequence has {found or 'none'}")
    return parent / name


class RVTSplit:
    """One split of an RVT preprocessed folder, with the interface of `EventCache` (len, boxes, stored, t_us,
    recording, recordings, names, representation, protocol); opens the HDF5 files lazily."""

    def __init__(self, folder: str | Path, steps: int = 5, representation: str | None = None, cutoff: int = 10,
                 protocol: str | DatasetProtocol | None = None):
        self.path = Path(folder)
        if not is_rvt_split(self.path):
            raise FileNotFoundError(f"{self.path}: not a folder of RVT sequences (<sequence>/labels_v2/labels.npz)")
        sequences = sorted(s for s in self.path.iterdir() if (s / "labels_v2" / "labels.npz").is_file())
        self.recordings = [s.name for s in sequences]
        self.files: list[Path] = []
        t_us, recording, repr_index, labels, offsets = [], [], [], [], [0]
        shapes = set()
        for index, seq in enumerate(sequences):
            rdir = _representation_dir(seq, representation)
            match = _NAME.match(rdir.name)
            if not match:
                raise ValueError(f"{rdir}: unsupported representation {rdir.name!r}, expected "
                                 "stacked_histogram_dt=<ms>_nbins=<n> (RVT's stacked histograms)")
            h5 = [p for p in (rdir / "event_representations_ds2_nearest.h5", rdir / "event_representations.h5")
                  if p.is_file()]
            if not h5:
                raise FileNotFoundError(f"{rdir}: no event_representations.h5 (or _ds2_nearest.h5)")
            self.files.append(h5[0])
            frame_repr = np.load(rdir / "objframe_idx_2_repr_idx.npy").astype(np.int64)
            frame_t = np.load(seq / "labels_v2" / "timestamps_us.npy").astype(np.int64)
            with np.load(seq / "labels_v2" / "labels.npz") as npz:
                rows, first = npz["labels"], npz["objframe_idx_2_label_idx"].astype(np.int64)
            if not (len(frame_repr) == len(frame_t) == len(first)):
                raise ValueError(f"{seq}: {len(frame_t)} label frames but {len(first)} label offsets and "
                                 f"{len(frame_repr)} histogram indices, expected equal counts")
            shapes.add((int(match[1]), int(match[2]), h5[0].name.endswith("_ds2_nearest.h5")))
            bounds = np.append(first, len(rows))
            for j in range(len(frame_t)):
                boxes = rows[bounds[j] : bounds[j + 1]]
                labels.append(np.stack((boxes["class_id"], boxes["x"], boxes["y"], boxes["w"], boxes["h"]), 1))
                offsets.append(offsets[-1] + len(boxes))
            t_us.append(frame_t)
            recording.append(np.full(len(frame_t), index, np.int32))
            repr_index.append(frame_repr)
        if len(shapes) != 1:
            raise ValueError(f"{self.path}: sequences mix representations {sorted(shapes)}, expected one")
        (dt_ms, self.nbins, halved) = shapes.pop()
        height, width = self._data_shape()[2:]
        if (width, height) not in _SIZES:
            raise ValueError(f"{self.files[0]}: histograms of {width}x{height}, expected Gen1 304x240 or 1 Mpx "
                             "1280x720 / 640x360")
        self.protocol = _SIZES[(width, height)] if protocol is None else get_protocol(protocol)
        self.scale = 2 if halved else 1
        self.names = dict(self.protocol.names)
        self.steps = int(steps)
        self.representation = EventRepresentation("histogram", bins=self.steps, window_us=self.steps * dt_ms * 1000,
                                                  height=height, width=width, cutoff=cutoff)
        self.t_us = np.concatenate(t_us) if t_us else np.zeros(0, np.int64)
        self.recording = np.concatenate(recording) if recording else np.zeros(0, np.int32)
        self.repr_index = np.concatenate(repr_index) if repr_index else np.zeros(0, np.int64)
        self.offsets = np.asarray(offsets, np.int64)
        self.labels = (np.concatenate(labels).astype(np.float32) if labels else np.zeros((0, 5), np.float32))
        self._clip_labels(width, height)
        self._handles: dict[int, object] = {}

    def _data_shape(self) -> tuple[int, ...]:
        from ems_yolo.events.formats import h5py_with_filters

        with h5py_with_filters().File(self.files[0], "r") as f:
            return f["data"].shape

    def _clip_labels(self, width: int, height: int) -> None:
        """Boxes at the histograms' resolution, clipped to them (RVT's label loading)."""
        b = self.labels
        b[:, 1:] /= self.scale
        x0, y0 = np.clip(b[:, 1], 0, width), np.clip(b[:, 2], 0, height)
        b[:, 3] = np.clip(b[:, 1] + b[:, 3], 0, width) - x0
        b[:, 4] = np.clip(b[:, 2] + b[:, 4], 0, height) - y0
        b[:, 1], b[:, 2] = x0, y0

    def __len__(self) -> int:
        return len(self.t_us)

    def boxes(self, i: int) -> np.ndarray:
        """Boxes of sample i: float32 [n, 5] (class, x, y, w, h) at the histograms' resolution."""
        return self.labels[self.offsets[i] : self.offsets[i + 1]]

    def stored(self, i: int) -> np.ndarray:
        """Sample i as ems-yolo's stored `histogram`: uint8 [steps, 2, H, W]."""
        from ems_yolo.events.formats import h5py_with_filters

        r = int(self.recording[i])
        if r not in self._handles:
            self._handles[r] = h5py_with_filters().File(self.files[r], "r")
        data = self._handles[r]["data"]
        end = int(self.repr_index[i]) + 1
        start = max(end - self.steps, 0)
        h, w = data.shape[2:]
        counts = np.zeros((self.steps, 2, h, w), np.int64)
        if end > start:
            chunk = data[start:end].reshape(end - start, 2, self.nbins, h, w)
            counts[self.steps - (end - start) :] = chunk.sum(axis=2, dtype=np.int64)
        cutoff = self.representation.cutoff
        np.minimum(counts, cutoff, out=counts)
        return ((2 * 255 * counts + cutoff) // (2 * cutoff)).astype(np.uint8)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # h5py handles do not cross process boundaries
