"""RVT's preprocessed Gen1 / 1 Mpx folders read in place as an ems-yolo dataset split (no reprocessing of 200 GB).

Layout written by RVT (github.com/uzh-rpg/RVT, scripts/genx/preprocess_dataset.py), one folder per sequence:

    <split>/<sequence>/labels_v2/labels.npz            labels (Prophesee box rows, sensor pixels),
                                                       objframe_idx_2_label_idx (first row of each label frame)
    <split>/<sequence>/labels_v2/timestamps_us.npy     time of each label frame
    <split>/<sequence>/event_representations_v2/<name>/event_representations[_ds2_nearest].h5
                                                       'data' uint8 [N, 2 * nbins, H, W] (blosc), N stacked
                                                       histograms, polarity-major (OFF bins, ON bins)
    <split>/<sequence>/event_representations_v2/<name>/objframe_idx_2_repr_idx.npy
                                                       the histogram that ends at each label frame
    <split>/<sequence>/event_representations_v2/<name>/timestamps_us.npy
                                                       the end time of each histogram

`<name>` is e.g. `stacked_histogram_dt=50_nbins=10`. Each histogram holds the events of the `dt` ms before its end,
closed at both ends (`end - dt <= t <= end`), in `nbins` sub-bins each clipped at 10 counts. The histograms are not
contiguous: before the first label frame their ends are `dt` apart, from it on RVT spreads a fixed number per label
period evenly between label frames (`np.linspace`), for Gen1 2 per 250 ms, so ends 125 ms apart. A sample is the
label frame's histogram and the `steps - 1` before it, each summed over its sub-bins and clipped at `cutoff`
counts: for Gen1 `steps` windows of 50 ms spread over `(steps - 1) x 125 + 50` ms, with gaps. The split records
that layout in its representation (`histogram` with `bin_us` = dt, `closed`, and `spacing_us` = the most common
distance between histogram ends from each sequence's first label frame on, over all sequences), so training
records it in the model and prediction on a recording builds the same windows. For every label frame whose
`steps` histograms are evenly spaced the sample equals that representation of the recording's events (a sum of
sub-bins clipped at 10, then clipped at `cutoff` <= 10, is the window's count clipped at `cutoff`, as long as no
sub-bin reaches 256 events at one pixel, where RVT's uint8 wraps). Earlier label frames (whose histograms reach
back into the `dt`-spaced ones) are read as stored, as RVT's loader does; histograms before the first of a
sequence are empty.
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


def _label_frame_spacings(rdir: Path, frame_repr: np.ndarray) -> np.ndarray:
    """Distances between consecutive histogram ends from the sequence's first label frame on (RVT's label-frame
    region; the histograms before it are `dt` apart whatever the label period)."""
    path = rdir / "timestamps_us.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, expected the end time of each histogram (RVT writes it)")
    ends = np.load(path).astype(np.int64)
    if len(frame_repr) and (frame_repr.min() < 0 or frame_repr.max() >= len(ends)):
        raise ValueError(f"{rdir / 'objframe_idx_2_repr_idx.npy'}: histogram indices outside the {len(ends)} "
                         f"histograms of timestamps_us.npy")
    return np.diff(ends[frame_repr[0]:]) if len(frame_repr) else ends[:0]


def _most_common(values: np.ndarray, default: int) -> int:
    """The most frequent value (the smallest among ties), or `default` when there is none."""
    if not len(values):
        return default
    unique, counts = np.unique(values, return_counts=True)
    return int(unique[np.argmax(counts)])


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
        t_us, recording, repr_index, labels, offsets, spacings = [], [], [], [], [0], []
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
            spacings.append(_label_frame_spacings(rdir, frame_repr))
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
        bin_us = dt_ms * 1000
        spacing_us = _most_common(np.concatenate(spacings), default=bin_us)
        self.representation = EventRepresentation(
            "histogram", bins=self.steps, window_us=(self.steps - 1) * spacing_us + bin_us, height=height,
            width=width, cutoff=cutoff, bin_us=bin_us, spacing_us=spacing_us, closed=True)
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
