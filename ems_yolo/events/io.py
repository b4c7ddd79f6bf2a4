"""Readers and writers for Prophesee event files (`.dat` Event2D) and Gen1 box files (`_bbox.npy`).

The `.dat` layout (events-spec §2): optional ASCII header lines starting with ``b"% "``, then one event-type
byte and one event-size byte (only when a header exists), then 8-byte little-endian records
``(uint32 t, uint32 w)`` with ``x = w & 0x3FFF``, ``y = (w >> 14) & 0x3FFF`` and ``p = (w >> 28) & 1``.

Records are memory-mapped, never read whole for a time window: the window's index range is found by binary
search over the mapped ``t`` column and only that slice is decoded. The search uses :func:`bisect.bisect_left`
on the mapped column rather than :func:`numpy.searchsorted`, because the records start at an arbitrary header
length (93 bytes in the N-CARS sample), so the ``t`` view is unaligned and ``numpy.searchsorted`` would copy
the entire column before searching. Every decoded slice is checked, together with its two neighbouring
records, for decreasing timestamps and for coordinates outside the sensor declared in the header; problems
raise :class:`EventFileError` naming the file and the byte offset of the offending record.

Box files (events-spec §3) come in the Gen1 original layout (v1) and the toolbox/RVT layout (v2); reading
always returns v2, converting fields by name.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ems_yolo.utils.files import atomic_write

__all__ = [
    "BBOX_DTYPE",
    "BBOX_DTYPE_V1",
    "EVENT_DTYPE",
    "DatHeader",
    "DatReader",
    "EventFileError",
    "concat_boxes",
    "convert_boxes",
    "detections_to_boxes",
    "read_bbox",
    "read_dat",
    "read_dat_header",
    "write_bbox",
    "write_dat",
]

PathLike = str | os.PathLike

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
"""Decoded events: time in µs (int64), pixel column and row, polarity (1 = ON, 0 = OFF)."""

BBOX_DTYPE = np.dtype(
    {
        "names": ["t", "x", "y", "w", "h", "class_id", "track_id", "class_confidence"],
        "formats": ["<i8", "<f4", "<f4", "<f4", "<f4", "<u4", "<u4", "<f4"],
        "offsets": [0, 8, 12, 16, 20, 24, 28, 32],
        "itemsize": 40,
    }
)
"""v2 box layout (Prophesee toolbox canonical, 1 Mpx, RVT); ``x, y`` is the top-left corner in pixels."""

BBOX_DTYPE_V1 = np.dtype(
    [
        ("ts", "<u8"),
        ("x", "<f4"),
        ("y", "<f4"),
        ("w", "<f4"),
        ("h", "<f4"),
        ("class_id", "u1"),
        ("confidence", "<f4"),
        ("track_id", "<u4"),
    ]
)
"""v1 box layout as shipped with the original Gen1 dataset."""

_RECORD_DTYPE = np.dtype([("t", "<u4"), ("w", "<u4")])
_RECORD_SIZE = _RECORD_DTYPE.itemsize
_EVENT_TYPES = {0x00: "Event2D", 0x0C: "EventCD"}
_COORD_MASK = 0x3FFF
MAX_SENSOR_SIZE = 8192  # the largest sensor side a file may declare (sane: event cameras reach 1280x720)
_UINT32_MAX = 0xFFFFFFFF
_HEADER_PREFIX = b"% "
_V1_TO_V2_NAMES = {"ts": "t", "confidence": "class_confidence"}


class EventFileError(ValueError):
    """A malformed event file; ``path`` is the file and ``offset`` the byte offset of the problem."""

    def __init__(self, path: PathLike, offset: int, reason: str) -> None:
        super().__init__(path, offset, reason)
        self.path = Path(path)
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} (at byte offset {self.offset})"


@dataclass(frozen=True)
class DatHeader:
    """Parsed `.dat` header.

    ``width``/``height`` are None when the header does not declare them; ``fields`` maps the first word of each
    header line to the rest of the line (e.g. ``{"Version": "2"}``), kept raw for callers that need it.
    """

    width: int | None
    height: int | None
    event_type: int
    event_size: int
    data_offset: int
    num_events: int
    fields: dict[str, str]


def _parse_sensor_side(path: Path, offset: int, key: str, value: str) -> int:
    """Parse a ``Width``/``Height`` header value, which must lie in 1..MAX_SENSOR_SIZE."""
    try:
        side = int(value)
    except ValueError:
        raise EventFileError(path, offset, f"header {key} {value!r} is not an integer") from None
    if not 1 <= side <= MAX_SENSOR_SIZE:
        raise EventFileError(path, offset, f"header {key} {side} is outside 1..{MAX_SENSOR_SIZE}")
    return side


def check_sensor_size(source: PathLike | str, key: str, width: int | None, height: int | None) -> None:
    """Refuse a sensor size that a file declares (or implies) beyond MAX_SENSOR_SIZE, before anything of that size
    is allocated; `key` names the header field or array field it came from."""
    for side in (width, height):
        if side is not None and not 1 <= side <= MAX_SENSOR_SIZE:
            raise ValueError(f"{source}: {key} gives a {width}x{height} sensor, expected sides in "
                             f"1..{MAX_SENSOR_SIZE}")


def _parse_header(path: Path, f: BinaryIO, file_size: int) -> DatHeader:
    """Read the header lines and type/size bytes from ``f`` positioned at the start of the file."""
    if file_size == 0:
        raise EventFileError(path, 0, "file is empty (no header and no events)")
    fields: dict[str, str] = {}
    sides: dict[str, int] = {}
    offset = 0
    while True:
        f.seek(offset)
        if f.read(len(_HEADER_PREFIX)) != _HEADER_PREFIX:
            break
        line = _HEADER_PREFIX + f.readline()
        if not line.endswith(b"\n"):
            raise EventFileError(path, offset, "truncated header: last header line has no newline")
        key, _, value = line[len(_HEADER_PREFIX) :].rstrip(b"\r\n").decode("latin-1").partition(" ")
        value = value.strip()
        fields[key] = value
        if key in ("Width", "Height"):
            sides[key] = _parse_sensor_side(path, offset, key, value)
        offset += len(line)

    if offset == 0:
        event_type, event_size, data_offset = 0x00, _RECORD_SIZE, 0
    else:
        f.seek(offset)
        type_and_size = f.read(2)
        if len(type_and_size) < 2:
            raise EventFileError(path, offset, "truncated header: missing event type and size bytes")
        event_type, event_size = type_and_size
        if event_type not in _EVENT_TYPES:
            supported = " or ".join(f"0x{code:02X} {name}" for code, name in _EVENT_TYPES.items())
            raise EventFileError(path, offset, f"unsupported event type 0x{event_type:02X} (expected {supported})")
        if event_size != _RECORD_SIZE:
            raise EventFileError(path, offset + 1, f"event size {event_size} is not {_RECORD_SIZE}")
        data_offset = offset + 2

    num_events, remainder = divmod(file_size - data_offset, _RECORD_SIZE)
    if remainder:
        raise EventFileError(
            path,
            data_offset + num_events * _RECORD_SIZE,
            f"truncated record: {remainder} trailing bytes after {num_events} complete records",
        )
    return DatHeader(
        width=sides.get("Width"),
        height=sides.get("Height"),
        event_type=event_type,
        event_size=event_size,
        data_offset=data_offset,
        num_events=num_events,
        fields=fields,
    )


def read_dat_header(path: PathLike) -> DatHeader:
    """Parse and validate the header of a `.dat` file without touching its records."""
    path = Path(path)
    with path.open("rb") as f:
        return _parse_header(path, f, os.fstat(f.fileno()).st_size)


class _EventRecords:
    """Memory-mapped records of one `.dat` file with binary search and checked, vectorised decoding."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.header = read_dat_header(self.path)
        if self.header.num_events:
            self._raw = np.memmap(
                self.path, dtype=_RECORD_DTYPE, mode="r", offset=self.header.data_offset,
                shape=(self.header.num_events,),
            )
        else:
            self._raw = np.empty(0, dtype=_RECORD_DTYPE)
        self._t = self._raw["t"]

    def __len__(self) -> int:
        return self.header.num_events

    def search(self, time: int, lo: int = 0) -> int:
        """Index of the first record at or after ``lo`` whose time is >= ``time`` (binary search, no copy)."""
        if time <= 0:
            return lo
        if time > _UINT32_MAX:
            return len(self)
        return bisect.bisect_left(self._t, int(time), lo)

    def time_at(self, index: int) -> int:
        """Timestamp of the record at ``index``."""
        return int(self._t[index])

    def _record_offset(self, index: int) -> int:
        return self.header.data_offset + index * _RECORD_SIZE

    def decode(self, lo: int, hi: int) -> np.ndarray:
        """Decode records ``[lo, hi)`` to EVENT_DTYPE after checking them.

        Timestamps are checked over ``[lo - 1, hi + 1)`` so that the consecutive chunks of a streaming read
        overlap and every adjacent pair of records gets checked; coordinates are checked over ``[lo, hi)``.
        """
        check_lo, check_hi = max(lo - 1, 0), min(hi + 1, len(self))
        t_check = self._t[check_lo:check_hi].astype(np.int64)
        decreasing = np.flatnonzero(t_check[1:] < t_check[:-1])
        if decreasing.size:
            index = check_lo + int(decreasing[0]) + 1
            raise EventFileError(
                self.path, self._record_offset(index),
                f"timestamps decrease at record {index}: t={t_check[index - check_lo]} after "
                f"t={t_check[index - check_lo - 1]}",
            )

        words = self._raw["w"][lo:hi].astype(np.uint32)
        events = np.empty(hi - lo, dtype=EVENT_DTYPE)
        events["t"] = t_check[lo - check_lo : hi - check_lo]
        events["x"] = words & _COORD_MASK
        events["y"] = (words >> 14) & _COORD_MASK
        events["p"] = (words >> 28) & 1

        width, height = self.header.width, self.header.height
        if width is not None or height is not None:
            outside = np.zeros(events.size, dtype=bool)
            if width is not None:
                outside |= events["x"] >= width
            if height is not None:
                outside |= events["y"] >= height
            bad = np.flatnonzero(outside)
            if bad.size:
                index = lo + int(bad[0])
                event = events[bad[0]]
                raise EventFileError(
                    self.path, self._record_offset(index),
                    f"record {index} has x={event['x']}, y={event['y']} outside the "
                    f"{width}x{height} sensor declared in the header",
                )
        return events


