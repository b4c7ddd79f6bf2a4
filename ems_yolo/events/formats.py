"""One door for every event file: `.dat` (Event2D), `.raw` (EVT 2.0/2.1/3.0), `.npy` structured arrays and RVT's
HDF5 event files (`events/{t,x,y,p}`, blosc-compressed through hdf5plugin: the `*_td.dat.h5` files of Gen1 / 1 Mpx).

`open_events(path)` gives an `EventSource` (sensor size, time span, event count, windowed `read`) whatever the
format, so prediction, conversion and the dataset tools take any of them; `read_events` is the one-call form and
`write_events` writes `.dat` or EVT 2.0 `.raw` by the suffix of the target.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ems_yolo.events.io import (
    CHUNK_EVENTS, EVENT_DTYPE, check_sensor_size, dat_header, dat_records, load_npy_events, npy_chunks, read_dat,
    read_dat_header, write_dat,
)
from ems_yolo.events.raw import RawIndex, RawReader, encode_evt2, evt2_header, write_raw_evt2
from ems_yolo.utils.files import atomic_write, refuse_overwriting_inputs, sigterm_as_interrupt

EVENT_FILE_SUFFIXES = (".dat", ".raw", ".npy", ".h5")


@dataclass(frozen=True)
class EventSource:
    """An event file opened for windowed reading: `read(t_start, t_end)` returns EVENT_DTYPE events with
    t_start <= t < t_end (None = unbounded). Sizes are None when the file does not say."""

    path: Path
    format: str
    width: int | None
    height: int | None
    t_first: int | None
    t_last: int | None
    count: int
    read: Callable[[int | None, int | None], np.ndarray]
    chunks: Callable[[], Iterator[np.ndarray]]  # every event in file order, a bounded number at a time

    @property
    def duration_us(self) -> int:
        return 0 if self.t_first is None else self.t_last - self.t_first

    def describe(self) -> str:
        """Format, sensor size, duration, event count and rate, one line."""
        size = f"{self.width}x{self.height}" if self.width else "unknown size"
        rate = self.count / (self.duration_us / 1e6) / 1e6 if self.duration_us else 0.0
        return (f"{self.path}: {self.format}, {size}, {self.duration_us / 1e3:.1f} ms "
                f"({self.t_first}..{self.t_last} us), {self.count:,} events, {rate:.2f} Mev/s")


def _dat(path: Path) -> EventSource:
    header = read_dat_header(path)
    if header.num_events:
        times = np.memmap(path, "<u4", "r", header.data_offset, (header.num_events, 2))[:, 0]
        first, last = int(times[0]), int(times[-1])
    else:
        first = last = None

    def chunks():  # time windows of about CHUNK_EVENTS events, each read through a memory map of its own
        starts = range(0, header.num_events, CHUNK_EVENTS)
        bounds = sorted({int(times[i]) for i in starts})
        for t0, t1 in zip(bounds, [*bounds[1:], None]):
            yield read_dat(path, t0, t1)

    return EventSource(path, "Event2D .dat", header.width, header.height, first, last, header.num_events,
                       lambda t0=None, t1=None: read_dat(path, t0, t1), chunks)


def _raw(path: Path) -> EventSource:
    reader = RawReader(path)
    index = RawIndex.for_reader(reader)
    first = int(index.first_t[0]) if index.events else None
    h = reader.header
    name = {"EVT2": "EVT 2.0", "EVT21": "EVT 2.1", "EVT3": "EVT 3.0"}[h.encoding]
    return EventSource(path, f"{name} .raw", h.width, h.height, first, index.last_t if index.events else None,
                       index.events, lambda t0=None, t1=None: reader.read(t0, t1),
                       lambda: (d.events for d in reader.chunks()))


def _npy(path: Path) -> EventSource:
    events, width, height = load_npy_events(path)
    t = np.asarray(events["t"])

    def as_events(part: np.ndarray) -> np.ndarray:
        out = np.empty(len(part), EVENT_DTYPE)
        for k in "txyp":
            out[k] = part[k]
        return out

    def read(t0=None, t1=None):
        lo = 0 if t0 is None else int(np.searchsorted(t, t0, "left"))
        hi = len(t) if t1 is None else int(np.searchsorted(t, t1, "left"))
        return as_events(events[lo:hi])

    def chunks():
        return (as_events(part) for _, part in npy_chunks(path, events))

    return EventSource(path, "structured .npy", width, height, int(t[0]) if len(t) else None,
                       int(t[-1]) if len(t) else None, len(t), read, chunks)


def h5py_with_filters():
    """h5py with the compression filters of RVT's files registered (hdf5plugin: blosc, zstd, lz4, ...)."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the filters on import)

    return h5py


def is_event_h5(path: str | os.PathLike) -> bool:
    """Whether an HDF5 file holds an event stream in RVT's layout (an `events` group with t, x, y, p), as opposed
    to an ems-yolo sample cache."""
    h5py = h5py_with_filters()
    try:
        with h5py.File(path, "r") as f:
            g = f.get("events")
            return isinstance(g, h5py.Group) and all(k in g for k in "txyp")
    except OSError:
        return False


