"""The automotive event datasets ems-yolo knows, Gen1 and the 1 Megapixel dataset, and their protocols: which
labels become samples, how boxes are cleaned, and which boxes the Prophesee evaluation keeps.

Gen1 follows the EMS-YOLO protocol (events-spec §4): every label timestamp is a sample, the last box of each track
counts, boxes are clipped to the sensor. The 1 Mpx dataset follows RVT (github.com/uzh-rpg/RVT,
scripts/genx/preprocess_dataset.py and utils/evaluation/prophesee/evaluation.py): of the 7 classes only
pedestrian, two-wheeler and car (class_id <= 2) are kept, boxes are cropped to the field of view, boxes with a side
under 5 px are dropped, training boxes wider than 90% of the frame are dropped as labelling faults, labels are
taken at about 10 Hz (from 30 / 60 Hz annotations), and events and boxes are halved in resolution (1280x720 to
640x360). Both are scored with the Prophesee protocol (prophesee-automotive-dataset-toolbox, src/psee_evaluator.py):
the first 0.5 s skipped, minimum diagonal 30 px / side 10 px on Gen1 and 60 px / 20 px on 1 Mpx (the side from the
dataset paper's supplementary material, as RVT notes), both halved at half resolution, detections matched within
50 ms of a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GEN1", "GEN4", "PROTOCOLS", "DatasetProtocol", "check_label_classes", "clean_labels", "get_protocol",
           "rvt_label_times"]

_GEN1_HELP = """How to get Gen1 (Prophesee "ATIS Automotive Detection Dataset", about 200 GB compressed):
  1. Request access at https://www.prophesee.ai/2020/01/24/prophesee-gen1-automotive-detection-dataset/ and
     download the 10 7z archives (6 train, 2 val, 2 test); extract them so that <root>/train, <root>/val and
     <root>/test hold <name>_td.dat and <name>_bbox.npy pairs.
  2. Build the sample caches: ems-yolo gen1 preprocess src=<root> dst=datasets/gen1
     (writes train.h5, val.h5, test.h5 and data.yaml there)
  3. Train with data=datasets/gen1/data.yaml (or data=gen1.yaml, which expects datasets/gen1).
Without the real data, data=gen1-synthetic trains on a generated Gen1-shaped dataset."""

_GEN4_HELP = """How to get the 1 Megapixel dataset (Prophesee "1 Megapixel Automotive Detection Dataset"):
  1. Download it from https://www.prophesee.ai/2020/11/24/automotive-megapixel-event-based-dataset/ (or RVT's
     HDF5 copy, github.com/uzh-rpg/RVT scripts/genx/README.md) and extract it so that <root>/train, <root>/val
     and <root>/test hold <name>_td.dat (or <name>_td.h5) and <name>_bbox.npy pairs.
  2. Build the sample caches: ems-yolo gen4 preprocess src=<root> dst=datasets/gen4
  3. Train with data=datasets/gen4/data.yaml (or data=gen4.yaml, which expects datasets/gen4).
