"""Tests for `ems_yolo.events.io`: the real N-CARS sample, windowed/streaming reads, writer, corrupt files, boxes."""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from shared_data import SAMPLE, needs_sample

from ems_yolo.events import (BBOX_DTYPE, BBOX_DTYPE_V1, EVENT_DTYPE, DatReader, EventFileError, read_bbox, read_dat,
                             read_dat_header, write_bbox, write_dat)

HEADER_304x240 = b"% Data file containing Event2D events\n% Version 2\n% Height 240\n% Width 304\n"


def _records(*events: tuple[int, int, int, int], extra_bits: int = 0) -> bytes:
    """Pack (t, x, y, p) tuples as raw little-endian Event2D records."""
    return b"".join(struct.pack("<II", t, x | (y << 14) | (p << 28) | extra_bits) for t, x, y, p in events)


def _write(tmp_path: Path, data: bytes, name: str = "f.dat") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _events(t, x, y, p) -> np.ndarray:
    events = np.empty(len(t), dtype=EVENT_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t, x, y, p
    return events


def _synthetic(n: int = 5000, seed: int = 0) -> np.ndarray:
    """Random Gen1-sized events with many repeated timestamps."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 200_000, n))
    return _events(t, rng.integers(0, 304, n), rng.integers(0, 240, n), rng.integers(0, 2, n))


# --- real file -------------------------------------------------------------------------------------------


@needs_sample
def test_sample_header_facts():
    header = read_dat_header(SAMPLE)
    assert header.event_type == 0 and header.event_size == 8
    assert header.data_offset == 93
    assert header.num_events == 2009
    assert header.width is None and header.height is None
    assert header.fields["Version"] == "2"
    assert header.fields["Date"] == "2017-10-31 11:29:21"


@needs_sample
def test_sample_events_facts():
    events = read_dat(SAMPLE)
    assert events.dtype == EVENT_DTYPE
    assert events.size == 2009
    assert events["t"][0] == 0 and events["t"][-1] == 99_952
    assert np.all(np.diff(events["t"]) >= 0)
    assert events["x"].max() == 77 and events["y"].max() == 41
    assert np.bincount(events["p"], minlength=2).tolist() == [659, 1350]


@needs_sample
def test_sample_decoding_matches_struct_unpack():
    raw = SAMPLE.read_bytes()[93:]
    events = read_dat(SAMPLE)
    for i in (0, 1, 2, 1000, 2008):
        t, w = struct.unpack_from("<II", raw, 8 * i)
        assert tuple(events[i].tolist()) == (t, w & 0x3FFF, (w >> 14) & 0x3FFF, (w >> 28) & 1)


@needs_sample
def test_sample_random_windows_equal_full_read_slices():
    full = read_dat(SAMPLE)
    t = full["t"]
    rng = np.random.default_rng(1)
    # Arbitrary bounds, bounds exactly on event times (many are repeated), and bounds outside the file.
    candidates = np.concatenate([rng.integers(-1000, 101_000, 150), rng.choice(t, 150), [0, 99_952, 99_953]])
    for _ in range(400):
        a, b = np.sort(rng.choice(candidates, 2))
        window = read_dat(SAMPLE, int(a), int(b))
        np.testing.assert_array_equal(window, full[(t >= a) & (t < b)])
    np.testing.assert_array_equal(read_dat(SAMPLE, t_start=50_000), full[t >= 50_000])
    np.testing.assert_array_equal(read_dat(SAMPLE, t_end=50_000), full[t < 50_000])
    assert read_dat(SAMPLE, 99_953, 200_000).size == 0


@needs_sample
def test_window_boundaries_are_half_open():
    full = read_dat(SAMPLE)
    times, counts = np.unique(full["t"], return_counts=True)
    shared = int(times[counts > 1][0])  # several events at this exact time
    at_shared = int(np.sum(full["t"] == shared))
    window = read_dat(SAMPLE, shared, shared + 1)
    assert window.size == at_shared and np.all(window["t"] == shared)
    assert np.all(read_dat(SAMPLE, 0, shared)["t"] < shared)
    assert read_dat(SAMPLE, 0, shared).size == int(np.sum(full["t"] < shared))
    assert read_dat(SAMPLE, shared, shared).size == 0
    with pytest.raises(ValueError, match="before t_start"):
        read_dat(SAMPLE, 10, 5)


@needs_sample
@pytest.mark.parametrize("delta_t", [1, 7, 1000, 33_333, 50_000, 10**6])
def test_reader_delta_t_chunks_concatenate_to_full_read(delta_t):
    full = read_dat(SAMPLE)
    reader = DatReader(SAMPLE)
    chunks = []
    while not reader.done:
        start = reader.current_time
        chunk = reader.load_delta_t(delta_t)
        assert np.all((chunk["t"] >= start) & (chunk["t"] < start + delta_t))
        assert reader.current_time == start + delta_t
        chunks.append(chunk)
    np.testing.assert_array_equal(np.concatenate(chunks), full)


@needs_sample
def test_reader_seek_time_and_load_n_events():
    full = read_dat(SAMPLE)
    reader = DatReader(SAMPLE)
    assert reader.num_events == 2009 and reader.header.data_offset == 93

    shared = int(full["t"][500])
    reader.seek_time(shared)
    first = int(np.searchsorted(full["t"], shared))
    assert reader.current_time == shared
    np.testing.assert_array_equal(reader.load_delta_t(1), full[full["t"] == shared])

    reader.seek_time(0)
    batch = reader.load_n_events(300)
    np.testing.assert_array_equal(batch, full[:300])
    assert reader.current_time == full["t"][300]
    # Mixing with load_delta_t continues exactly after the last returned event.
    rest = reader.load_delta_t(10**6)
    np.testing.assert_array_equal(rest, full[300:])
    assert reader.done

    reader.seek_time(shared)
    tail = reader.load_n_events(10**6)
    np.testing.assert_array_equal(tail, full[first:])
    assert reader.done and reader.current_time == full["t"][-1] + 1
    assert reader.load_n_events(5).size == 0
    with pytest.raises(ValueError):
        reader.load_delta_t(0)


# --- writer ----------------------------------------------------------------------------------------------


def test_write_read_round_trip_with_extreme_values(tmp_path):
    events = _synthetic()
    events[-1] = (events["t"][-1], 303, 239, 1)
    events[-2] = (events["t"][-2], 303, 239, 0)
    events[0] = (0, 0, 0, 0)
    before = events.copy()
    path = tmp_path / "rt_td.dat"
    write_dat(path, events)
    np.testing.assert_array_equal(events, before)  # input untouched

    header = read_dat_header(path)
    assert (header.width, header.height) == (304, 240)
    assert (header.event_type, header.event_size, header.num_events) == (0, 8, events.size)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", header.fields["Date"])
    np.testing.assert_array_equal(read_dat(path), events)

    raw = path.read_bytes()
    assert raw.startswith(b"% Data file containing Event2D events\n% Version 2\n% Date ")
    assert raw[header.data_offset - 2 : header.data_offset] == b"\x00\x08"
    assert raw[-8:] == struct.pack("<II", int(events["t"][-1]), 303 | (239 << 14) | (1 << 28))


def test_write_accepts_other_integer_dtypes_and_max_uint32_time(tmp_path):
    events = np.zeros(3, dtype=[("t", "<u8"), ("x", "i4"), ("y", "u1"), ("p", "?")])
    events["t"] = [5, 5, 2**32 - 1]
    events["x"], events["y"], events["p"] = [1, 2, 3], [4, 5, 6], [True, False, True]
    path = tmp_path / "d.dat"
    write_dat(path, events, width=8, height=7)
    out = read_dat(path)
    assert out["t"].tolist() == [5, 5, 2**32 - 1]
    assert out["x"].tolist() == [1, 2, 3] and out["y"].tolist() == [4, 5, 6] and out["p"].tolist() == [1, 0, 1]
    assert (read_dat_header(path).width, read_dat_header(path).height) == (8, 7)


def test_write_empty_events(tmp_path):
    path = tmp_path / "empty.dat"
    write_dat(path, np.empty(0, dtype=EVENT_DTYPE))
    assert read_dat_header(path).num_events == 0
    assert read_dat(path).size == 0 and read_dat(path, 0, 10).size == 0
    assert DatReader(path).done


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("t", -1, "'t' out of range"),
        ("t", 2**32, "'t' out of range"),
        ("x", 304, "'x' out of range"),
        ("y", 240, "'y' out of range"),
        ("p", 2, "'p' out of range"),
    ],
)
def test_write_rejects_out_of_range_fields(tmp_path, field, value, pattern):
    events = np.zeros(3, dtype=[("t", "i8"), ("x", "i8"), ("y", "i8"), ("p", "i8")])
    events["t"] = [0, 1, 2]
    if field == "t" and value > 2:
        events["t"][2] = value
    else:
        events[field][1] = value
    path = tmp_path / "bad.dat"
    with pytest.raises(ValueError, match=pattern):
        write_dat(path, events)
    assert not path.exists()


def test_write_rejects_bad_inputs(tmp_path):
    path = tmp_path / "bad.dat"
    events = _synthetic(10)
    unsorted = events.copy()
    unsorted["t"][5] = unsorted["t"][4] - 1
    with pytest.raises(ValueError, match="'t' must be non-decreasing: event 5"):
        write_dat(path, unsorted)
    with pytest.raises(ValueError, match=r"lack required fields \['p'\]"):
        write_dat(path, np.zeros(2, dtype=[("t", "i8"), ("x", "u2"), ("y", "u2")]))
    with pytest.raises(ValueError, match="'t' must have an integer dtype"):
        write_dat(path, np.zeros(2, dtype=[("t", "f8"), ("x", "u2"), ("y", "u2"), ("p", "u1")]))
    with pytest.raises(ValueError, match="width"):
        write_dat(path, events, width=0)
    assert not path.exists()


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "a.dat"
    write_dat(path, _synthetic(10, seed=1))
    good = path.read_bytes()
    bad = _synthetic(10, seed=2)
    bad["x"][3] = 999
    with pytest.raises(ValueError):
        write_dat(path, bad)
    assert path.read_bytes() == good
    replacement = _synthetic(20, seed=3)
    write_dat(path, replacement)
    np.testing.assert_array_equal(read_dat(path), replacement)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dat"]


# --- legacy and partial headers --------------------------------------------------------------------------


def test_legacy_file_without_header(tmp_path):
    path = _write(tmp_path, _records((0, 1, 2, 1), (10, 16383, 16383, 0), (10, 3, 4, 1)))
    header = read_dat_header(path)
    assert (header.event_type, header.event_size, header.data_offset, header.num_events) == (0, 8, 0, 3)
    assert header.width is None and header.height is None and header.fields == {}
    assert read_dat(path).tolist() == [(0, 1, 2, 1), (10, 16383, 16383, 0), (10, 3, 4, 1)]


def test_eventcd_type_and_header_without_size_keywords(tmp_path):
    path = _write(tmp_path, b"% Version 2\n\x0c\x08" + _records((0, 500, 400, 1)))
    header = read_dat_header(path)
    assert header.event_type == 0x0C and header.data_offset == 14 and header.width is None
    assert read_dat(path).tolist() == [(0, 500, 400, 1)]


def test_polarity_high_bits_are_ignored(tmp_path):
    path = _write(tmp_path, HEADER_304x240 + b"\x00\x08" + _records((0, 5, 6, 1), (1, 7, 8, 0), extra_bits=0xE << 28))
    assert read_dat(path).tolist() == [(0, 5, 6, 1), (1, 7, 8, 0)]


# --- corrupt files ---------------------------------------------------------------------------------------


def _assert_error(path: Path, offset: int, pattern: str, read=read_dat) -> EventFileError:
    with pytest.raises(EventFileError) as info:
        read(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.offset == offset and error.path == path
    assert str(path) in str(error) and f"byte offset {offset}" in str(error)
    assert re.search(pattern, str(error))
    return error


def test_bad_type_byte(tmp_path):
    path = _write(tmp_path, HEADER_304x240 + b"\x0e\x08" + _records((0, 1, 1, 1)))
    _assert_error(path, len(HEADER_304x240), "unsupported event type 0x0E", read=read_dat_header)


def test_bad_size_byte(tmp_path):
    path = _write(tmp_path, HEADER_304x240 + b"\x00\x10" + _records((0, 1, 1, 1)))
    _assert_error(path, len(HEADER_304x240) + 1, "event size 16", read=read_dat_header)


def test_truncated_record(tmp_path):
    data_offset = len(HEADER_304x240) + 2
    path = _write(tmp_path, HEADER_304x240 + b"\x00\x08" + _records((0, 1, 1, 1), (5, 2, 2, 0)) + b"\x01\x02\x03")
    _assert_error(path, data_offset + 16, "truncated record: 3 trailing bytes")
    legacy = _write(tmp_path, _records((0, 1, 1, 1)) + b"\x00", "legacy.dat")
    _assert_error(legacy, 8, "truncated record")


def test_decreasing_timestamps(tmp_path):
    data_offset = len(HEADER_304x240) + 2
    records = _records((0, 1, 1, 1), (10, 1, 1, 1), (20, 1, 1, 1), (15, 1, 1, 1), (30, 1, 1, 1), (40, 1, 1, 1))
    path = _write(tmp_path, HEADER_304x240 + b"\x00\x08" + records)
    bad_offset = data_offset + 3 * 8
    _assert_error(path, bad_offset, "timestamps decrease at record 3")
    # Windows whose slice contains the offending pair detect it too.
    _assert_error(path, bad_offset, "record 3", read=lambda p: read_dat(p, 0, 16))
    _assert_error(path, bad_offset, "record 3", read=lambda p: read_dat(p, 12, 16))

    def stream_delta_t(p: Path) -> None:
        reader = DatReader(p)
        while not reader.done:
            reader.load_delta_t(5)

    def stream_n_events(p: Path) -> None:
        reader = DatReader(p)
        assert reader.load_n_events(3)["t"].tolist() == [0, 10, 20]
        reader.load_n_events(3)  # the chunk boundary falls on the offending pair

    _assert_error(path, bad_offset, "record 3", read=stream_delta_t)
    _assert_error(path, bad_offset, "record 3", read=stream_n_events)


def test_out_of_range_coordinates(tmp_path):
    data_offset = len(HEADER_304x240) + 2
    path = _write(tmp_path, HEADER_304x240 + b"\x00\x08" + _records((0, 303, 239, 1), (1, 304, 5, 0), (2, 1, 1, 0)))
    _assert_error(path, data_offset + 8, "x=304, y=5 outside the 304x240 sensor")
    records_y = _records((0, 1, 1, 1), (1, 1, 1, 0), (2, 1, 240, 0))
    path_y = _write(tmp_path, HEADER_304x240 + b"\x00\x08" + records_y, "y.dat")
    _assert_error(path_y, data_offset + 16, "y=240")
    # Windowed reads decode only their slice: a bad record outside the window is not touched.
    assert read_dat(path_y, 0, 2).size == 2


def test_truncated_header(tmp_path):
    unterminated = _write(tmp_path, b"% Data file containing Event2D events\n% Vers", "a.dat")
    _assert_error(unterminated, 38, "truncated header")
    no_type_bytes = _write(tmp_path, b"% Version 2\n\x00", "b.dat")
    _assert_error(no_type_bytes, 12, "missing event type and size bytes")
    empty = _write(tmp_path, b"", "c.dat")
    _assert_error(empty, 0, "empty")


def test_bad_header_dimension(tmp_path):
    path = _write(tmp_path, b"% Version 2\n% Width abc\n\x00\x08")
    _assert_error(path, 12, "Width 'abc' is not an integer", read=read_dat_header)


def test_missing_file_and_error_pickles(tmp_path):
    missing = tmp_path / "missing.dat"
    with pytest.raises(FileNotFoundError, match="missing.dat"):
        read_dat(missing)
    error = pickle.loads(pickle.dumps(EventFileError(missing, 7, "reason")))
    assert (error.path, error.offset, str(error)) == (missing, 7, f"{missing}: reason (at byte offset 7)")


# --- boxes -----------------------------------------------------------------------------------------------


def _boxes_v2() -> np.ndarray:
    boxes = np.zeros(4, dtype=BBOX_DTYPE)
    boxes["t"] = [500_000, 500_000, 750_000, 1_000_000]
    boxes["x"], boxes["y"] = [1.5, 10.0, 20.25, 300.0], [2.0, 3.0, 4.0, 5.0]
    boxes["w"], boxes["h"] = [30.0, 40.0, 50.0, 60.0], [15.0, 16.0, 17.0, 18.0]
    boxes["class_id"], boxes["track_id"] = [0, 1, 0, 1], [7, 8, 7, 9]
    boxes["class_confidence"] = [1.0, 0.5, 1.0, 0.25]
    return boxes


def test_bbox_dtype_layouts():
    assert BBOX_DTYPE.itemsize == 40
    assert [BBOX_DTYPE.fields[n][1] for n in BBOX_DTYPE.names] == [0, 8, 12, 16, 20, 24, 28, 32]
    assert BBOX_DTYPE.names == ("t", "x", "y", "w", "h", "class_id", "track_id", "class_confidence")
    assert BBOX_DTYPE_V1.names == ("ts", "x", "y", "w", "h", "class_id", "confidence", "track_id")
    assert BBOX_DTYPE_V1["ts"] == np.dtype("<u8") and BBOX_DTYPE_V1["class_id"] == np.dtype("u1")


@pytest.mark.parametrize("version", [1, 2])
def test_bbox_round_trip(tmp_path, version):
    boxes = _boxes_v2()
    before = boxes.copy()
    path = tmp_path / "x_bbox.npy"
    write_bbox(path, boxes, version=version)
    np.testing.assert_array_equal(boxes, before)
    on_disk = np.load(path)
    assert on_disk.dtype == (BBOX_DTYPE_V1 if version == 1 else BBOX_DTYPE)
    loaded = read_bbox(path)
    assert loaded.dtype == BBOX_DTYPE
    np.testing.assert_array_equal(loaded, boxes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_bbox.npy"]


def test_bbox_default_version_is_v1_and_accepts_v1_input(tmp_path):
    v1 = np.zeros(2, dtype=BBOX_DTYPE_V1)
    v1["ts"], v1["x"], v1["class_id"], v1["confidence"], v1["track_id"] = [1, 2], [3.0, 4.0], [1, 0], [1, 1], [5, 6]
    path = tmp_path / "v1_bbox.npy"
    write_bbox(path, v1)
    np.testing.assert_array_equal(np.load(path), v1)
    write_bbox(path, v1, version=2)
    on_disk = np.load(path)
    assert on_disk.dtype == BBOX_DTYPE
    assert on_disk["t"].tolist() == [1, 2] and on_disk["track_id"].tolist() == [5, 6]


def test_bbox_v1_to_v2_by_name(tmp_path):
    # Field order shuffled on purpose: conversion must go by name, not position.
    order = ("track_id", "confidence", "ts", "h", "w", "class_id", "y", "x")
    shuffled = np.dtype([(name, BBOX_DTYPE_V1[name]) for name in order])
    v1 = np.zeros(3, dtype=shuffled)
    v1["ts"] = [100, 200, 200]
    v1["x"], v1["y"], v1["w"], v1["h"] = [1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]
    v1["class_id"], v1["confidence"], v1["track_id"] = [0, 1, 1], [1.0, 0.75, 0.5], [42, 43, 44]
    path = tmp_path / "gen1_bbox.npy"
    np.save(path, v1)
    boxes = read_bbox(path)
    assert boxes.dtype == BBOX_DTYPE
    assert boxes["t"].tolist() == [100, 200, 200]
    assert boxes["x"].tolist() == [1, 2, 3] and boxes["y"].tolist() == [4, 5, 6]
    assert boxes["w"].tolist() == [7, 8, 9] and boxes["h"].tolist() == [10, 11, 12]
    assert boxes["class_id"].tolist() == [0, 1, 1]
    assert boxes["class_confidence"].tolist() == [1.0, 0.75, 0.5]
    assert boxes["track_id"].tolist() == [42, 43, 44]


def test_bbox_rejects_unexpected_fields(tmp_path):
    path = tmp_path / "odd_bbox.npy"
    np.save(path, np.zeros(2, dtype=[("t", "<i8"), ("x", "<f4")]))
    expected = r"odd_bbox\.npy: unexpected box fields \['t', 'x'\]; expected .*'ts'.*'class_confidence'"
    with pytest.raises(ValueError, match=expected):
        read_bbox(path)
    plain = tmp_path / "plain_bbox.npy"
    np.save(plain, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="unexpected box fields"):
        read_bbox(plain)


def test_bbox_rejects_unsorted_and_unrepresentable(tmp_path):
    boxes = _boxes_v2()[[0, 2, 1]]
    path = tmp_path / "u_bbox.npy"
    np.save(path, boxes)
    with pytest.raises(ValueError, match=r"u_bbox\.npy: boxes are not sorted by time: row 2"):
        read_bbox(path)
    with pytest.raises(ValueError, match="not sorted"):
        write_bbox(tmp_path / "w_bbox.npy", boxes, version=2)
    big_class = _boxes_v2()
    big_class["class_id"][1] = 256
    with pytest.raises(ValueError, match="'class_id' value 256 at row 1"):
        write_bbox(tmp_path / "w_bbox.npy", big_class, version=1)
    negative_t = _boxes_v2()
    negative_t["t"][0] = -1
    with pytest.raises(ValueError, match="'t' value -1"):
        write_bbox(tmp_path / "w_bbox.npy", negative_t, version=1)
    with pytest.raises(ValueError, match="version"):
        write_bbox(tmp_path / "w_bbox.npy", _boxes_v2(), version=3)
    assert not (tmp_path / "w_bbox.npy").exists()
