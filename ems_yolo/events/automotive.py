"""The automotive event datasets on disk (Gen1, 1 Mpx) and their HDF5 sample caches.

`preprocess_dataset` turns a dataset folder (`train/`, `val/`, `test/` holding `<name>_td.dat` + `<name>_bbox.npy`;
the events may also be `<name>_td.raw`, or RVT's `<name>_td.dat.h5` / `<name>_td.h5`) into one HDF5 file per split
(`<dst>/train.h5`, ...). Every label timestamp that the dataset's protocol keeps (`ems_yolo.events.protocols`)
becomes one sample: the event representation of the window before it (stored compactly, chunked and compressed,
at the protocol's input resolution) and its cleaned boxes. Work is committed recording by recording, so an
interrupted run resumes where it stopped.

Cache layout (root of each split file):
    samples      uint8 [N, *stored]   one sample per chunk, lzf-compressed
    t_us         int64 [N]            label time of each sample
    recording    int32 [N]            index into `recordings`
    label_count  int32 [N]            boxes per sample (offsets = cumulative sum)
    labels       float32 [M, 5]       class, x, y, w, h (top-left, sensor pixels)
    recordings   str [R]              recordings fully written (the resume point)
    done_samples int64 [R]            samples written after each recording
    done_labels  int64 [R]            labels written after each recording
Attributes: `representation` (JSON of EventRepresentation), `names`, `split`, `version`, `protocol` (gen1 when
absent).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ems_yolo.events.formats import open_events
from ems_yolo.events.io import read_bbox
from ems_yolo.events.protocols import GEN1, DatasetProtocol, clean_labels, get_protocol
from ems_yolo.events.representations import EventRepresentation

SPLITS = ("train", "val", "test")
CACHE_VERSION = 2
# events file suffixes of a recording <name>, in order of preference: Prophesee's, then RVT's HDF5 copies
EVENT_FILE_PATTERNS = ("_td.dat", "_td.raw", "_td.dat.h5", "_td.h5")


def find_recordings(split_dir: Path) -> list[tuple[str, Path, Path]]:
    """Triples (name, events file, boxes file) of a split folder, sorted by name; a missing boxes file is an error."""
    found: dict[str, Path] = {}
    for pattern in EVENT_FILE_PATTERNS:
        for events in Path(split_dir).glob(f"*{pattern}"):
            found.setdefault(events.name[: -len(pattern)], events)
    triples = []
    for name in sorted(found):
        bbox = found[name].with_name(f"{name}_bbox.npy")
        if not bbox.is_file():
            raise FileNotFoundError(f"{found[name]}: no matching labels file {bbox.name}")
        triples.append((name, found[name], bbox))
    return triples


def downsample_events(events: np.ndarray, factor: int) -> np.ndarray:
    """Events with pixel coordinates divided by `factor` (each block of factor x factor pixels becomes one pixel,
    so every event counts; RVT instead subsamples its full-resolution histograms with nearest-exact)."""
    if factor == 1:
        return events
    out = events.copy()
    out["x"] //= factor
    out["y"] //= factor
    return out


def default_representation(protocol: str | DatasetProtocol = GEN1, **keys) -> EventRepresentation:
    """The EMS-YOLO representation at the protocol's input resolution; `keys` override its fields."""
    p = get_protocol(protocol)
    return EventRepresentation.from_dict({"height": p.input_height, "width": p.input_width, **keys})


def _create_datasets(g, stored_shape: tuple[int, ...], compression: str | None = "lzf"):
    if "samples" not in g:
        g.create_dataset("samples", (0, *stored_shape), np.uint8, maxshape=(None, *stored_shape),
                         chunks=(1, *stored_shape), compression=compression)
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


