"""The 1 Megapixel (Gen4) dataset with RVT's protocol: label cleaning and ~10 Hz label frames, caches at half
resolution from synthetic 1280x720 recordings, training, the 1 Mpx evaluation, parallel preprocessing."""

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ems_yolo import EMSYOLO
from ems_yolo.cli import app
from ems_yolo.data.datasets import resolve_data
from ems_yolo.events import BBOX_DTYPE, GEN4, clean_labels, evaluate_detections, read_bbox, read_dat, write_dat
from ems_yolo.events.automotive import EventCache, find_recordings, preprocess_dataset
from ems_yolo.events.protocols import rvt_label_times
from ems_yolo.events.representations import EventRepresentation


def _v2(rows) -> np.ndarray:
    out = np.zeros(len(rows), BBOX_DTYPE)
    for i, (t, x, y, w, h, c, tr) in enumerate(rows):
        out[i] = (t, x, y, w, h, c, tr, 1.0)
    return out


@pytest.mark.parametrize("hz, every", [(60, 6), (30, 3)])
def test_rvt_label_frames_are_every_100_ms_from_100_ms(hz, every):
    times = np.round(np.arange(1, 200) * 1e6 / hz).astype(np.int64)
    kept = rvt_label_times(times)
    first = int(np.searchsorted(times, 100_000))
    np.testing.assert_array_equal(kept, times[first::every])
    assert 99_000 < np.diff(kept).min() and np.diff(kept).max() < 101_000


def test_rvt_label_frames_skip_gaps_and_reject_other_rates():
    times = np.round(np.arange(1, 120) * 1e6 / 60).astype(np.int64)
    gappy = np.delete(times, np.arange(30, 40))  # labels 31..40 missing: the 600 ms frame is lost, the grid goes on
    np.testing.assert_array_equal(rvt_label_times(gappy), np.setdiff1d(times[5::6], [600_000]))
    with pytest.raises(ValueError, match="labels.npy: labels come at 20 Hz.*expected 30 or 60"):
        rvt_label_times(np.arange(1, 50) * 50_000, "labels.npy")


def test_gen4_labels_keep_three_classes_at_half_resolution():
    period = round(1e6 / 60)
    rows = [(100_000 + k * period, 100, 100, 80, 60, 2, 1) for k in range(13)]  # a car over 200 ms
    t0 = rows[0][0]
    rows += [
        (t0, 300, 300, 40, 90, 0, 2),      # pedestrian: kept
        (t0, 500, 500, 100, 50, 3, 3),     # truck: class 3 of 7, dropped by the protocol
        (t0, 700, 100, 4, 40, 1, 4),       # two-wheeler 4 px wide: under RVT's 5 px side, dropped
        (t0, -20, 690, 60, 60, 0, 5),      # crosses the left and bottom border: cropped to 40 x 30
        (t0, 0, 10, 1200, 100, 2, 6),      # wider than 90% of 1280: a labelling fault in training only
    ]
    boxes = _v2(sorted(rows))
    train = clean_labels(boxes, "gen4", "train")
    assert list(train) == [t0, t0 + 6 * period, t0 + 12 * period]  # ~10 Hz of the 60 Hz labels
    np.testing.assert_allclose(train[t0], [[0, 0, 345, 20, 15], [2, 50, 50, 40, 30], [0, 150, 150, 20, 45]])
    val = clean_labels(boxes, GEN4, "val")
    assert len(val[t0]) == 4 and val[t0][1].tolist() == [2, 0, 5, 600, 50]


@pytest.fixture(scope="module")
def gen4_yaml() -> Path:
    """data=gen4-synthetic: generated 1280x720 recordings, preprocessed with the 1 Mpx protocol."""
    return Path(resolve_data("gen4-synthetic"))


@pytest.fixture(scope="module")
def gen4_cache(gen4_yaml) -> Path:
    return Path(yaml.safe_load(gen4_yaml.read_text())["path"])


def test_synthetic_recordings_are_1mpx_shaped(gen4_cache):
    root = gen4_cache.parent
    name, td, bbox = find_recordings(root / "train")[0]
    events, boxes = read_dat(td), read_bbox(bbox)
    assert events["x"].max() == 1279 and events["y"].max() == 719 and np.all(np.diff(events["t"]) >= 0)
    assert set(np.unique(boxes["class_id"])) <= {0, 2, 3} and 2 in boxes["class_id"]
    assert round(1e6 / np.median(np.diff(np.unique(boxes["t"])))) == 60


