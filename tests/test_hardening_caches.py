"""Hardening of the event caches and event files (issue #21): split caches that resume after a SIGKILL at any point,
`.raw` indexes keyed by the file's identity, labels and sizes checked before anything is cached or allocated,
and one-line errors that name the file."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from event_data import GEN1_REP as REP

from ems_yolo.cfg import ems_home
from ems_yolo.cli import run
from ems_yolo.events import automotive
from ems_yolo.events.automotive import EventCache, find_recordings, preprocess_dataset
from ems_yolo.events.formats import open_events, read_events
from ems_yolo.events.io import EVENT_DTYPE, MAX_SENSOR_SIZE, read_bbox, read_dat, write_bbox, write_dat
from ems_yolo.events.raw import RawIndex, RawReader, read_raw_header, write_raw_evt2
from ems_yolo.events.synthetic import make_synthetic_gen4

REPO = Path(__file__).resolve().parents[1]
CLI_REP = ["bins=3", "window_ms=150"]  # REP from the command line


def assert_same_caches(a: Path, b: Path) -> None:
    """Every split cache of `b` exists in `a` with equal attributes and equal arrays (h5py, array by array)."""
    for split in ("train", "val", "test"):
        with h5py.File(a / f"{split}.h5", "r") as x, h5py.File(b / f"{split}.h5", "r") as y:
            assert dict(x.attrs) == dict(y.attrs)
            assert sorted(x) == sorted(y)
            for name in y:
                np.testing.assert_array_equal(x[name][:], y[name][:], err_msg=f"{split}.h5 {name}")


def _listing(folder: Path) -> list[str]:
    """Relative paths of everything under `folder` (empty while it does not exist)."""
    out = []
    for root, dirs, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in dirs + files]
    return out


def _interrupt(args: list[str], dst: Path, when, sig: int = signal.SIGKILL) -> list[str] | None:
    """Run `python -m ems_yolo *args` in a process group of its own and send `sig` to the whole group as soon as
    `when(files under dst, seconds since start)` holds; returns the listing it was stopped on (None: it finished
    first)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ems_yolo", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, stopped_on = time.monotonic(), None
    try:
        while proc.poll() is None:
            files = _listing(dst)
            if when(files, time.monotonic() - start):
                os.killpg(proc.pid, sig)
                stopped_on = files
                break
            time.sleep(0.002)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return stopped_on


def _has(pattern: str):
    return lambda files, _: any(Path(f).match(pattern) for f in files)


def _after(seconds: float):
    return lambda files, elapsed: elapsed >= seconds


KILL_POINTS = {
    "dst-appears": lambda files, _: bool(files),
    "part-being-written": _has(".parts/train/.*.tmp"),
    "first-part-done": _has(".parts/train/*.h5"),
    "second-part-done": lambda files, _: sum(Path(f).match(".parts/train/synth_*.h5") for f in files) >= 2,
    "train-merge-temp": _has(".train.h5.tmp"),
    "train-cache-renamed": _has("train.h5"),
    "val-part": _has(".parts/val/*"),
    "test-merge-temp": _has(".test.h5.tmp"),
    "after-3s": _after(3.0),
    "after-5s": _after(5.0),
}


@pytest.mark.parametrize("workers, points", [
    (1, list(KILL_POINTS)),
    (2, ["part-being-written", "first-part-done", "train-merge-temp", "val-part", "after-3s"]),
])
def test_sigkill_at_any_point_resumes_to_the_same_cache(gen1_synth, gen1_cache, tmp_path, workers, points):
    """D3: killed (SIGKILL) at many points, `gen1 preprocess` leaves no unreadable split cache, and a rerun gives
    caches equal, array by array, to an uninterrupted run's."""
    stopped = {}
    for point in points:
        dst = tmp_path / point
        args = ["gen1", "preprocess", f"src={gen1_synth}", f"dst={dst}", f"workers={workers}", *CLI_REP]
        stopped[point] = _interrupt(args, dst, KILL_POINTS[point])
        for cache in dst.glob("*.h5"):  # a split cache present is always complete and readable
            assert len(EventCache(cache)) > 0
        preprocess_dataset(gen1_synth, dst, "gen1", REP, progress=False, workers=workers)
        assert_same_caches(dst, gen1_cache)
        assert sorted(f for f in _listing(dst) if f != "data.yaml") == ["test.h5", "train.h5", "val.h5"]
    killed = [p for p, files in stopped.items() if files is not None]
    assert len(killed) >= len(points) - 2, stopped  # (a point may come after the run finished)