class _Column:
    """One element at a time of an HDF5 dataset, for `bisect` (a window search reads about log2(n) elements)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return int(self.ds[i])


def _h5(path: Path) -> EventSource:
    h5py = h5py_with_filters()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}), expected an HDF5 event file") from None
    with f:
        g = f.get("events")
        if not (isinstance(g, h5py.Group) and all(k in g for k in "txyp")):
            raise ValueError(f"{path}: no 'events' group with t, x, y, p, expected an RVT-layout HDF5 event file "
                             "(an ems-yolo sample cache is a prediction source or a dataset split, not an event file)")
        count = len(g["t"])
        size = [int(g[k][()]) if k in g else None for k in ("width", "height")]
        check_sensor_size(path, "events/width, events/height", *size)
        first = int(g["t"][0]) if count else None
        last = int(g["t"][-1]) if count else None

    def rows(g, lo: int, hi: int, t_min: int = 0) -> np.ndarray:
        """Events [lo, hi) as RVT reads them: times made non-decreasing (from t_min), polarity -1 read as 0."""
        out = np.empty(hi - lo, EVENT_DTYPE)
        out["t"] = np.maximum.accumulate(np.maximum(np.asarray(g["t"][lo:hi], np.int64), t_min)) if hi > lo else []
        out["x"], out["y"] = g["x"][lo:hi], g["y"][lo:hi]
        out["p"] = np.clip(np.asarray(g["p"][lo:hi]), 0, 1)
        return out

    def read(t0=None, t1=None):
        with h5py.File(path, "r") as f:
            g = f["events"]
            times = _Column(g["t"])
            lo = 0 if t0 is None else bisect.bisect_left(times, t0)
            hi = count if t1 is None else bisect.bisect_left(times, t1, lo)
            return rows(g, lo, hi)

    def chunks():
        with h5py.File(path, "r") as f:
            t_min = 0
            for lo in range(0, count, CHUNK_EVENTS):
                part = rows(f["events"], lo, min(lo + CHUNK_EVENTS, count), t_min)
                t_min = int(part["t"][-1])
                yield part

    return EventSource(path, "RVT HDF5 events", size[0], size[1], first, last, count, read, chunks)


_OPENERS = {".dat": _dat, ".raw": _raw, ".npy": _npy, ".h5": _h5}


def open_events(path: str | os.PathLike) -> EventSource:
    """Open an event file of any supported format (by suffix); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: event file not found")
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        raise ValueError(f"{path}: not an event file, expected one of {', '.join(EVENT_FILE_SUFFIXES)}")
    return opener(path)


def read_events(path: str | os.PathLike, t_start: int | None = None, t_end: int | None = None) -> np.ndarray:
    """EVENT_DTYPE events of any supported file with t_start <= t < t_end (µs; None = unbounded)."""
    return open_events(path).read(t_start, t_end)


def write_events(path: str | os.PathLike, events: np.ndarray, width: int, height: int) -> Path:
    """Write events as `.dat` (Event2D) or `.raw` (EVT 2.0) by the target's suffix (atomic)."""
    path = Path(path)
    if path.suffix == ".raw":
        return write_raw_evt2(path, events, width, height)
    if path.suffix == ".dat":
        write_dat(path, events, width, height)
        return path
    raise ValueError(f"{path}: cannot write events there, expected a .dat or .raw target")


def convert_events(source: str | os.PathLike, out: str | os.PathLike, width: int | None = None,
                   height: int | None = None) -> tuple[Path, int]:
    """Re-encode an event file (any readable format) as `.dat` or EVT 2.0 `.raw`; returns (file, event count).
    The sensor size is the source's unless `width`/`height` are given (they must be for a file that does not say).
    The events stream through in chunks (memory does not grow with the file) into a temporary file renamed at the
    end; `out` may not be the source."""
    out = Path(out)
    if out.suffix not in (".dat", ".raw"):
        raise ValueError(f"{out}: cannot write events there, expected a .dat or .raw target")
    refuse_overwriting_inputs(out, source=source)
    src = open_events(source)
    width, height = int(width or src.width or 0), int(height or src.height or 0)
    if not (width and height):
        raise ValueError(f"{src.path}: the sensor size is unknown (its header has none), expected width= and height=")
    dat = out.suffix == ".dat"
    header = dat_header(width, height) if dat else evt2_header(width, height)
    count, last = 0, 0

    def encode(events: np.ndarray) -> bytes:
        if dat:
            return dat_records(events, width, height).tobytes()
        if events.size and (int(events["x"].max()) >= width or int(events["y"].max()) >= height):
            raise ValueError(f"{src.path}: events outside the {width}x{height} sensor cannot be written")
        return encode_evt2(events)

    def write(f) -> None:
        nonlocal count, last
        f.write(header)
        for events in src.chunks():
            if events.size and int(events["t"][0]) < last:
                raise ValueError(f"{src.path}: field 't' must be non-decreasing: event {count} has "
                                 f"t={int(events['t'][0])} after t={last}")
            f.write(encode(events))
            count += len(events)
            last = int(events["t"][-1]) if events.size else last

        if count != src.count:
            raise ValueError(f"{src.path}: {count:,} of its {src.count:,} events read in time order, expected all "
                             "(are its times non-decreasing?)")

    with sigterm_as_interrupt():  # a killed conversion removes its temporary file
        atomic_write(out, write)
    return out, count
