"""The Gen1 automotive dataset: recordings on disk, label cleaning and the HDF5 sample caches.

`preprocess_gen1` turns a Gen1 folder (`train/`, `val/`, `test/` holding `<name>_td.dat` + `<name>_bbox.npy`) into
one HDF5 file per split (`<dst>/train.h5`, ...). Every unique label timestamp of a recording becomes one sample: the
event representation of the window before it (stored compactly, chunked and compressed) and its cleaned boxes.
Work is committed recording by recording, so an interrupted run resumes where it stopped.

Cache layout (root of each split file):
    samples      uint8 [N, *stored]   one sample per chunk, lzf-compressed
    t_us         int64 [N]            label time of each sample
    recording    int32 [N]            index into `recordings`
    label_count  int32 [N]            boxes per sample (offsets = cumulative sum)
    labels       float32 [M, 5]       class, x, y, w, h (top-left, sensor pixels)
    recordings   str [R]              recordings fully written (the resume point)
    done_samples int64 [R]            samples written after each recording
    done_labels  int64 [R]            labels written after each recording
Attributes: `representation` (JSON of EventRepresentation), `names`, `split`, `version`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ems_yolo.events.io import read_bbox, read_dat
from ems_yolo.events.representations import EventRepresentation

GEN1_NAMES = {0: "car", 1: "pedestrian"}
SPLITS = ("train", "val", "test")
CACHE_VERSION = 2
GEN1_HELP = """How to get Gen1 (Prophesee "ATIS Automotive Detection Dataset", about 200 GB compressed):
  1. Request access at https://www.prophesee.ai/2020/01/24/prophesee-gen1-automotive-detection-dataset/ and
     download the 10 7z archives (6 train, 2 val, 2 test); extract them so that <root>/train, <root>/val and
     <root>/test hold <name>_td.dat and <name>_bbox.npy pairs.
  2. Build the sample caches: ems-yolo gen1 preprocess src=<root> dst=datasets/gen1
     (writes train.h5, val.h5, test.h5 and data.yaml there)
  3. Train with data=datasets/gen1/data.yaml (or data=gen1.yaml, which expects datasets/gen1).
