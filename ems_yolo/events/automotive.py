"""The automotive event datasets on disk (Gen1, 1 Mpx) and their HDF5 sample caches.

`preprocess_dataset` turns a dataset folder (`train/`, `val/`, `test/` holding `<name>_td.dat` + `<name>_bbox.npy`;
the events may also be `<name>_td.raw`, or RVT's `<name>_td.dat.h5` / `<name>_td.h5`) into one HDF5 file per split
(`<dst>/train.h5`, ...). Every label timestamp that the dataset's protocol keeps (`ems_yolo.events.protocols`)
becomes one sample: the event representation of the window before it (stored compactly, chunked and compressed,
at the protocol's input resolution) and its cleaned boxes. Each recording is written to a part file of its own
first, and a split file is only ever renamed into place complete, so an interrupted run (even by SIGKILL) resumes
where it stopped. `write_event_data_yaml` then writes the data YAML that trains on those split files.

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
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from ems_yolo.events.formats import open_events
from ems_yolo.events.io import check_sensor_size, read_bbox
from ems_yolo.events.protocols import GEN1, DatasetProtocol, check_label_classes, clean_labels, get_protocol
from ems_yolo.events.representations import EventRepresentation
from ems_yolo.utils.files import atomic_write_text

SPLITS = ("train", "val", "test")
CACHE_VERSION = 2
# events file suffixes of a recording <name>, in order of preference: Prophesee's, then RVT's HDF5 copies
EVENT_FILE_PATTERNS = ("_td.dat", "_td.raw", "_td.dat.h5", "_td.h5")
LOGGER = logging.getLogger(__name__)  # plain stderr lines (Python's last-resort handler) unless logging is set up
MAX_SAMPLE_BYTES = 1 << 26  # one sample's model input (bins x channels x height x width bytes): 64 MiB
BATCH_BYTES = 1 << 28  # stored samples held in memory at once while a cache is written


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


def _create_datasets(g, stored_shape: tuple[int, ...]) -> None:
    """The empty, growable datasets of a new cache (or part) file."""
    import h5py

    g.create_dataset("samples", (0, *stored_shape), np.uint8, maxshape=(None, *stored_shape),
                     chunks=(1, *stored_shape), compression="lzf")
    for name, dtype in (("t_us", np.int64), ("recording", np.int32), ("label_count", np.int32),
                        ("done_samples", np.int64), ("done_labels", np.int64)):
        g.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
    g.create_dataset("labels", (0, 5), np.float32, maxshape=(None, 5), chunks=(4096, 5))
    g.create_dataset("recordings", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(256,))


def _append(ds, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def split_cache_path(dst: str | Path, split: str) -> Path:
    """The cache file of one split inside the output folder `dst`."""
    return Path(dst).expanduser() / f"{split}.h5"


def check_sample_size(rep: EventRepresentation) -> None:
    """Refuse a representation whose model input (bins x channels x height x width bytes) exceeds MAX_SAMPLE_BYTES,
    before anything is allocated."""
    size = rep.bins * rep.channels_per_bin * rep.height * rep.width
    if size > MAX_SAMPLE_BYTES:
        raise ValueError(f"bins={rep.bins}: {rep.bins} bins x {rep.channels_per_bin} channels x {rep.height}x"
                         f"{rep.width} = {size:,} bytes per sample, expected at most {MAX_SAMPLE_BYTES:,} "
                         "(fewer bins or a smaller size)")


def _batch_size(rep: EventRepresentation) -> int:
    """Samples per batch: up to 64, and at most BATCH_BYTES of stored samples (bounded memory)."""
    return int(max(1, min(64, BATCH_BYTES // max(1, int(np.prod(rep.stored_shape))))))


def _is_tool_owned(dst: Path) -> bool:
    """Whether `dst` lies in ems-yolo's own data folder (`$EMS_YOLO_HOME/datasets`), where a broken cache is
    rebuilt instead of reported."""
    from ems_yolo.cfg import ems_home

    return (ems_home() / "datasets").resolve() in dst.resolve().parents


def _cache_attrs(p: DatasetProtocol, rep: EventRepresentation, split: str) -> dict:
    return {"representation": json.dumps(rep.to_dict(), sort_keys=True), "names": json.dumps(p.names), "split": split,
            "version": CACHE_VERSION, "protocol": p.name}


def _committed(path: Path, attrs: dict, owned: bool) -> list[str] | None:
    """The recordings an existing split cache holds (None: no usable cache). A cache of another representation or
    protocol is an error; an unreadable or old one is rebuilt in ems-yolo's own folder and an error elsewhere."""
    import h5py

    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            for key in ("representation", "protocol"):
                if key in f.attrs and f.attrs[key] != attrs[key]:
                    raise ValueError(f"{path}: cache was built with {key} {f.attrs[key]}, asked for {attrs[key]}; "
                                     "use another dst or delete the file")
            if int(f.attrs.get("version", 0)) == CACHE_VERSION and "samples" in f:
                return [_text(s) for s in f["recordings"][:]]
            problem = f"not an ems-yolo event cache of version {CACHE_VERSION}"
    except OSError as e:
        problem = f"not a readable HDF5 event cache ({e})"
    if not owned:
        raise ValueError(f"{path}: {problem}; delete it to rebuild the cache, or use another dst")
    path.unlink()
    return None