def preprocess_dataset(
    src: str | Path,
    dst: str | Path,
    protocol: str | DatasetProtocol = GEN1,
    representation: EventRepresentation | None = None,
    splits: tuple[str, ...] = SPLITS,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Path]:
    """Build (or resume) one HDF5 sample cache per split of the dataset folder `src` in the folder `dst`.

    `representation` defaults to the EMS-YOLO frames at the protocol's input resolution; its height and width are
    the input size, the sensor being `downsample` times larger. With `workers > 1` recordings are processed in
    that many processes, each into a part file of its own (`<dst>/.parts/`, written atomically), and merged into
    the split cache in name order, so the cache is the same sample for sample as with one worker.
    Returns {split: cache file} for the splits present in `src`.
    """
    import h5py

    p = get_protocol(protocol)
    src = Path(src).expanduser()
    rep = representation or default_representation(p)
    if (rep.width, rep.height) != (p.input_width, p.input_height):  # a sensor of another size
        p = replace(p, width=rep.width * p.downsample, height=rep.height * p.downsample)
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"{p.name} folder '{src}' has none of the split folders {list(splits)}.\n{p.help}")
    rep_json = json.dumps(rep.to_dict(), sort_keys=True)
    out = {}
    for split in present:
        path = split_cache_path(dst, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "a") as f:
            for key, value in (("representation", rep_json), ("protocol", p.name)):
                if key in f.attrs and f.attrs[key] != value:
                    raise ValueError(f"{path}: cache was built with {key} {f.attrs[key]}, asked for {value}; "
                                     "use another dst or delete the file")
            f.attrs.update(representation=rep_json, names=json.dumps(p.names), split=split, version=CACHE_VERSION,
                           protocol=p.name)
            _create_datasets(f, rep.stored_shape)
            _rollback_partial(f)
            done = {s.decode() if isinstance(s, bytes) else s for s in f["recordings"][:]}
            todo = [r for r in find_recordings(src / split) if r[0] not in done]
            jobs = [(name, events, bbox, rep, p, split) for name, events, bbox in todo]
            for i, name in enumerate(_write_recordings(f, jobs, Path(dst) / ".parts" / split, workers)):
                f.flush()
                if progress:
                    print(f"\r{p.name} {split}: {i + 1}/{len(todo)} recordings",
                          end="\n" if i + 1 == len(todo) else "", file=sys.stderr, flush=True)
        out[split] = path
    return out


def _write_recordings(g, jobs: list[tuple], parts: Path, workers: int) -> Iterator[str]:
    """Commit every job's recording to the cache in job order, yielding each name once committed."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _commit(g, job[0], _recording_batches(*job))
            yield job[0]
        return
    parts.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch or HDF5 state
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_write_part, parts / f"{job[0]}.h5", job) for job in jobs]
        for job, future in zip(jobs, futures):
            part = future.result()
            _commit(g, job[0], _part_batches(part))
            part.unlink()
            yield job[0]


def _recording_batches(name: str, events_path: Path, bbox: Path, rep: EventRepresentation, p: DatasetProtocol,
                       split: str) -> Iterator[tuple]:
    """The samples of one recording in batches of at most 64 (bounded memory): (samples, times, counts, boxes)."""
    source = open_events(events_path)
    if source.width is not None and (source.width, source.height) != (p.width, p.height):
        raise ValueError(f"{events_path}: a {source.width}x{source.height} recording, expected the "
                         f"{p.width}x{p.height} sensor of {p.name} (a recording of another dataset?)")
    labels = clean_labels(read_bbox(bbox), p, split, str(bbox))
    batch: list[list] = [[], [], [], []]
    for ts, boxes in labels.items():
        events = downsample_events(source.read(*rep.event_range(ts)), p.downsample)
        try:
            sample = rep.stored(events, ts)
        except ValueError as e:  # an event outside the sensor
            raise ValueError(f"{events_path}: {e} (window ending at t={ts} us)") from None
        for column, value in zip(batch, (sample, ts, len(boxes), boxes)):
            column.append(value)
        if len(batch[0]) == 64:
            yield _stacked(batch)
            batch = [[], [], [], []]
    if batch[0]:
        yield _stacked(batch)


def _stacked(batch: list[list]) -> tuple:
    samples, times, counts, rows = batch
    return np.stack(samples), np.array(times, np.int64), np.array(counts, np.int32), np.concatenate(rows)


def _write_part(path: Path, job: tuple) -> Path:
    """Worker: the samples of one recording into their own HDF5 file, renamed into place when complete."""
    import h5py

    if path.is_file():  # finished by an earlier, interrupted run
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        _create_datasets(f, job[3].stored_shape, compression=None)  # compressed once, when merged
        for samples, times, counts, rows in _recording_batches(*job):
            for name, values in (("samples", samples), ("t_us", times), ("label_count", counts), ("labels", rows)):
                _append(f[name], values)
    os.replace(tmp, path)
    return path


def _part_batches(path: Path) -> Iterator[tuple]:
    """A part file's samples in batches of 64, as `_recording_batches` yields them."""
    import h5py

    with h5py.File(path, "r") as f:
        offsets = np.concatenate(([0], np.cumsum(f["label_count"][:])))
        for lo in range(0, len(f["t_us"]), 64):
            hi = min(lo + 64, len(f["t_us"]))
            yield (f["samples"][lo:hi], f["t_us"][lo:hi], f["label_count"][lo:hi],
                   f["labels"][offsets[lo] : offsets[hi]])