def read_dat(path: PathLike, t_start: int | None = None, t_end: int | None = None) -> np.ndarray:
    """Read the events of a `.dat` file with ``t_start <= t < t_end`` (µs; None = unbounded) as EVENT_DTYPE.

    Without bounds the whole file is decoded and every record is checked. With bounds the window is found by
    binary search, which presumes the whole file is sorted; only the window (plus one neighbouring record on
    each side for the ordering check) is touched, so disorder elsewhere is detected by full or streaming reads.
    """
    if t_start is not None and t_end is not None and t_end < t_start:
        raise ValueError(f"t_end ({t_end}) is before t_start ({t_start})")
    records = _EventRecords(path)
    lo = 0 if t_start is None else records.search(t_start)
    hi = len(records) if t_end is None else records.search(t_end, lo)
    return records.decode(lo, hi)


class DatReader:
    """Streaming `.dat` reader with the Prophesee toolbox semantics.

    ``current_time`` is the start of the next time window: all unread events have ``t >= current_time``.
    ``load_delta_t(dt)`` returns the unread events with ``t < current_time + dt`` (half-open window) and moves
    ``current_time`` to the window end. ``done`` is True once every event has been returned. Reading a whole
    file chunk by chunk checks the ordering of every consecutive pair of records.
    """

    def __init__(self, path: PathLike) -> None:
        self._records = _EventRecords(path)
        self._pos = 0
        self.current_time = 0

    @property
    def header(self) -> DatHeader:
        """The parsed file header."""
        return self._records.header

    @property
    def num_events(self) -> int:
        """Total number of events in the file."""
        return len(self._records)

    @property
    def done(self) -> bool:
        """True when no unread events remain."""
        return self._pos >= len(self._records)

    def seek_time(self, time: int) -> None:
        """Position at the first event with ``t >= time`` and set ``current_time`` to ``time``."""
        self._pos = self._records.search(time)
        self.current_time = time

    def load_delta_t(self, delta_t: int) -> np.ndarray:
        """Return the unread events with ``t < current_time + delta_t`` and advance ``current_time`` by it."""
        if delta_t <= 0:
            raise ValueError(f"delta_t must be positive, got {delta_t}")
        end = self.current_time + delta_t
        hi = self._records.search(end, self._pos)
        events = self._records.decode(self._pos, hi)
        self._pos, self.current_time = hi, end
        return events

    def load_n_events(self, n: int) -> np.ndarray:
        """Return the next ``n`` events (fewer at the end of the file).

        ``current_time`` becomes the time of the next unread event, or the last returned time + 1 at the end.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        hi = min(self._pos + n, len(self._records))
        events = self._records.decode(self._pos, hi)
        self._pos = hi
        if not self.done:
            self.current_time = self._records.time_at(hi)
        elif events.size:
            self.current_time = max(self.current_time, int(events["t"][-1]) + 1)
        return events


def _integer_field(array: np.ndarray, name: str, low: int, high: int, allow_bool: bool = False) -> np.ndarray:
    """Return field ``name`` as int64 after checking its dtype is integer and its values lie in [low, high]."""
    values = np.asarray(array[name])
    kinds = "iub" if allow_bool else "iu"
    if values.dtype.kind not in kinds:
        raise ValueError(f"field {name!r} must have an integer dtype, got {values.dtype}")
    if values.size:
        bad = np.flatnonzero((values < low) | (values > high))
        if bad.size:
            raise ValueError(
                f"field {name!r} out of range [{low}, {high}]: event {bad[0]} has {name}={values[bad[0]]}"
            )
    return values.astype(np.int64)


def write_dat(
    path: PathLike, events: np.ndarray, width: int = 304, height: int = 240, date: datetime | None = None
) -> None:
    """Write events (fields t, x, y, p; t in integer µs, non-decreasing) as an Event2D `.dat` file.

    The input is validated and never modified; the file is written atomically with a Version 2 header that
    declares ``Height``/``Width``.
    """
    header = dat_header(width, height, date)
    records = dat_records(events, width, height)
    atomic_write(path, lambda f: (f.write(header), f.write(records.tobytes())))


def dat_header(width: int = 304, height: int = 240, date: datetime | None = None) -> bytes:
    """The Event2D Version 2 header (``Height``/``Width`` declared) and the event type and size bytes."""
    for key, side in (("width", width), ("height", height)):
        if not isinstance(side, (int, np.integer)) or not 1 <= side <= MAX_SENSOR_SIZE:
            raise ValueError(f"{key} must be in 1..{MAX_SENSOR_SIZE}, got {side}")
    header = "".join(
        f"% {line}\n"
        for line in (
            "Data file containing Event2D events",
            "Version 2",
            f"Date {date or datetime.now():%Y-%m-%d %H:%M:%S}",
            f"Height {height}",
            f"Width {width}",
        )
    ).encode("ascii")
    return header + bytes((0x00, _RECORD_SIZE))


def dat_records(events: np.ndarray, width: int = 304, height: int = 240) -> np.ndarray:
    """Validated Event2D records of events (fields t, x, y, p), to follow `dat_header` (also chunk by chunk)."""
    names = events.dtype.names or ()
    missing = [name for name in ("t", "x", "y", "p") if name not in names]
    if missing:
        raise ValueError(f"events lack required fields {missing}; found {list(names)}")
    if events.ndim != 1:
        raise ValueError(f"events must be a 1-D structured array, got shape {events.shape}")

    t = _integer_field(events, "t", 0, _UINT32_MAX)
    decreasing = np.flatnonzero(t[1:] < t[:-1])
    if decreasing.size:
        index = int(decreasing[0]) + 1
        raise ValueError(f"field 't' must be non-decreasing: event {index} has t={t[index]} after t={t[index - 1]}")
    x = _integer_field(events, "x", 0, width - 1)
    y = _integer_field(events, "y", 0, height - 1)
    p = _integer_field(events, "p", 0, 1, allow_bool=True)

    records = np.empty(t.size, dtype=_RECORD_DTYPE)
    records["t"] = t
    records["w"] = x | (y << 14) | (p << 28)
    return records


def convert_boxes(boxes: np.ndarray, target: np.dtype, source: str) -> np.ndarray:
    """Copy v1 or v2 boxes into the ``target`` layout by field name, checking names, ranges and time order."""
    found = boxes.dtype.names
    v1_names, v2_names = set(BBOX_DTYPE_V1.names), set(BBOX_DTYPE.names)
    if found is None or set(found) not in (v1_names, v2_names):
        raise ValueError(
            f"{source}: unexpected box fields {list(found) if found else boxes.dtype}; expected "
            f"{list(BBOX_DTYPE_V1.names)} (v1) or {list(BBOX_DTYPE.names)} (v2)"
        )
    if boxes.ndim != 1:
        raise ValueError(f"{source}: boxes must be a 1-D array, got shape {boxes.shape}")

    source_is_v1 = set(found) == v1_names
    target_is_v1 = target == BBOX_DTYPE_V1
    to_v2 = _V1_TO_V2_NAMES
    to_v1 = {v2: v1 for v1, v2 in to_v2.items()}
    out = np.empty(boxes.shape, dtype=target)
    for name in target.names:
        v2_name = to_v2.get(name, name) if target_is_v1 else name
        src_name = to_v1.get(v2_name, v2_name) if source_is_v1 else v2_name
        values = boxes[src_name]
        field_dtype = target.fields[name][0]
        if field_dtype.kind in "iu" and values.size:
            if values.dtype.kind not in "iu":
                raise ValueError(f"{source}: field {src_name!r} must be integer, got {values.dtype}")
            info = np.iinfo(field_dtype)
            bad = np.flatnonzero((values < info.min) | (values > info.max))
            if bad.size:
                raise ValueError(
                    f"{source}: field {src_name!r} value {values[bad[0]]} at row {bad[0]} does not fit "
                    f"{name!r} ({field_dtype})"
                )
        out[name] = values

    t = out["ts" if target_is_v1 else "t"]
    unsorted = np.flatnonzero(t[1:] < t[:-1])
    if unsorted.size:
        row = int(unsorted[0]) + 1
        raise ValueError(f"{source}: boxes are not sorted by time: row {row} has t={t[row]} after t={t[row - 1]}")
    return out


def detections_to_boxes(xyxy: np.ndarray, class_id: np.ndarray, confidence: np.ndarray | float, t: int) -> np.ndarray:
    """Corner boxes `[n, 4]` in sensor pixels, with classes and confidences, as BBOX_DTYPE rows at time t."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    rows = np.zeros(len(xyxy), BBOX_DTYPE)
    rows["t"], rows["x"], rows["y"] = t, xyxy[:, 0], xyxy[:, 1]
    rows["w"], rows["h"] = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    rows["class_id"] = np.asarray(class_id).reshape(-1).astype(np.uint32)
    rows["class_confidence"] = np.asarray(confidence).reshape(-1) if np.ndim(confidence) else confidence
    return rows