def _text(s) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


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
    the input size, the sensor being `downsample` times larger. Each recording is first written to a part file of
    its own (`<dst>/.parts/<split>/`, renamed into place when complete; `workers > 1` writes them in that many
    processes), then the parts are merged in name order into a temporary file renamed to `<dst>/<split>.h5`: a
    split cache is never written in place, so an interrupted run (even by SIGKILL) leaves no broken cache and its
    rerun resumes from the finished parts. A failed run leaves only finished parts behind.
    Returns {split: cache file} for the splits present in `src`.
    """
    p = get_protocol(protocol)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"dst={dst}: is a file, expected a folder (new, or with the caches of an earlier run)")
    rep = representation or default_representation(p)
    check_sample_size(rep)
    if (rep.width, rep.height) != (p.input_width, p.input_height):  # a sensor of another size
        check_sensor_size(f"{p.name} protocol", "width/height", rep.width * p.downsample, rep.height * p.downsample)
        p = replace(p, width=rep.width * p.downsample, height=rep.height * p.downsample)
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"{p.name} folder '{src}' has none of the split folders {list(splits)}.\n{p.help}")
    recordings = {split: find_recordings(src / split) for split in present}
    for split, found in recordings.items():
        if not found:
            raise FileNotFoundError(f"{src / split}: split '{split}' has no recordings, expected <name>_td.dat (or "
                                    f"{', '.join(EVENT_FILE_PATTERNS[1:])}) with <name>_bbox.npy pairs")
    created = [d for d in (dst, *dst.parents) if not d.exists()]  # deepest first
    owned = _is_tool_owned(dst)
    out, line_open = {}, False
    try:
        for split in present:
            path = split_cache_path(dst, split)
            attrs = _cache_attrs(p, rep, split)
            done = _committed(path, attrs, owned)
            todo = [r for r in recordings[split] if r[0] not in (done or ())]
            parts = dst / ".parts" / split
            if done is None or todo:
                jobs = [(name, events, bbox, rep, p, split) for name, events, bbox in todo]
                for i, _ in enumerate(_write_parts(jobs, parts, attrs, workers)):
                    if progress:
                        line_open = i + 1 < len(todo)
                        print(f"\r{p.name} {split}: {i + 1}/{len(todo)} recordings", end="" if line_open else "\n",
                              file=sys.stderr, flush=True)
                _merge(path, ([path] if done else []) + [_part_path(parts, job[0]) for job in jobs], attrs, rep)
            for name, _, _ in recordings[split]:  # merged now, or before a kill that came ahead of this clean-up
                _part_path(parts, name).unlink(missing_ok=True)
            _remove_empty([parts, parts.parent])
            out[split] = path
    except BaseException:
        if line_open:  # an error starts a line of its own
            print(file=sys.stderr)
        _remove_empty([*(dst / ".parts" / s for s in present), dst / ".parts", *created])  # left empty
        raise
    return out


def write_event_data_yaml(folder: str | Path) -> Path:
    """Write `<folder>/data.yaml` for the split caches found in `folder` (train.h5, val.h5, test.h5); the class
    names are those the caches were built with."""
    folder = Path(folder).expanduser().resolve()
    present = {s: split_cache_path(folder, s) for s in SPLITS if split_cache_path(folder, s).is_file()}
    if not present:
        raise FileNotFoundError(f"{folder}: no split caches ({', '.join(f'{s}.h5' for s in SPLITS)})")
    cache = EventCache(next(iter(present.values())))
    rep = cache.representation
    d = {"path": str(folder), **{s: p.name for s, p in present.items()},
         "channels": rep.bins * rep.channels_per_bin, "names": dict(cache.names)}
    out = folder / "data.yaml"
    text = yaml.safe_dump(d, sort_keys=False)
    if not out.is_file() or out.read_text() != text:
        atomic_write_text(out, text)
    return out


def _remove_empty(folders) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            pass


def _part_path(parts: Path, name: str) -> Path:
    return parts / f"{name}.h5"


def _part_is_complete(path: Path, name: str, attrs: dict) -> bool:
    """Whether a part file from an earlier run holds recording `name` under the same attributes."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs) == attrs and [_text(s) for s in f["recordings"][:]] == [name]
    except (OSError, KeyError):
        return False