Without the real data, data=gen4-synthetic trains on a generated 1 Mpx-shaped dataset."""


@dataclass(frozen=True)
class DatasetProtocol:
    """One automotive dataset: its sensor, the classes a model learns, label cleaning and evaluation filters.

    Sizes are in sensor pixels; `downsample` is the factor by which events and boxes are reduced before they
    reach the model (the cache and the evaluation then work at `input_width` x `input_height`).
    """

    name: str
    width: int
    height: int
    names: dict[int, str]
    min_diag: float  # evaluation filter, sensor pixels
    min_side: float
    help: str
    downsample: int = 1
    skip_us: int = 500_000  # the evaluation ignores labels at t <= skip_us
    time_tol_us: int = 50_000
    keep_below: int | None = None  # only class_id < keep_below is kept (1 Mpx: 3 of 7 classes)
    min_label_side: float = 0.0  # label cleaning: boxes with a smaller side are dropped (sensor pixels)
    max_train_width: float | None = None  # label cleaning, training split: wider boxes are dropped
    label_frames: str = "all"  # "all" label timestamps, or "rvt10hz" (RVT's ~10 Hz selection)
    label_classes: int | None = None  # classes a `_bbox.npy` of the dataset may hold (None: those of `names`)

    @property
    def input_width(self) -> int:
        return self.width // self.downsample

    @property
    def input_height(self) -> int:
        return self.height // self.downsample

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in sorted(self.names))


GEN1 = DatasetProtocol("gen1", 304, 240, {0: "car", 1: "pedestrian"}, min_diag=30, min_side=10, help=_GEN1_HELP)
GEN4 = DatasetProtocol(
    "gen4", 1280, 720, {0: "pedestrian", 1: "two-wheeler", 2: "car"}, min_diag=60, min_side=20, help=_GEN4_HELP,
    downsample=2, keep_below=3, min_label_side=5, max_train_width=0.9 * 1280, label_frames="rvt10hz",
    label_classes=7,  # pedestrian, two-wheeler, car, truck, bus, traffic sign, traffic light
)
PROTOCOLS = {p.name: p for p in (GEN1, GEN4)}


def get_protocol(protocol: str | DatasetProtocol) -> DatasetProtocol:
    """A protocol by name (gen1, gen4) or as given."""
    if isinstance(protocol, DatasetProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown dataset protocol {protocol!r}, expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def rvt_label_times(times: np.ndarray, source: str = "labels") -> np.ndarray:
    """RVT's label frames of a 1 Mpx recording from its sorted unique label times (µs).

    Annotations come at 30 or 60 Hz; the frame period is 3 or 6 annotation periods (~100 ms). The first frame is
    the first label at or after 100 ms, and a later label is kept when its distance to the last kept one is a
    positive multiple of the frame period within 2 ms of jitter.
    """
    first = int(np.searchsorted(times, 100_000, side="left"))
    if first >= len(times):
        return times[:0]
    if len(times) < 2:
        return times[first:]
    median = float(np.median(np.diff(times)))
    hz = int(np.rint(1e6 / median))
    if hz not in (30, 60):
        raise ValueError(f"{source}: labels come at {hz} Hz (median spacing {median:.0f} us), expected 30 or 60 Hz "
                         "as in the 1 Mpx dataset")
    period = int(6 * median if hz == 60 else 3 * median)
    kept = [int(times[first])]
    for ts in times[first + 1 :]:
        gap = int(ts) - kept[-1]
        steps = round(gap / period)
        if steps > 0 and abs(gap - steps * period) <= 2000:
            kept.append(int(ts))
    return np.asarray(kept, np.int64)


def check_label_classes(boxes: np.ndarray, protocol: str | DatasetProtocol = GEN1, source: str = "labels") -> None:
    """Refuse a class id outside the dataset's label classes (a wrong or damaged `_bbox.npy`), naming the row."""
    p = get_protocol(protocol)
    n = p.label_classes or len(p.names)
    bad = np.flatnonzero(boxes["class_id"] >= n)
    if bad.size:
        raise ValueError(f"{source}: row {bad[0]} has class_id {boxes['class_id'][bad[0]]}, expected 0..{n - 1} "
                         f"(the {n} {p.name} label classes)")


def clean_labels(boxes: np.ndarray, protocol: str | DatasetProtocol = GEN1, split: str = "train",
                 source: str = "labels") -> dict[int, np.ndarray]:
    """Boxes per sample timestamp under `protocol`, in model-input pixels (sensor pixels / downsample).

    The classes outside the protocol are dropped, boxes are clipped to the sensor, those left with zero width or
    height (or a side under `min_label_side`, or wider than `max_train_width` in the training split) are dropped,
    and at each timestamp the last box of every track is kept. Returns {t: float32 [n, 5] (class, x, y, w, h)};
    timestamps whose boxes all vanish are omitted (no empty samples).
    """
    p = get_protocol(protocol)
    if len(boxes) and p.keep_below is not None:
        boxes = boxes[boxes["class_id"] < p.keep_below]
    out: dict[int, np.ndarray] = {}
    if len(boxes) == 0:
        return out
    # Clipped at width / height, not RVT's width - 1 / height - 1 (RVT scripts/genx/preprocess_dataset.py,
    # crop_to_fov_filter): boxes are continuous coordinates on a width x height image. Prophesee's toolbox crops
    # nothing (src/io/box_filtering.py, filter_boxes only drops boxes) and scores them as COCO boxes on an image of
    # width x height (src/metrics/coco_eval.py, _to_coco_format), where a box may end at x + w = width; the Gen1
    # labels themselves end at 304.
    x0 = np.clip(boxes["x"], 0, p.width)
    y0 = np.clip(boxes["y"], 0, p.height)
    w = np.clip(boxes["x"] + boxes["w"], 0, p.width) - x0
    h = np.clip(boxes["y"] + boxes["h"], 0, p.height) - y0
    keep = (w > 0) & (h > 0) & (w >= p.min_label_side) & (h >= p.min_label_side)
    if split == "train" and p.max_train_width is not None:
        keep &= w <= p.max_train_width
    scale = np.float32([1, p.downsample, p.downsample, p.downsample, p.downsample])
    rows = np.stack((boxes["class_id"].astype(np.float32), x0, y0, w, h), 1).astype(np.float32) / scale
    t = boxes["t"].astype(np.int64)
    for ts in np.unique(t):
        at = np.flatnonzero(t == ts)
        _, last_rev = np.unique(boxes["track_id"][at][::-1], return_index=True)
        at = at[np.sort(len(at) - 1 - last_rev)]  # last box of each track, original order
        at = at[keep[at]]
        if at.size:
            out[int(ts)] = rows[at]
    if p.label_frames == "rvt10hz" and out:
        out = {int(ts): out[int(ts)] for ts in rvt_label_times(np.array(sorted(out), np.int64), source)}
    return out