def test_gen4_cache_is_the_protocol_at_half_resolution(gen4_cache):
    c = EventCache(gen4_cache / "train.h5")
    rep = c.representation
    assert (rep.width, rep.height) == (640, 360) and c.protocol.name == "gen4"
    assert c.names == {0: "pedestrian", 1: "two-wheeler", 2: "car"}
    assert len(c) > 0 and c.labels[:, 0].max() <= 2
    recs = find_recordings(gen4_cache.parent / "train")
    k = len(c) - 1
    name, td, bbox = recs[c.recording[k]]
    expected = clean_labels(read_bbox(bbox), "gen4", "train")
    np.testing.assert_array_equal(c.boxes(k), expected[int(c.t_us[k])])
    events = read_dat(td, int(c.t_us[k]) - rep.window_us, int(c.t_us[k]))
    events["x"] //= 2
    events["y"] //= 2
    np.testing.assert_array_equal(c.stored(k), rep.stored(events, int(c.t_us[k])))
    for r in range(len(c.recordings)):
        gaps = np.diff(c.t_us[c.recording == r])
        assert len(gaps) and 98_000 < gaps.min() and gaps.max() < 102_000  # RVT's ~10 Hz frames


def test_ground_truth_fed_back_scores_one_with_the_1mpx_protocol(gen4_cache):
    c = EventCache(gen4_cache / "val.h5")
    gt = []
    for r in range(len(c.recordings)):
        rows = [(t, *b[1:], int(b[0]), j) for i in np.flatnonzero(c.recording == r) for t in [int(c.t_us[i])]
                for j, b in enumerate(c.boxes(i))]
        gt.append(_v2([(t, x, y, w, h, cls, j) for t, x, y, w, h, cls, j in rows]))
    metrics = evaluate_detections(gt, [g.copy() for g in gt], "gen4", downsampled=True)
    assert metrics["mAP50-95"] == metrics["mAP50"] == 1.0
    assert metrics["images"] == int((c.t_us > 500_000).sum()) > 0
    worse = [g[g["class_id"] != 2] for g in gt]  # every car missed
    assert evaluate_detections(gt, worse, "gen4", downsampled=True)["mAP50"] < 1.0


@pytest.mark.slow
def test_training_on_1mpx_data_and_its_protocol(gen4_yaml, tiny_yaml_file, tmp_path, caplog):
    model = EMSYOLO(tiny_yaml_file())
    model.train(data=str(gen4_yaml), epochs=2, imgsz=64, batch=2, nbs=2, optimizer="AdamW", lr0=0.003,
                warmup_epochs=0, workers=0, plots=False, verbose=False, seed=0, project=str(tmp_path), name="g4")
    rows = list(csv.DictReader((tmp_path / "g4" / "results.csv").open()))
    assert len(rows) == 2 and all(np.isfinite(float(r["train/box_loss"])) for r in rows)
    with caplog.at_level("INFO"):
        metrics = EMSYOLO(tmp_path / "g4" / "weights" / "last.pt").val(
            data=str(gen4_yaml), imgsz=64, batch=2, workers=0, plots=False, project=str(tmp_path), name="val")
    assert model.model.yaml["nc"] == 3
    assert "gen4 Prophesee/RVT protocol" in caplog.text and "30 px diagonal and 10 px sides at 640x360" in caplog.text
    assert metrics.prophesee["images"] > 0


def test_cli_gen4_preprocess_in_parallel_equals_serial(gen4_cache, tmp_path):
    src = gen4_cache.parent
    for workers in (1, 2):
        r = CliRunner().invoke(app, ["gen4", "preprocess", f"src={src}", f"dst={tmp_path / str(workers)}", "bins=2",
                                     "window_ms=50", "splits=[train]", f"workers={workers}"])
        assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "1" / "train.h5") as a, h5py.File(tmp_path / "2" / "train.h5") as b:
        assert a.attrs["protocol"] == b.attrs["protocol"] == "gen4"
        for name in ("samples", "labels", "t_us", "recording", "label_count", "recordings"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert a["samples"].shape[1:] == (2, 360, 640) and len(a["samples"]) > 0
    for workers in (1, 2):  # parts merged and removed, with their folder
        assert sorted(f.name for f in (tmp_path / str(workers)).iterdir()) == ["data.yaml", "train.h5"]
    d = yaml.safe_load((tmp_path / "2" / "data.yaml").read_text())
    assert d["names"] == {0: "pedestrian", 1: "two-wheeler", 2: "car"} and d["channels"] == 6


def test_gen1_sized_recordings_are_refused_by_the_gen4_protocol(gen4_cache, tmp_path):
    src = tmp_path / "src" / "val"
    src.mkdir(parents=True)
    _, td, bbox = find_recordings(gen4_cache.parent / "val")[0]
    events = read_dat(td, 0, 200_000)
    events = events[(events["x"] < 304) & (events["y"] < 240)]
    write_dat(src / "small_td.dat", events, 304, 240)
    (src / "small_bbox.npy").write_bytes(bbox.read_bytes())
    with pytest.raises(ValueError, match=r"small_td.dat: a 304x240 recording, expected the 1280x720 sensor of gen4"):
        preprocess_dataset(src.parent, tmp_path / "c", "gen4", EventRepresentation(height=360, width=640),
                           progress=False)
