"""RVT's real time layout, end to end: RVT's own preprocessing output (../shared/data/rvt, made by RVT's unmodified
scripts/genx/preprocess_dataset.py from four synthetic Gen1 recordings) holds histograms of 50 ms, closed at both
ends, whose ends are 125 ms apart from the first label frame on. ems-yolo's histogram takes that layout, an RVT
folder records it, training keeps it in the model, prediction on a recording builds it, and `gen1 preprocess` with
bin_ms / spacing_ms / closed writes RVT's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import hdf5plugin  # noqa: F401  (blosc filter for RVT's files)
import h5py
import numpy as np
import pytest
import yaml
from shared_data import SHARED_DATA

from ems_yolo.events import EVENT_DTYPE, EventRepresentation, count_histogram, read_bbox
from ems_yolo.events.automotive import EventCache
from ems_yolo.events.formats import open_events
from ems_yolo.events.protocols import GEN1, clean_labels
from ems_yolo.events.representations import window_counts
from ems_yolo.events.rvt import RVTSplit

RVT = SHARED_DATA / "rvt"
needs_rvt = pytest.mark.skipif(not (RVT / "preprocessed").is_dir(), reason="../shared/data/rvt not present")
REPR = "event_representations_v2/stacked_histogram_dt=50_nbins=10"
EXE = Path(sys.executable).parent / "ems-yolo"


def _events(*rows: tuple[int, int, int, int]) -> np.ndarray:
    events = np.zeros(len(rows), EVENT_DTYPE)
    for i, row in enumerate(rows):
        events[i] = row
    return events


def _naive_counts(events: np.ndarray, starts, ends, closed: bool, height: int, width: int) -> np.ndarray:
    """Loop reference: every event counted in every window holding it."""
    out = np.zeros((len(ends), 2, height, width), np.int64)
    for t, x, y, p in events.tolist():
        for k, (s, e) in enumerate(zip(starts, ends)):
            if s <= t < e or (closed and t == e):
                out[k, p, y, x] += 1
    return out


def _ends(split: str, name: str) -> np.ndarray:
    return np.load(RVT / "preprocessed" / split / name / REPR / "timestamps_us.npy").astype(np.int64)


def _evenly_spaced(split: RVTSplit, split_name: str, i: int) -> bool:
    """Whether the `steps` stored histograms of sample i exist and their ends are `spacing_us` apart."""
    ends = _ends(split_name, split.recordings[split.recording[i]])
    r, steps = int(split.repr_index[i]), split.steps
    return r >= steps - 1 and bool(np.all(np.diff(ends[r - steps + 1 : r + 1]) == split.representation.spacing_us))


def test_spaced_closed_bins_count_exactly_the_events_in_their_windows():
    rep = EventRepresentation("histogram", bins=3, window_us=70, height=2, width=3, cutoff=10, bin_us=20,
                              spacing_us=25, closed=True)
    starts, ends = rep.bin_windows(100)
    assert starts.tolist() == [30, 55, 80] and ends.tolist() == [50, 75, 100]
    assert rep.event_range(100) == (30, 101) and replace(rep, closed=False).event_range(100) == (30, 100)
    ev = _events((29, 0, 0, 1), (30, 0, 0, 1), (50, 1, 0, 1), (51, 2, 0, 1), (54, 2, 0, 1), (55, 0, 1, 0),
                 (75, 0, 1, 0), (76, 1, 1, 0), (100, 2, 1, 1), (101, 2, 1, 1))
    counts = window_counts(ev, starts, ends, 2, 3, closed=True)
    on, off = counts[:, 1], counts[:, 0]
    assert on[0].tolist() == [[1, 1, 0], [0, 0, 0]]  # 30 and 50 (closed end); 29, 51, 54 outside
    assert off[1].tolist() == [[0, 0, 0], [2, 0, 0]] and on[1].sum() == 0  # 55 and 75; 76 in the gap
    assert on[2].tolist() == [[0, 0, 0], [0, 0, 1]] and off[2].sum() == 0  # 100 (closed); 101 after t_end
    half = window_counts(ev, starts, ends, 2, 3)
    assert half.sum() == counts.sum() - 3  # the events at 50, 75 and 100 sit on the ends
    stored = rep.stored(ev, 100)
    np.testing.assert_array_equal(stored, np.round(counts * 25.5 + 1e-9).astype(np.uint8))


@pytest.mark.parametrize("bins, bin_us, spacing_us, closed", [(4, 7, 11, True), (5, 10, 4, False), (3, 9, 9, True),
                                                                (2, 1, 30, False)])
def test_spaced_histogram_equals_a_loop_reference(bins, bin_us, spacing_us, closed):
    """Gaps, overlaps (an event in two bins), contiguous closed bins and 1 µs bins, on events with repeated times."""
    rng = np.random.default_rng(bins)
    ev = np.zeros(3000, EVENT_DTYPE)
    ev["t"], ev["x"], ev["y"], ev["p"] = (np.sort(rng.integers(0, 120, 3000)), rng.integers(0, 4, 3000),
                                          rng.integers(0, 3, 3000), rng.integers(0, 2, 3000))
    rep = EventRepresentation.from_dict({"name": "histogram", "bins": bins, "height": 3, "width": 4, "cutoff": 255,
                                         "bin_us": bin_us, "spacing_us": spacing_us, "closed": closed})
    assert rep.window_us == (bins - 1) * spacing_us + bin_us
    expected = _naive_counts(ev, *rep.bin_windows(110), closed, 3, 4)
    assert expected.sum() > 0
    np.testing.assert_array_equal(window_counts(ev, *rep.bin_windows(110), 3, 4, closed=closed), expected)
    np.testing.assert_array_equal(rep.stored(ev, 110), expected.astype(np.uint8))  # cutoff 255: count = byte


def test_default_layout_is_todays_histogram_and_records_as_before():
    rep = EventRepresentation("histogram", bins=4, window_us=1001, height=3, width=4)
    old = {"name": "histogram", "bins": 4, "window_us": 1001, "height": 3, "width": 4, "cutoff": 10}
    assert rep.to_dict() == old and EventRepresentation(**old) == rep == EventRepresentation.from_dict(old)
    assert (rep.bin_length_us, rep.bin_spacing_us, rep.closed) == (250, 250, False)
    ev = np.zeros(500, EVENT_DTYPE)
    rng = np.random.default_rng(1)
    ev["t"], ev["x"], ev["y"], ev["p"] = (np.sort(rng.integers(1000, 2002, 500)), rng.integers(0, 4, 500),
                                          rng.integers(0, 3, 500), rng.integers(0, 2, 500))
    counts = count_histogram(ev, 1001, 2002, 4, 3, 4, cutoff=10)
    np.testing.assert_array_equal(rep.stored(ev, 2002), ((510 * counts + 10) // 20).astype(np.uint8))
    spaced = EventRepresentation.from_dict({**old, "window_us": 1000, "bin_us": 250, "closed": True})
    assert spaced.to_dict() == {**old, "window_us": 1000, "bin_us": 250, "spacing_us": 250, "closed": True}
    assert spaced == EventRepresentation(**{**old, "window_us": 1000, "spacing_us": 250, "closed": True})


@pytest.mark.parametrize("keys, match", [
    ({"name": "histogram", "bins": 5, "window_us": 250_000, "bin_us": 50_000, "spacing_us": 125_000},
     r"window_us must be \(bins - 1\) \* spacing_us \+ bin_us = 550000"),
    ({"name": "histogram", "bin_us": 0}, "bin_us must be a positive integer, got 0"),
    ({"name": "histogram", "spacing_us": -125}, "spacing_us must be a positive integer"),
    ({"name": "histogram", "bin_us": 2.5}, "bin_us must be a positive integer"),
    ({"name": "histogram", "closed": "yes"}, "closed must be true or false, got 'yes'"),
    ({"name": "ems_frames", "closed": True}, "histogram representation only"),
    ({"name": "voxel", "bins": 2, "bin_us": 50, "spacing_us": 125}, "histogram representation only"),
])
def test_bad_layouts_are_refused_with_the_key(keys, match):
    with pytest.raises(ValueError, match=match):
        EventRepresentation.from_dict(keys)


@needs_rvt
@pytest.mark.parametrize("split_name", ["train", "val", "test"])
def test_rvt_folder_records_the_layout_it_holds(split_name):
    split = RVTSplit(RVT / "preprocessed" / split_name, steps=5)
    rep = split.representation
    assert (rep.name, rep.bins, rep.bin_us, rep.spacing_us, rep.closed, rep.window_us, rep.cutoff) == (
        "histogram", 5, 50_000, 125_000, True, 550_000, 10)
    assert RVTSplit(RVT / "preprocessed" / split_name, steps=2).representation.window_us == 175_000


@needs_rvt
@pytest.mark.parametrize("split_name", ["train", "val", "test"])
def test_our_histogram_with_rvt_layout_equals_rvt_rows_for_every_evenly_spaced_label_frame(split_name):
    split = RVTSplit(RVT / "preprocessed" / split_name, steps=5)
    rep = split.representation
    contiguous = EventRepresentation("histogram", bins=5, window_us=250_000, cutoff=10)  # the former claim
    even, differs_open, differs_contiguous = 0, 0, 0
    for i in range(len(split)):
        if not _evenly_spaced(split, split_name, i):
            assert split.repr_index[i] < 13 + 4  # only frames reaching back before the first label frame (13)
            continue
        name, t = split.recordings[split.recording[i]], int(split.t_us[i])
        events = open_events(RVT / "input" / split_name / f"{name}_td.dat.h5").read(*rep.event_range(t))
        np.testing.assert_array_equal(rep.stored(events, t), split.stored(i), err_msg=f"{name} at t={t}")
        differs_open += not np.array_equal(replace(rep, closed=False).stored(events, t), split.stored(i))
        all_events = open_events(RVT / "input" / split_name / f"{name}_td.dat.h5").read(0, t)
        differs_contiguous += not np.array_equal(contiguous.stored(all_events, t), split.stored(i))
        even += 1
    assert even == 8 * len(split.recordings)  # frames at 1.25 s .. 3 s of every sequence
    assert differs_contiguous == even  # T contiguous 50 ms bins are another input
    assert differs_open > 0  # events sit on histogram ends: the windows are closed


@needs_rvt
def test_rvt_sub_bins_sum_to_our_closed_window_counts_and_only_the_cutoff_clips():
    """What equals what on this data: RVT's 10 sub-bins of a histogram (each clipped at 10 in uint8) sum exactly to
    our count of `end - 50 ms <= t <= end`, for every stored histogram (also the 50 ms-spaced ones), because no
    sub-bin reaches 10 events at a pixel here (so neither RVT's per-sub-bin clip nor its uint8 wrap at 256 acts);
    the window counts do exceed 10, so clipping the sum at cutoff=10 is what makes the rows equal."""
    highest = 0
    for split_name in ("train", "val", "test"):
        for seq in sorted((RVT / "preprocessed" / split_name).iterdir()):
            ends = _ends(split_name, seq.name)
            with h5py.File(seq / REPR / "event_representations.h5", "r") as f:
                sub = f["data"][:].reshape(len(ends), 2, 10, 240, 304).astype(np.int64)
            assert sub.max() < 10
            events = open_events(RVT / "input" / split_name / f"{seq.name}_td.dat.h5").read(None, None)
            counts = window_counts(events, ends - 50_000, ends, 240, 304, closed=True)
            np.testing.assert_array_equal(sub.sum(axis=2), counts, err_msg=seq.name)
            highest = max(highest, int(counts.max()))
    assert highest > 10


@needs_rvt
def test_gen1_preprocess_with_rvt_layout_keys_matches_rvt_rows(tmp_path):
    dst = tmp_path / "cache"
    r = subprocess.run([str(EXE), "gen1", "preprocess", f"src={RVT / 'input'}", f"dst={dst}",
                        "representation=histogram", "bins=5", "bin_ms=50", "spacing_ms=125", "closed=True",
                        "splits=[val]"], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    cache = EventCache(dst / "val.h5")
    rep = cache.representation
    assert (rep.bins, rep.bin_us, rep.spacing_us, rep.closed, rep.window_us) == (5, 50_000, 125_000, True, 550_000)
    with h5py.File(dst / "val.h5", "r") as f:
        assert json.loads(f.attrs["representation"])["spacing_us"] == 125_000
    split = RVTSplit(RVT / "preprocessed" / "val", steps=5)
    assert split.representation == rep
    compared = 0
    for i in range(len(split)):
        if _evenly_spaced(split, "val", i):
            (j,) = np.flatnonzero(cache.t_us == split.t_us[i])
            np.testing.assert_array_equal(cache.stored(int(j)), split.stored(i), err_msg=f"t={split.t_us[i]}")
            compared += 1
    assert compared == 8
    bad = subprocess.run([str(EXE), "gen1", "preprocess", f"src={RVT / 'input'}", f"dst={tmp_path / 'bad'}",
                          "representation=histogram", "bins=5", "bin_ms=50", "spacing_ms=125", "window_ms=250",
                          "splits=[val]"], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert bad.returncode == 2 and "window_us must be (bins - 1) * spacing_us + bin_us = 550000" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad" / "val.h5").exists()


@needs_rvt
def test_gen1_box_crop_follows_the_prophesee_toolbox_not_rvt(tmp_path):
    """A box reaching the right / bottom border keeps its extent to 304 / 240 (continuous coordinates, as the
    toolbox's COCO evaluation reads them); RVT's own labels crop it at 303 / 239."""
    boxes = read_bbox(RVT / "input" / "val" / "synth_val_0000_bbox.npy")
    edge = boxes[(boxes["x"] + boxes["w"] > 303) | (boxes["y"] + boxes["h"] > 239)]
    assert len(edge) > 0
    ours = np.concatenate(list(clean_labels(boxes, GEN1, "val").values()))
    assert (ours[:, 1] + ours[:, 3]).max() == 304 and (ours[:, 2] + ours[:, 4]).max() <= 240
    with np.load(RVT / "preprocessed" / "val" / "synth_val_0000" / "labels_v2" / "labels.npz") as npz:
        rvt = npz["labels"]
    assert (rvt["x"] + rvt["w"]).max() == 303 and (rvt["y"] + rvt["h"]).max() <= 239


@needs_rvt
def test_a_model_trained_on_the_rvt_folder_predicts_recordings_with_its_layout(tiny_yaml_file, tmp_path):
    from ems_yolo import EMSYOLO
    from ems_yolo.cfg import DATASETS_DIR
    from ems_yolo.engine.predictor import EventPredictor

    d = yaml.safe_load((DATASETS_DIR / "rvt-gen1.yaml").read_text())
    d.update(path=str(RVT / "preprocessed"), test=None)
    data = tmp_path / "rvt-gen1.yaml"
    data.write_text(yaml.safe_dump(d))
    EMSYOLO(tiny_yaml_file(0.125)).train(data=str(data), epochs=1, imgsz=64, batch=4, nbs=4, workers=0, plots=False,
                                         verbose=False, seed=0, project=str(tmp_path), name="rvt")
    trained = EMSYOLO(tmp_path / "rvt" / "weights" / "last.pt")
    split = RVTSplit(RVT / "preprocessed" / "val", steps=5)
    assert trained.model.yaml["events"] == split.representation.to_dict()
    assert trained.model.yaml["events"]["spacing_us"] == 125_000 and trained.model.yaml["time_steps"] == 5

    source = RVT / "input" / "val" / "synth_val_0000_td.dat.h5"
    recording = open_events(source)
    (label,) = np.flatnonzero(split.t_us == 1_250_000)  # an evenly spaced label frame
    stride_ms = (1_250_000 - recording.t_first) / 4 / 1000  # the 4th window ends at that label time
    results = trained.predict(source=str(source), stride_ms=stride_ms, imgsz=64, save=False, project=str(tmp_path),
                              name="pred", stream=True)
    windows = []
    predictor = EventPredictor(trained.model, _predict_args(tmp_path), stride_ms=stride_ms)
    stem, rep, built, _count = predictor._windows(source)
    assert stem == "synth_val_0000" and rep == split.representation
    events = recording.read(None, None)
    for t, x, _ in built:
        np.testing.assert_array_equal(x, rep(events, t), err_msg=f"window ending at t={t}")  # all events, one rule
        if t == 1_250_000:
            np.testing.assert_array_equal(x, rep.to_model(split.stored(int(label))))  # RVT's own sample
        windows.append(t)
    assert 1_250_000 in windows and [r.path for r in results] == [f"{source}@{t}us" for t in windows]


def _predict_args(tmp_path: Path):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    return get_cfg(DEFAULT_CFG, {"imgsz": 64, "save": False, "device": "cpu", "project": str(tmp_path)})


@needs_rvt
@pytest.mark.parametrize("keys, message", [
    (["bin_ms=-5"], "bin_ms=-5: expected a positive number"),
    (["spacing_ms=abc"], "spacing_ms"),
    (["closed=maybe"], "closed"),
    (["representation=ems_frames", "bin_ms=50", "spacing_ms=125"], "histogram representation only"),
])
def test_bad_layout_keys_are_one_line_errors(tmp_path, keys, message):
    dst = tmp_path / "cache"
    r = subprocess.run([str(EXE), "gen1", "preprocess", f"src={RVT / 'input'}", f"dst={dst}", "splits=[val]",
                        *([] if keys[0].startswith("representation") else ["representation=histogram"]), *keys],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not dst.exists()


@needs_rvt
def test_contiguous_caches_record_and_resume_as_before_the_layout_fields(tmp_path):
    """A cache of today's layout stores the same representation attribute as before the new fields existed, so a
    cache built then resumes (its attribute is compared as text) and reads back equal."""
    from ems_yolo.events.automotive import preprocess_dataset

    rep = EventRepresentation("histogram", bins=2, window_us=100_000)
    (path,) = preprocess_dataset(RVT / "input", tmp_path, representation=rep, splits=("val",), progress=False).values()
    before = {"bins": 2, "cutoff": 10, "height": 240, "name": "histogram", "width": 304, "window_us": 100_000}
    with h5py.File(path, "r") as f:
        assert f.attrs["representation"] == json.dumps(before, sort_keys=True)
    with h5py.File(path, "a") as f:  # as an interrupted run of the former code left it: one recording, not done
        f["done_samples"].resize(0, axis=0)
        f["done_labels"].resize(0, axis=0)
        f["recordings"].resize(0, axis=0)
    preprocess_dataset(RVT / "input", tmp_path, representation=EventRepresentation(**before), splits=("val",),
                       progress=False)
    cache = EventCache(path)
    assert cache.representation == rep and len(cache) == 10 and cache.recordings == ["synth_val_0000"]