def concat_boxes(parts: list[np.ndarray]) -> np.ndarray:
    """BBOX_DTYPE arrays joined into one, stably sorted by time (the order `_bbox.npy` files require)."""
    boxes = np.concatenate(parts) if parts else np.zeros(0, BBOX_DTYPE)
    return boxes[np.argsort(boxes["t"], kind="stable")]


def _load_npy(path: PathLike, what: str, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load` of a `.npy` file without pickles; every failure (a pickled or object array, an `.npz` archive, not
    a `.npy` at all) is one ValueError naming the file."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable {what} ({e}); expected a .npy structured array without Python "
                         "objects") from None
    if isinstance(array, np.lib.npyio.NpzFile):
        array.close()
        raise ValueError(f"{path}: expected a .npy array, got an .npz archive")
    return array


def read_bbox(path: PathLike) -> np.ndarray:
    """Load a `_bbox.npy` file (v1 or v2 layout) and return it in the v2 layout BBOX_DTYPE."""
    return convert_boxes(_load_npy(path, "boxes file"), BBOX_DTYPE, str(path))


CHUNK_EVENTS = 1 << 20  # events per piece of a whole-file pass (checks, conversion): memory does not grow with the file


def npy_chunks(path: PathLike, events: np.memmap) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first event, records) of the memory-mapped `.npy` array `events`, read from the file in pieces
    of CHUNK_EVENTS rather than through the memory map, whose touched pages would stay resident."""
    with open(path, "rb") as f:
        f.seek(events.offset)
        for lo in range(0, len(events), CHUNK_EVENTS):
            yield lo, np.fromfile(f, events.dtype, min(CHUNK_EVENTS, len(events) - lo))


def load_npy_events(path: PathLike) -> tuple[np.ndarray, int | None, int | None]:
    """A `.npy` event array, memory-mapped, with the sensor size its events span (max x + 1, max y + 1; None when
    empty), after checking it in the same one pass piece by piece (`npy_chunks`): 1-D structured with fields t, x,
    y, p, each a finite number with an integral value, t non-decreasing, coordinates inside MAX_SENSOR_SIZE. Errors
    name the file, the field and the first bad event."""
    events = _load_npy(path, "event array", mmap_mode="r")
    names = events.dtype.names or ()
    if not {"t", "x", "y", "p"} <= set(names) or events.ndim != 1:
        raise ValueError(f"{path}: a {events.dtype} array of shape {events.shape}, expected a 1-D structured array "
                         "with fields t, x, y, p")
    for name in "txyp":
        if events.dtype[name].kind not in "iubf":
            raise ValueError(f"{path}: field {name!r} has dtype {events.dtype[name]}, expected integers")
    previous = None  # the last time of the piece before
    width = height = None
    for lo, part in npy_chunks(path, events):
        for name, high in (("t", np.iinfo(np.int64).max), ("x", MAX_SENSOR_SIZE - 1), ("y", MAX_SENSOR_SIZE - 1),
                           ("p", 1)):
            values = part[name]
            if values.dtype.kind == "f":
                bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
                if bad.size:
                    raise ValueError(f"{path}: field {name!r} of event {lo + bad[0]} is {values[bad[0]]}, expected "
                                     "an integer")
            bad = np.flatnonzero((values < 0) | (values > high))
            if bad.size:
                raise ValueError(f"{path}: field {name!r} of event {lo + bad[0]} is {values[bad[0]]}, expected "
                                 f"0..{high}")
        t = part["t"] if previous is None else np.concatenate(([previous], part["t"]))
        unsorted = np.flatnonzero(t[1:] < t[:-1])
        if unsorted.size:
            i = int(unsorted[0]) + 1
            raise ValueError(f"{path}: field 't' must be non-decreasing: event {lo + i - (previous is not None)} has "
                             f"t={t[i]} after t={t[i - 1]}")
        if len(part):
            previous = part["t"][-1]
            width = max(width or 0, int(part["x"].max()) + 1)
            height = max(height or 0, int(part["y"].max()) + 1)
    return events, width, height


def write_bbox(path: PathLike, boxes: np.ndarray, version: int = 1) -> None:
    """Save v1 or v2 boxes to ``path`` in the on-disk layout ``version`` (1 = Gen1 original, 2 = toolbox/RVT)."""
    layouts = {1: BBOX_DTYPE_V1, 2: BBOX_DTYPE}
    if version not in layouts:
        raise ValueError(f"version must be 1 or 2, got {version}")
    converted = convert_boxes(boxes, layouts[version], "boxes")
    atomic_write(path, lambda f: np.save(f, converted))