def _write_parts(jobs: list[tuple], parts: Path, attrs: dict, workers: int) -> Iterator[str]:
    """Write the part file of every job not finished by an earlier run, yielding each name in job order."""
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    pending = [job for job in jobs if not _part_is_complete(_part_path(parts, job[0]), job[0], attrs)]
    if workers <= 1 or len(pending) < 2:
        names = {job[0] for job in pending}
        for job in jobs:
            if job[0] in names:
                _write_part(_part_path(parts, job[0]), job, attrs)
            yield job[0]
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch or HDF5 state
    pool = ProcessPoolExecutor(min(workers, len(pending)), mp_context=context)
    try:
        futures = {job[0]: pool.submit(_write_part, _part_path(parts, job[0]), job, attrs) for job in pending}
        for job in jobs:
            if job[0] in futures:
                futures[job[0]].result()
            yield job[0]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _recording_batches(name: str, events_path: Path, bbox: Path, rep: EventRepresentation, p: DatasetProtocol,
                       split: str) -> Iterator[tuple]:
    """The samples of one recording in batches (bounded memory): (samples, times, counts, boxes). Class ids outside
    the dataset are an error; labels whose window ends after the recording (no event in it) are dropped with a
    warning."""
    source = open_events(events_path)
    if source.width is not None and (source.width, source.height) != (p.width, p.height):
        raise ValueError(f"{events_path}: a {source.width}x{source.height} recording, expected the "
                         f"{p.width}x{p.height} sensor of {p.name} (a recording of another dataset?)")
    boxes = read_bbox(bbox)
    check_label_classes(boxes, p, str(bbox))
    labels = clean_labels(boxes, p, split, str(bbox))
    end = -1 if source.t_last is None else source.t_last
    late = {ts for ts in labels if ts - rep.window_us > end}  # windows without a single event
    if late:
        LOGGER.warning(f"WARNING {bbox}: {len(late)} of {len(labels)} label times come more than the "
                       f"{rep.window_us} us window after the last event of {events_path.name} (t={end} us), dropped "
                       f"(first at t={min(late)} us)")
    size = _batch_size(rep)
    batch: list[list] = [[], [], [], []]
    for ts, rows in labels.items():
        if ts in late:
            continue
        events = downsample_events(source.read(*rep.event_range(ts)), p.downsample)
        try:
            sample = rep.stored(events, ts)
        except ValueError as e:  # an event outside the sensor
            raise ValueError(f"{events_path}: {e} (window ending at t={ts} us)") from None
        for column, value in zip(batch, (sample, ts, len(rows), rows)):
            column.append(value)
        if len(batch[0]) == size:
            yield _stacked(batch)
            batch = [[], [], [], []]
    if batch[0]:
        yield _stacked(batch)


def _stacked(batch: list[list]) -> tuple:
    samples, times, counts, rows = batch
    return np.stack(samples), np.array(times, np.int64), np.array(counts, np.int32), np.concatenate(rows)


def _write_part(path: Path, job: tuple, attrs: dict) -> Path:
    """The samples of one recording as a one-recording cache file, written under a temporary name and renamed
    into place when complete (a killed or failed write leaves no part)."""
    import h5py

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            _create_datasets(f, job[3].stored_shape)
            _commit(f, job[0], _recording_batches(*job))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _cached_recordings(f, size: int) -> Iterator[tuple[str, Iterator[tuple]]]:
    """(name, batches of its samples) for every recording committed to a cache file (rows of an unfinished
    recording, left by an older in-place writer, are skipped)."""
    ends = np.concatenate(([0], f["done_samples"][:])).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(f["label_count"][: ends[-1]], dtype=np.int64)))

    def batches(s0: int, s1: int) -> Iterator[tuple]:
        for lo in range(s0, s1, size):
            hi = min(lo + size, s1)
            yield (f["samples"][lo:hi], f["t_us"][lo:hi], f["label_count"][lo:hi],
                   f["labels"][offsets[lo] : offsets[hi]])

    for r, name in enumerate(f["recordings"][:]):
        yield _text(name), batches(int(ends[r]), int(ends[r + 1]))


def _merge(path: Path, sources: list[Path], attrs: dict, rep: EventRepresentation) -> None:
    """Write the recordings of `sources` (caches or parts), in order, into one new split cache at `path`: built
    in a temporary file beside it and renamed into place when complete."""
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            _create_datasets(f, rep.stored_shape)
            for source in sources:
                with h5py.File(source, "r") as g:
                    for name, batches in _cached_recordings(g, _batch_size(rep)):
                        _commit(f, name, batches)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _commit(g, name: str, batches: Iterator[tuple]) -> None:
    """Append all samples of one recording, then mark it done."""
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
