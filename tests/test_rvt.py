"""RVT's preprocessed folders (stacked histograms, blosc HDF5, labels_v2) read in place as a dataset: samples equal
ems-yolo's histogram representation of the same events in the layout the folder records, boxes as RVT loads them,
training and validation on them. (RVT's real output, with histograms 125 ms apart: tests/test_rvt_layout.py.)"""

import shutil
from pathlib import Path

import hdf5plugin
import h5py
import numpy as np
import pytest
import yaml

from ems_yolo import EMSYOLO
from ems_yolo.cfg import DATASETS_DIR
from ems_yolo.data.datasets import resolve_data
from ems_yolo.data.events import open_event_split
from ems_yolo.events import BBOX_DTYPE, EventRepresentation, count_histogram, read_bbox, read_dat
from ems_yolo.events.automotive import find_recordings
from ems_yolo.events.io import convert_boxes
from ems_yolo.events.rvt import RVTSplit
from ems_yolo.events.synthetic import make_synthetic_gen1

DT_US, NBINS = 50_000, 10


def write_rvt_sequence(folder: Path, events: np.ndarray, boxes: np.ndarray, width: int, height: int,
                       halve: bool = False) -> None:
    """One sequence in RVT's layout: a 10-bin stacked histogram every 50 ms (polarity-major, clipped at 10), each of
    the 50 ms before its end, closed at both ends as RVT's, and the label frames pointing at the histogram that ends
    at each label time."""
    frames = np.unique(boxes["t"])
    ends = np.arange(DT_US, frames[-1] + 1, DT_US)
    h, w = (height // 2, width // 2) if halve else (height, width)
    ev = events.copy()
    if halve:
        ev["x"] //= 2
        ev["y"] //= 2
    data = np.stack([count_histogram(ev, t - DT_US, t + 1, NBINS, h, w, cutoff=10).transpose(1, 0, 2, 3)
                     .reshape(2 * NBINS, h, w) for t in ends]).astype(np.uint8)
    rdir = folder / "event_representations_v2" / f"stacked_histogram_dt={DT_US // 1000}_nbins={NBINS}"
    rdir.mkdir(parents=True)
    name = "event_representations_ds2_nearest.h5" if halve else "event_representations.h5"
    with h5py.File(rdir / name, "w") as f:
        f.create_dataset("data", data=data, chunks=(1, 2 * NBINS, h, w),
                         **hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
    np.save(rdir / "timestamps_us.npy", ends)
    np.save(rdir / "objframe_idx_2_repr_idx.npy", np.searchsorted(ends, frames))
    labels = folder / "labels_v2"
    labels.mkdir()
    first = np.searchsorted(boxes["t"], frames)
    np.savez(labels / "labels.npz", labels=boxes, objframe_idx_2_label_idx=first)
    np.save(labels / "timestamps_us.npy", frames)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_gen1(tmp_path_factory.mktemp("gen1") / "raw", n_train=2, n_val=1, n_test=0, duration_s=2.0)


@pytest.fixture(scope="module")
def rvt_root(synth, tmp_path_factory) -> Path:
    """Synthetic Gen1 recordings written as an RVT preprocessed folder (train and val)."""
    root = tmp_path_factory.mktemp("rvt") / "gen1"
    for split in ("train", "val"):
        for name, td, bbox in find_recordings(synth / split):
            boxes = convert_boxes(read_bbox(bbox), BBOX_DTYPE, str(bbox))
            write_rvt_sequence(root / split / name, read_dat(td), boxes, 304, 240)
    return root


@pytest.fixture(scope="module")
def rvt_yaml(rvt_root, tmp_path_factory) -> Path:
    """The shipped rvt-gen1.yaml with path: pointing at the folder and 3 steps."""
    d = yaml.safe_load((DATASETS_DIR / "rvt-gen1.yaml").read_text())
    d.update(path=str(rvt_root), test=None)
    d["rvt"]["steps"] = 3
    out = tmp_path_factory.mktemp("yaml") / "rvt-gen1.yaml"
    out.write_text(yaml.safe_dump(d))
    return out


def test_samples_are_the_histogram_representation_of_the_same_events(rvt_root, synth):
    split = RVTSplit(rvt_root / "train", steps=3)
    rep = split.representation
    assert (rep.name, rep.bins, rep.window_us, rep.width, rep.height) == ("histogram", 3, 150_000, 304, 240)
    assert (rep.bin_us, rep.spacing_us, rep.closed) == (50_000, 50_000, True)  # this folder's histograms: every 50 ms
    assert split.protocol.name == "gen1" and split.names == {0: "car", 1: "pedestrian"} and len(split) > 0
    ours = EventRepresentation("histogram", bins=3, window_us=150_000, cutoff=10, bin_us=50_000, closed=True)
    assert ours == rep
    for i in (0, len(split) // 2, len(split) - 1):
        name = split.recordings[split.recording[i]]
        t = int(split.t_us[i])
        events = read_dat(synth / "train" / f"{name}_td.dat", *rep.event_range(t))
        np.testing.assert_array_equal(split.stored(i), ours.stored(events, t))
        rows = convert_boxes(read_bbox(synth / "train" / f"{name}_bbox.npy"), BBOX_DTYPE, name)
        rows = rows[rows["t"] == t]
        np.testing.assert_allclose(split.boxes(i), np.stack(
            (rows["class_id"], rows["x"], rows["y"], rows["w"], rows["h"]), 1).astype(np.float32))


def test_1mpx_half_resolution_folders_halve_the_boxes(tmp_path):
    rng = np.random.default_rng(0)
    n = 20_000
    events = np.zeros(n, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
    events["t"] = np.sort(rng.integers(0, 300_000, n))
    events["x"], events["y"], events["p"] = rng.integers(0, 1280, n), rng.integers(0, 720, n), rng.integers(0, 2, n)
    boxes = np.zeros(3, BBOX_DTYPE)
    boxes[:] = [(200_000, 100, 100, 80, 60, 2, 0, 1), (300_000, 1250, 700, 80, 60, 0, 1, 1),
                (300_000, 10, 20, 30, 40, 1, 2, 1)]
    write_rvt_sequence(tmp_path / "val" / "seq", events, boxes, 1280, 720, halve=True)
    split = RVTSplit(tmp_path / "val", steps=2)
    assert split.protocol.name == "gen4" and (split.representation.width, split.representation.height) == (640, 360)
    np.testing.assert_allclose(split.boxes(0), [[2, 50, 50, 40, 30]])
    np.testing.assert_allclose(split.boxes(1), [[0, 625, 350, 15, 10], [1, 5, 10, 15, 20]])  # clipped at 640x360
    counts = split.stored(1).astype(np.int64) * 10 // 255  # back to clipped counts
    assert counts.shape == (2, 2, 360, 640) and counts.sum() > 0


def test_training_and_validation_on_an_rvt_folder(rvt_yaml, tiny_yaml_file, tmp_path, caplog):
    model = EMSYOLO(tiny_yaml_file())
    model.train(data=str(rvt_yaml), epochs=1, imgsz=64, batch=4, nbs=4, workers=0, plots=False, verbose=False,
                seed=0, project=str(tmp_path), name="rvt")
    trained = EMSYOLO(tmp_path / "rvt" / "weights" / "last.pt")
    assert trained.model.yaml["time_steps"] == 3 and trained.model.yaml["channels"] == 6
    assert trained.model.yaml["events"]["name"] == "histogram"
    with caplog.at_level("INFO"):
        metrics = trained.val(data=str(rvt_yaml), imgsz=64, batch=4, workers=0, plots=False, project=str(tmp_path),
                              name="val")
    assert "gen1 Prophesee/RVT protocol" in caplog.text and metrics.prophesee["images"] > 0


def test_bad_rvt_folders_are_clear_errors(rvt_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)rvt-gen1.*not found.*RVT's preprocessed Gen1"):
        resolve_data("rvt-gen1.yaml")
    bad = tmp_path / "bad" / "val"
    shutil.copytree(rvt_root / "val", bad)
    seq = next(bad.iterdir())
    rdir = next((seq / "event_representations_v2").iterdir())
    shutil.copytree(rdir, rdir.with_name("mixeddensity_stack_nbins=10_cutoff=10"))
    with pytest.raises(ValueError, match="expected one representation folder"):
        RVTSplit(bad)
    with pytest.raises(ValueError, match="unsupported representation 'mixeddensity_stack"):
        RVTSplit(bad, representation="mixeddensity_stack_nbins=10_cutoff=10")
    with pytest.raises(ValueError, match=r"rvt: unknown keys \['bins'\]"):
        open_event_split(bad, {"bins": 3})


def test_the_recorded_spacing_is_that_of_the_label_frames(tmp_path):
    """RVT's histograms are dt apart before a sequence's first label frame and spread between label frames after
    it; the split records the most common spacing from the first label frame on, over all sequences, so a late
    first label frame or 1 µs of linspace jitter does not change it."""
    from shared_data import SHARED_DATA

    real = SHARED_DATA / "rvt" / "preprocessed" / "val" / "synth_val_0000"
    if not real.is_dir():
        pytest.skip("../shared/data/rvt not present")
    rdir = Path("event_representations_v2") / "stacked_histogram_dt=50_nbins=10"
    late = np.concatenate((np.arange(100_000, 2_000_001, 50_000), 2_000_000 + 125_000 * np.arange(1, 10)))
    jittered = np.concatenate((np.arange(100_000, 750_001, 50_000), 750_000 + 125_000 * np.arange(1, 19)))
    jittered[[15, 20]] += (1, -1)
    for name, ends, first in (("late", late, 38), ("jittered", jittered, 13)):
        shutil.copytree(real, tmp_path / "val" / name)
        np.save(tmp_path / "val" / name / rdir / "timestamps_us.npy", ends)
        np.save(tmp_path / "val" / name / rdir / "objframe_idx_2_repr_idx.npy", first + np.arange(10))
    assert np.sum(np.diff(late) == 50_000) > np.sum(np.diff(late) == 125_000)  # not the most common of all ends
    rep = RVTSplit(tmp_path / "val", steps=4).representation
    assert (rep.bin_us, rep.spacing_us, rep.closed, rep.window_us) == (50_000, 125_000, True, 425_000)
    np.save(tmp_path / "val" / "late" / rdir / "timestamps_us.npy", late[:40])
    with pytest.raises(ValueError, match="objframe_idx_2_repr_idx.npy: histogram indices outside the 40 histograms"):
        RVTSplit(tmp_path / "val")