def test_sigint_resumes_and_the_rerun_from_the_cli_completes(gen1_synth, gen1_cache, tmp_path, capsys):
    for point in ("first-part-done", "train-cache-renamed"):
        dst = tmp_path / point
        args = ["gen1", "preprocess", f"src={gen1_synth}", f"dst={dst}", *CLI_REP]
        assert _interrupt(args, dst, KILL_POINTS[point], signal.SIGINT) is not None
        assert run(args) == 0, capsys.readouterr().err
        assert_same_caches(dst, gen1_cache)
        assert not (dst / ".parts").exists()


def test_parts_left_by_a_kill_after_the_rename_are_cleaned_up(gen1_synth, gen1_cache, tmp_path):
    """A kill between a split file's rename and the removal of its parts: the rerun removes those parts."""
    dst = tmp_path / "dst"
    preprocess_dataset(gen1_synth, dst, "gen1", REP, progress=False)
    name = find_recordings(gen1_synth / "train")[0][0]
    (dst / ".parts" / "train").mkdir(parents=True)
    shutil.copy(dst / "train.h5", dst / ".parts" / "train" / f"{name}.h5")
    preprocess_dataset(gen1_synth, dst, "gen1", REP, progress=False)
    assert sorted(_listing(dst)) == ["test.h5", "train.h5", "val.h5"]
    assert_same_caches(dst, gen1_cache)