Without the real data, data=gen1-synthetic trains on a generated Gen1-shaped dataset."""


def find_recordings(split_dir: Path) -> list[tuple[str, Path, Path]]:
    """Pairs (name, events file, boxes file) of a split folder, sorted by name; a missing boxes file is an error."""
    pairs = []
    for td in sorted(Path(split_dir).glob("*_td.dat")):
        name = td.name[: -len("_td.dat")]
        bbox = td.with_name(f"{name}_bbox.npy")
        if not bbox.is_file():
            raise FileNotFoundError(f"{td}: no matching labels file {bbox.name}")
        pairs.append((name, td, bbox))
    return pairs


def clean_labels(boxes: np.ndarray, width: int = 304, height: int = 240) -> dict[int, np.ndarray]:
    """Boxes per label timestamp, as the EMS-YOLO protocol uses them (events-spec §4).

    At each timestamp keep the last box of every track, clip the box extents to the sensor and drop boxes left
    with zero width or height. Returns {t: float32 [n, 5] (class, x, y, w, h)}; timestamps whose boxes all vanish
    are omitted (no empty samples).
    """
    out: dict[int, np.ndarray] = {}
    if len(boxes) == 0:
        return out
    t = boxes["t"].astype(np.int64)
    for ts in np.unique(t):
        rows = boxes[t == ts]
        _, last_rev = np.unique(rows["track_id"][::-1], return_index=True)
        rows = rows[np.sort(len(rows) - 1 - last_rev)]  # last box of each track, original order
        x0 = np.clip(rows["x"], 0, width)
        y0 = np.clip(rows["y"], 0, height)
        x1 = np.clip(rows["x"] + rows["w"], 0, width)
        y1 = np.clip(rows["y"] + rows["h"], 0, height)
        keep = (x1 > x0) & (y1 > y0)
        if keep.any():
            out[int(ts)] = np.stack(
                (rows["class_id"][keep].astype(np.float32), x0[keep], y0[keep], (x1 - x0)[keep], (y1 - y0)[keep]), 1
            ).astype(np.float32)
    return out


def _create_datasets(g, stored_shape: tuple[int, ...]):
    if "samples" not in g:
        g.create_dataset("samples", (0, *stored_shape), np.uint8, maxshape=(None, *stored_shape),
                         chunks=(1, *stored_shape), compression="lzf")
        for name, dtype in (("t_us", np.int64), ("recording", np.int32), ("label_count", np.int32),
                            ("done_samples", np.int64), ("done_labels", np.int64)):
            g.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
        g.create_dataset("labels", (0, 5), np.float32, maxshape=(None, 5), chunks=(4096, 5))
        import h5py

        g.create_dataset("recordings", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(256,))
    return g


def _append(ds, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def _rollback_partial(g) -> None:
    """Drop rows written after the last completed recording (an interrupted run)."""
    n_samples = int(g["done_samples"][-1]) if len(g["done_samples"]) else 0
    n_labels = int(g["done_labels"][-1]) if len(g["done_labels"]) else 0
    for name in ("samples", "t_us", "recording", "label_count"):
        g[name].resize(n_samples, axis=0)
    g["labels"].resize(n_labels, axis=0)


def split_cache_path(dst: str | Path, split: str) -> Path:
    """The cache file of one split inside the output folder `dst`."""
    return Path(dst).expanduser() / f"{split}.h5"


def preprocess_gen1(
    src: str | Path,
    dst: str | Path,
    representation: EventRepresentation | None = None,
    splits: tuple[str, ...] = SPLITS,
    progress: bool = True,
) -> dict[str, Path]:
    """Build (or resume) one HDF5 sample cache per split of the Gen1 folder `src` in the folder `dst`.

    Returns {split: cache file} for the splits present in `src`.
    """
    import h5py

    src = Path(src).expanduser()
    rep = representation or EventRepresentation()
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"Gen1 folder '{src}' has none of the split folders {list(splits)}.\n{GEN1_HELP}")
    rep_json = json.dumps(asdict(rep), sort_keys=True)
    out = {}
    for split in present:
        path = split_cache_path(dst, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "a") as f:
            if f.attrs.get("representation", rep_json) != rep_json:
                raise ValueError(
                    f"{path}: cache was built with representation {f.attrs['representation']}, asked for {rep_json}; "
                    "use another dst or delete the file"
                )
            f.attrs.update(representation=rep_json, names=json.dumps(GEN1_NAMES), split=split, version=CACHE_VERSION)
            _create_datasets(f, rep.stored_shape)
            _rollback_partial(f)
            done = {s.decode() if isinstance(s, bytes) else s for s in f["recordings"][:]}
            todo = [r for r in find_recordings(src / split) if r[0] not in done]
            for i, (name, td, bbox) in enumerate(todo):
                _write_recording(f, name, td, bbox, rep)
                f.flush()
                if progress:
                    print(f"\rgen1 {split}: {i + 1}/{len(todo)} recordings", end="\n" if i + 1 == len(todo) else "",
                          file=sys.stderr, flush=True)
        out[split] = path
    return out


def _write_recording(g, name: str, td: Path, bbox: Path, rep: EventRepresentation) -> None:
    """Append all samples of one recording, then mark it done (the commit point for resuming)."""
    labels = clean_labels(read_bbox(bbox), rep.width, rep.height)
    index = len(g["recordings"])
    samples, times, counts, rows = [], [], [], []
    for ts, boxes in labels.items():
        events = read_dat(td, max(ts - rep.window_us, 0), ts)
        samples.append(rep.stored(events, ts))
        times.append(ts)
        counts.append(len(boxes))
        rows.append(boxes)
        if len(samples) == 64:  # bounded memory for long recordings
            _flush(g, samples, times, counts, rows, index)
            samples, times, counts, rows = [], [], [], []
    _flush(g, samples, times, counts, rows, index)
    _append(g["done_samples"], np.array([g["samples"].shape[0]]))
    _append(g["done_labels"], np.array([g["labels"].shape[0]]))
    _append(g["recordings"], np.array([name], dtype=object))


def _flush(g, samples, times, counts, rows, index: int) -> None:
    if not samples:
        return
    _append(g["samples"], np.stack(samples))
    _append(g["t_us"], np.array(times, np.int64))
    _append(g["recording"], np.full(len(samples), index, np.int32))
    _append(g["label_count"], np.array(counts, np.int32))
    _append(g["labels"], np.concatenate(rows))


def open_cache(path: str | Path):
    """Open a split cache read-only, checking that it is one of this version; errors name the file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event cache '{path}' not found.\n{GEN1_HELP}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 event cache ({e}); expected a file written by "
                         "'ems-yolo gen1 preprocess'") from None
    version = int(f.attrs.get("version", 0))
    if version != CACHE_VERSION or "samples" not in f:
        f.close()
        raise ValueError(f"{path}: not an ems-yolo event cache of version {CACHE_VERSION} (found version {version}); "
                         "rebuild it with 'ems-yolo gen1 preprocess'")
    return f


def _representation(f) -> EventRepresentation:
    return EventRepresentation(**json.loads(f.attrs["representation"]))


def read_representation(path: str | Path) -> EventRepresentation:
    """The representation a split cache was built with (reads the file's attributes only)."""
    with open_cache(path) as f:
        return _representation(f)


class Gen1Cache:
    """Read-only view of one split's cache file; opens the HDF5 file lazily (safe with DataLoader workers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_cache(self.path) as f:
            n = int(f["done_samples"][-1]) if len(f["done_samples"]) else 0
            self.t_us = f["t_us"][:n]
            self.recording = f["recording"][:n]
            counts = f["label_count"][:n].astype(np.int64)
            self.offsets = np.concatenate(([0], np.cumsum(counts)))
            self.labels = f["labels"][: self.offsets[-1]]
            self.recordings = [s.decode() if isinstance(s, bytes) else s for s in f["recordings"][:]]
            self.names = {int(k): v for k, v in json.loads(f.attrs["names"]).items()}
            self.split = str(f.attrs.get("split", self.path.stem))
            self.representation = _representation(f)
        self._file = None

    def __len__(self) -> int:
        return len(self.t_us)

    def boxes(self, i: int) -> np.ndarray:
        """Cleaned boxes of sample i: float32 [n, 5] (class, x, y, w, h) in sensor pixels."""
        return self.labels[self.offsets[i] : self.offsets[i + 1]]

    def stored(self, i: int) -> np.ndarray:
        """The cached representation of sample i."""
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file["samples"][i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # h5py handles do not cross process boundaries