def _commit(g, name: str, batches: Iterator[tuple]) -> None:
    """Append all samples of one recording, then mark it done (the commit point for resuming)."""
    index = len(g["recordings"])
    for samples, times, counts, rows in batches:
        _append(g["samples"], samples)
        _append(g["t_us"], times)
        _append(g["recording"], np.full(len(times), index, np.int32))
        _append(g["label_count"], counts)
        _append(g["labels"], rows)
    _append(g["done_samples"], np.array([g["samples"].shape[0]]))
    _append(g["done_labels"], np.array([g["labels"].shape[0]]))
    _append(g["recordings"], np.array([name], dtype=object))


def open_cache(path: str | Path):
    """Open a split cache read-only, checking that it is one of this version; errors name the file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event cache '{path}' not found.\n{GEN1.help}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 event cache ({e}); expected a file written by "
                         "'ems-yolo gen1 preprocess' or 'ems-yolo gen4 preprocess'") from None
    version = int(f.attrs.get("version", 0))
    if version != CACHE_VERSION or "samples" not in f:
        f.close()
        raise ValueError(f"{path}: not an ems-yolo event cache of version {CACHE_VERSION} (found version {version}); "
                         "rebuild it with 'ems-yolo gen1 preprocess' (or gen4)")
    return f


def _representation(f) -> EventRepresentation:
    return EventRepresentation(**json.loads(f.attrs["representation"]))


def _protocol(f, rep: EventRepresentation) -> DatasetProtocol:
    """The protocol a cache was built under, with the sensor size its representation implies."""
    p = get_protocol(str(f.attrs.get("protocol", GEN1.name)))
    if (rep.width, rep.height) != (p.input_width, p.input_height):
        p = replace(p, width=rep.width * p.downsample, height=rep.height * p.downsample)
    return p


def read_representation(path: str | Path) -> EventRepresentation:
    """The representation a split cache was built with (reads the file's attributes only)."""
    with open_cache(path) as f:
        return _representation(f)


class EventCache:
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
            self.protocol = _protocol(f, self.representation)
        self._file = None

    def __len__(self) -> int:
        return len(self.t_us)

    def boxes(self, i: int) -> np.ndarray:
        """Cleaned boxes of sample i: float32 [n, 5] (class, x, y, w, h) in input pixels (sensor / downsample)."""
        return self.labels[self.offsets[i] : self.offsets[i + 1]]

    def stored(self, i: int) -> np.ndarray:
        """The cached representation of sample i."""
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file["samples"][i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # h5py handles do not cross process boundaries