def _legacy_truncated_cache(path: Path) -> None:
    """What the old in-place writer left when killed early: an HDF5 file cut after its first bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("samples", data=np.zeros((4, 3), np.uint8))
    with open(path, "r+b") as f:
        f.truncate(96)


def test_unreadable_cache_is_named_in_the_users_folder_and_rebuilt_in_ems_yolos(gen1_synth, gen1_cache, tmp_path,
                                                                                 capsys):
    dst = tmp_path / "user"
    _legacy_truncated_cache(dst / "train.h5")
    args = ["gen1", "preprocess", f"src={gen1_synth}", f"dst={dst}", *CLI_REP]
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dst / 'train.h5'}: not a readable HDF5 event cache" in err[0]
    assert (dst / "train.h5").stat().st_size == 96  # the user's file is left as it was
    (dst / "train.h5").write_bytes(b"not hdf5 at all")
    assert run(args) == 2 and "train.h5: not a readable HDF5 event cache" in capsys.readouterr().err
    with h5py.File(dst / "train.h5", "w") as f:
        f.attrs["version"] = 1
    assert run(args) == 2 and "train.h5: not an ems-yolo event cache of version 2" in capsys.readouterr().err

    owned = ems_home() / "datasets" / f"hardening-{os.getpid()}" / "cache"  # where data=gen1-synthetic caches live
    for bad in (b"", b"\x89HDF\r\n\x1a\n" + bytes(88)):
        owned.mkdir(parents=True, exist_ok=True)
        (owned / "train.h5").write_bytes(bad)
        _legacy_truncated_cache(owned / "val.h5")
        preprocess_dataset(gen1_synth, owned, "gen1", REP, progress=False)
        assert_same_caches(owned, gen1_cache)


def _copy_dataset(gen1_synth: Path, dst: Path, splits=("train", "val", "test")) -> Path:
    for split in splits:
        (dst / split).mkdir(parents=True)
        for _, td, bb in find_recordings(gen1_synth / split):
            (dst / split / td.name).write_bytes(td.read_bytes())
            (dst / split / bb.name).write_bytes(bb.read_bytes())
    return dst


def _gen1_fails(src: Path, dst: Path, capsys, *keys: str) -> str:
    code = run(["gen1", "preprocess", f"src={src}", f"dst={dst}", *CLI_REP, *keys])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("gen1 ")]
    assert code == 2 and len(err) == 1, err  # (after the progress lines)
    return err[0]


@pytest.mark.parametrize("cls, row", [(99, 0), (2, 3), (255, 5)])
def test_class_ids_outside_the_dataset_are_refused_naming_row_and_value(gen1_synth, tmp_path, capsys, cls, row):
    """D7: a `_bbox.npy` class id outside Gen1's two classes is one line naming the file, row, value and range,
    and (D9) the failed run leaves no file behind."""
    src = _copy_dataset(gen1_synth, tmp_path / "src", ("val",))
    bbox = next((src / "val").glob("*_bbox.npy"))
    boxes = read_bbox(bbox)
    boxes["class_id"][row] = cls
    write_bbox(bbox, boxes, version=2)
    dst = tmp_path / "out" / "dst"
    line = _gen1_fails(src, dst, capsys)
    assert f"{bbox}: row {row} has class_id {cls}, expected 0..1" in line
    assert not (tmp_path / "out").exists()


def test_gen4_class_ids_are_checked_against_the_seven_dataset_classes(tmp_path, capsys):
    src = make_synthetic_gen4(tmp_path / "g4", n_train=1, n_val=0, n_test=0, duration_s=0.6)
    bbox = next((src / "train").glob("*_bbox.npy"))
    boxes = read_bbox(bbox)
    boxes["class_id"][:2] = 6  # traffic light: a real 1 Mpx class, not learned (dropped)
    write_bbox(bbox, boxes, version=2)
    dst = tmp_path / "dst"
    assert run(["gen4", "preprocess", f"src={src}", f"dst={dst}", "bins=2", "window_ms=50", "splits=[train]"]) == 0
    assert EventCache(dst / "train.h5").labels[:, 0].max() <= 2
    boxes["class_id"][1] = 7
    write_bbox(bbox, boxes, version=2)
    code = run(["gen4", "preprocess", f"src={src}", f"dst={tmp_path / 'dst2'}", "bins=2", "window_ms=50",
                "splits=[train]"])
    assert code == 2 and f"{bbox}: row 1 has class_id 7, expected 0..6" in capsys.readouterr().err
    assert not (tmp_path / "dst2").exists()


def test_labels_after_the_recording_are_dropped_with_a_warning(gen1_synth, gen1_cache, tmp_path, caplog):
    """D7: boxes timed long after the last event would be samples of empty frames: dropped, counted in a warning."""
    src = _copy_dataset(gen1_synth, tmp_path / "src", ("val",))
    bbox = next((src / "val").glob("*_bbox.npy"))
    boxes = read_bbox(bbox)
    late = boxes[:3].copy()
    late["t"] = [10**12, 10**12, 10**12 + 5]
    write_bbox(bbox, np.concatenate((boxes, late)), version=2)
    preprocess_dataset(src, tmp_path / "dst", "gen1", REP, splits=("val",), progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and re.search(r"_bbox.npy: 2 of \d+ label times come more than the 150000 us window "
                                          r"after the last event.*dropped \(first at t=1000000000000 us\)", warned[0])
    ours, ref = EventCache(tmp_path / "dst" / "val.h5"), EventCache(gen1_cache / "val.h5")
    assert ours.t_us.max() < 10**12
    np.testing.assert_array_equal(ours.t_us, ref.t_us)
    np.testing.assert_array_equal(ours.labels, ref.labels)


def test_failed_preprocess_leaves_no_file_it_created(gen1_synth, tmp_path, capsys):
    """D9: bad boxes, missing labels, a recording of another sensor size, too many bins: no `train.h5` (or any
    other file) is left, and the user's files in an existing dst are untouched."""
    src = _copy_dataset(gen1_synth, tmp_path / "src")
    dst = tmp_path / "existing"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    names = [n for n, _, _ in find_recordings(src / "train")]
    last_bbox = src / "train" / f"{names[-1]}_bbox.npy"

    np.save(last_bbox, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickled _bbox.npy
    assert f"{last_bbox}: not a readable boxes file" in _gen1_fails(src, dst, capsys)
    last_bbox.write_bytes(b"garbage, not .npy")
    assert f"{last_bbox}: not a readable boxes file" in _gen1_fails(src, dst, capsys)
    last_bbox.unlink()
    assert "no matching labels file" in _gen1_fails(src, dst, capsys)
    events = read_dat(src / "train" / f"{names[-1]}_td.dat")
    write_dat(src / "train" / f"{names[-1]}_td.dat", events, 640, 480)
    write_bbox(last_bbox, read_bbox(gen1_synth / "train" / f"{names[-1]}_bbox.npy"))
    assert "a 640x480 recording, expected the 304x240 sensor of gen1" in _gen1_fails(src, dst, capsys)
    assert "expected at most" in _gen1_fails(src, dst, capsys, "bins=1000")  # within the key's bound, too large
    assert "bins=100000: expected a positive integer up to" in _gen1_fails(src, dst, capsys, "bins=100000")
    (tmp_path / "a_file").write_text("mine")
    assert f"dst={tmp_path / 'a_file'}: is a file, expected a folder" in _gen1_fails(src, tmp_path / "a_file", capsys)
    assert (tmp_path / "a_file").read_text() == "mine"
    # the first recordings' finished parts are kept for the rerun; no split cache, nothing else
    assert sorted(_listing(dst)) == [".parts", ".parts/train", *[f".parts/train/{n}.h5" for n in names[:-1]],
                                     "notes.txt"]


def test_huge_representations_are_refused_before_allocating(gen1_synth, tmp_path, capsys):
    """D15: bins x channels x height x width per sample is bounded (one line with the key, value and limit)."""
    for keys in (["bins=1000"], ["bins=600", "representation=histogram"]):  # within the key's bound of 1024
        line = _gen1_fails(gen1_synth, tmp_path / "d", capsys, *keys)
        assert line.startswith("ems-yolo: error: bins=") and f"expected at most {automotive.MAX_SAMPLE_BYTES:,}" \
            in line
    assert not (tmp_path / "d").exists()


def test_integer_keys_from_the_cli_reach_preprocessing(gen1_synth, tmp_path, capsys):
    """`cutoff=10` and `bins=10` (parsed as numbers by the key parser) are accepted as integers."""
    dst = tmp_path / "h"
    args = ["gen1", "preprocess", f"src={gen1_synth}", f"dst={dst}", "representation=histogram", "bins=10", "cutoff=10",
            "window_ms=50", "splits=[val]"]
    assert run(args) == 0, capsys.readouterr().err
    rep = EventCache(dst / "val.h5").representation
    assert (rep.name, rep.bins, rep.cutoff) == ("histogram", 10, 10)
    assert "cutoff" in _gen1_fails(gen1_synth, tmp_path / "h2", capsys, "representation=histogram", "cutoff=10.5")
    assert "bins" in _gen1_fails(gen1_synth, tmp_path / "h3", capsys, "bins=2.5")


def _raw_header(path: Path, geometry: str, data: bytes = b"") -> Path:
    path.write_bytes(f"% evt 2.0\n% geometry {geometry}\n% end\n".encode() + data)
    return path


@pytest.mark.parametrize("geometry", ["60000x60000", "8193x10", "10x9000", "0x240"])
def test_huge_sensor_sizes_in_file_headers_are_refused(tmp_path, geometry, capsys):
    """D15: a header's sensor size above MAX_SENSOR_SIZE (.raw, .dat, RVT .h5) is one line naming the file."""
    raw = _raw_header(tmp_path / "lie.raw", geometry)
    with pytest.raises(ValueError, match=f"lie.raw: header geometry/format gives a {geometry} sensor, expected sides "
                                         f"in 1..{MAX_SENSOR_SIZE}"):
        read_raw_header(raw)
    assert run(["events", f"source={raw}", "info=True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lie.raw" in err[0]
    w, h = (int(v) for v in geometry.split("x"))
    dat = tmp_path / "lie.dat"
    dat.write_bytes(f"% Width {w}\n% Height {h}\n".encode() + bytes([0x0C, 8]))
    with pytest.raises(ValueError, match="lie.dat.*(Width|Height)"):
        open_events(dat)
    h5 = tmp_path / "lie.h5"
    with h5py.File(h5, "w") as f:
        for k in "txyp":
            f.create_dataset(f"events/{k}", data=np.zeros(3, np.int64))
        f["events/width"], f["events/height"] = w, h
    with pytest.raises(ValueError, match="lie.h5: events/width, events/height gives"):
        open_events(h5)


def _npy_events(n: int = 50, **dtypes) -> np.ndarray:
    dtype = [(k, dtypes.get(k, EVENT_DTYPE[k])) for k in "txyp"]
    ev = np.zeros(n, dtype)
    ev["t"], ev["x"], ev["y"], ev["p"] = np.arange(n) * 10, np.arange(n) % 30, np.arange(n) % 20, np.arange(n) % 2
    return ev


@pytest.mark.parametrize("field, value, message", [
    ("t", np.nan, r"field 't' of event 7 is nan, expected an integer"),
    ("x", np.inf, r"field 'x' of event 7 is inf, expected an integer"),
    ("y", -np.inf, r"field 'y' of event 7 is -inf, expected an integer"),
    ("x", 2.5, r"field 'x' of event 7 is 2.5, expected an integer"),
    ("x", -3.0, r"field 'x' of event 7 is -3.0, expected 0..8191"),
    ("p", 2, r"field 'p' of event 7 is 2.0, expected 0..1"),
    ("t", 5.0, r"field 't' must be non-decreasing: event 7 has t=5.0 after t=60.0"),
])
@pytest.mark.parametrize("piece", [None, 7])  # checked in pieces: event 7 inside the first, or first of the second
def test_bad_npy_event_fields_name_file_field_and_event(tmp_path, field, value, message, piece, capsys, monkeypatch):
    """D18: NaN/inf/fractional/out-of-range/unsorted `.npy` event fields: the file, field and event index."""
    from ems_yolo.events import io

    if piece:
        monkeypatch.setattr(io, "CHUNK_EVENTS", piece)
    ev = _npy_events(t=np.float64, x=np.float32, y=np.float64, p=np.float32)
    ev[field][7] = value
    path = tmp_path / "bad.npy"
    np.save(path, ev)
    with pytest.raises(ValueError, match=f"bad.npy: {message}"):
        read_events(path)
    assert run(["events", f"source={path}", f"out={tmp_path / 'out_td.dat'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
    assert not (tmp_path / "out_td.dat").exists()


def test_object_and_pickled_npy_files_are_refused_naming_the_file(tmp_path):
    """D18: object arrays (events or boxes) are never unpickled; the error names the file."""
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name, array in (("obj.npy", np.array([Payload(), 1], dtype=object)),
                        ("struct_obj.npy", np.array([(1, Payload(), 0, 0)], [("t", "O"), ("x", "O"), ("y", "i2"),
                                                                              ("p", "i2")]))):
        with open(tmp_path / name, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=True)
        with pytest.raises(ValueError, match=f"{name}: not a readable event array"):
            read_events(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: not a readable boxes file"):
            read_bbox(tmp_path / name)
    assert not marker.exists()
    np.save(tmp_path / "plain.npy", np.arange(4))
    with pytest.raises(ValueError, match="plain.npy: a int64 array of shape"):
        read_events(tmp_path / "plain.npy")


def test_gen4_empty_split_folder_is_refused(tmp_path, capsys):
    """D18: an empty `train/` is one line naming the split, not a YAML that training refuses later."""
    src = make_synthetic_gen4(tmp_path / "g4", n_train=0, n_val=1, n_test=0, duration_s=0.6)
    (src / "train").mkdir(exist_ok=True)
    dst = tmp_path / "dst"
    assert run(["gen4", "preprocess", f"src={src}", f"dst={dst}", "bins=2", "window_ms=50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / 'train'}: split 'train' has no recordings" in err[0]
    assert not dst.exists()


def test_raw_index_is_keyed_by_the_files_identity(tmp_path):
    """D6: `rec a.raw` and `rec_a.raw` (same size and modification time, other content) never share an index,
    and a file rewritten in place with its old size and time gets a new one."""
    rng = np.random.default_rng(0)
    ev = np.zeros(4000, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 200_000, ev.size))
    for k, high in (("x", 304), ("y", 240), ("p", 2)):
        ev[k] = rng.integers(0, high, ev.size)
    a = write_raw_evt2(tmp_path / "rec a.raw", ev, 304, 240)
    data = bytearray(a.read_bytes())
    offset = RawReader(a).header.data_offset
    words = np.frombuffer(data, "<u4", offset=offset).copy()
    cd = np.flatnonzero(words >> 28 <= 1)[::2]
    words[cd] = (0xE << 28) | (words[cd] & 0x0FFFFFFF)  # every other CD word becomes an OTHERS word
    b = tmp_path / "rec_a.raw"
    b.write_bytes(bytes(data[:offset]) + words.astype("<u4").tobytes())
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert a.stat().st_size == b.stat().st_size and a.stat().st_mtime_ns == b.stat().st_mtime_ns
    assert open_events(a).count == ev.size
    assert open_events(b).count == ev.size - cd.size == len(read_events(b))
    assert RawIndex.location(a) != RawIndex.location(b)
    for payload in ("rec\u00e9a.raw", "rec?a.raw", "rec\na.raw"):  # names a lossy mapping would merge
        assert RawIndex.location(tmp_path / payload) not in (RawIndex.location(a), RawIndex.location(b))
    stamp = a.stat()
    with open(a, "r+b") as f:  # same path, inode, size and time; other content
        f.seek(offset)
        f.write(words.astype("<u4").tobytes())
    os.utime(a, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert a.stat().st_ino == stamp.st_ino and a.stat().st_size == stamp.st_size
    assert open_events(a).count == ev.size - cd.size
    for damaged in (b"", b"PK\x03\x04 cut short"):  # an index file damaged on disk is rebuilt
        RawIndex.location(a).write_bytes(damaged)
        assert open_events(a).count == ev.size - cd.size

