"""Gen1 pipeline on synthetic Gen1 recordings: cache building (resumable), training at T=3, both evaluation
protocols, and detection along event streams."""

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from event_data import GEN1_REP as REP
import yaml
from shared_data import SHARED_DATA
from ultralytics_logs import ultralytics_log
from typer.testing import CliRunner

from ems_yolo import EMSYOLO
from ems_yolo.cli import app, run
from ems_yolo.data.datasets import resolve_data
from ems_yolo.engine.model import derive_model_yaml
from ems_yolo.events import automotive
from ems_yolo.events.automotive import EventCache, find_recordings, preprocess_dataset
from ems_yolo.events.protocols import clean_labels
from ems_yolo.cfg import load_model_yaml
from ems_yolo.events.io import BBOX_DTYPE, EventFileError, read_bbox, read_dat
from ems_yolo.events.representations import EventRepresentation

ESIM_VIDEO = SHARED_DATA / "videos" / "esim_test_frames.avi"


@pytest.fixture(scope="module")
def data_yaml(gen1_cache) -> Path:
    """An ordinary data YAML whose splits are the cache files (channels come from the caches)."""
    y = gen1_cache / "gen1-tiny.yaml"
    y.write_text(f"path: {gen1_cache}\ntrain: train.h5\nval: val.h5\ntest: test.h5\n"
                 "names:\n  0: car\n  1: pedestrian\n")
    return y


def _v2(rows) -> np.ndarray:
    out = np.zeros(len(rows), BBOX_DTYPE)
    for i, (t, x, y, w, h, c, tr) in enumerate(rows):
        out[i] = (t, x, y, w, h, c, tr, 1.0)
    return out


def test_clean_labels_last_per_track_clipped_no_empty():
    boxes = _v2([
        (1000, 10, 10, 20, 20, 0, 1),
        (1000, 12, 10, 20, 20, 0, 1),   # same track, later row wins
        (1000, 290, -5, 30, 20, 1, 2),  # extends past the right and top edges -> clipped
        (2000, 400, 10, 20, 20, 0, 3),  # fully outside -> dropped, and the timestamp vanishes
    ])
    out = clean_labels(boxes)
    assert list(out) == [1000]
    np.testing.assert_allclose(out[1000], [[0, 12, 10, 20, 20], [1, 290, 0, 14, 15]])


def test_cache_holds_the_representation_and_clean_labels(gen1_synth, gen1_cache):
    c = EventCache(gen1_cache / "train.h5")
    recs = find_recordings(gen1_synth / "train")
    assert c.recordings == [r[0] for r in recs]
    expected = [(i, ts, b) for i, (_, td, bb) in enumerate(recs) for ts, b in clean_labels(read_bbox(bb)).items()]
    assert len(c) == len(expected) > 0
    for k in (0, len(c) // 2, len(c) - 1):
        i, ts, b = expected[k]
        assert c.recording[k] == i and c.t_us[k] == ts
        np.testing.assert_array_equal(c.boxes(k), b)
        events = read_dat(recs[i][1], ts - REP.window_us, ts)
        np.testing.assert_array_equal(c.stored(k), REP.stored(events, ts))
    with h5py.File(gen1_cache / "train.h5") as f:
        assert f["samples"].compression == "lzf" and f["samples"].chunks[0] == 1 and f.attrs["split"] == "train"


def test_preprocess_resumes_after_interruption(gen1_synth, gen1_cache, tmp_path, monkeypatch):
    dst = tmp_path / "resumed"
    real = automotive._recording_batches
    done = []

    def crash_on_second(name, *args):
        if done:  # half-write the second recording, then die
            yield next(real(name, *args))
            raise KeyboardInterrupt
        done.append(name)
        yield from real(name, *args)

    monkeypatch.setattr(automotive, "_recording_batches", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(gen1_synth, dst, "gen1", REP, progress=False)
    monkeypatch.setattr(automotive, "_recording_batches", real)
    assert not (dst / "train.h5").exists()  # never written in place: only the finished recording's part is kept
    assert sorted(p.name for p in (dst / ".parts" / "train").iterdir()) == [f"{done[0]}.h5"]
    preprocess_dataset(gen1_synth, dst, "gen1", REP, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["test.h5", "train.h5", "val.h5"]
    for split in ("train", "val", "test"):
        with h5py.File(dst / f"{split}.h5") as a, h5py.File(gen1_cache / f"{split}.h5") as b:
            for name in ("samples", "labels", "t_us", "recording", "label_count"):
                np.testing.assert_array_equal(a[name][:], b[name][:])
    with pytest.raises(ValueError, match="representation"):
        preprocess_dataset(gen1_synth, dst, "gen1", EventRepresentation(bins=5), progress=False)


def test_preprocess_errors_name_the_bad_file(gen1_synth, tmp_path):
    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    name, td, bb = find_recordings(gen1_synth / "train")[0]
    (src / td.name).write_bytes(td.read_bytes() + b"\x01\x02\x03")  # truncated record
    (src / bb.name).write_bytes(bb.read_bytes())
    with pytest.raises(EventFileError, match=f"{td.name}.*byte offset"):
        preprocess_dataset(src.parent, tmp_path / "c", "gen1", REP, progress=False)
    (src / bb.name).unlink()
    with pytest.raises(FileNotFoundError, match="no matching labels file"):
        preprocess_dataset(src.parent, tmp_path / "c2", "gen1", REP, progress=False)
    with pytest.raises(FileNotFoundError, match="How to get Gen1"):
        preprocess_dataset(tmp_path / "nowhere", tmp_path / "c3", "gen1", REP, progress=False)


def test_bad_cache_files_are_clear_errors(gen1_cache, tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.h5: not a readable HDF5 event cache"):
        EventCache(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.create_group("train")
    with pytest.raises(ValueError, match="old.h5: not an ems-yolo event cache of version 2"):
        EventCache(tmp_path / "old.h5")
    y = tmp_path / "d.yaml"
    y.write_text(f"path: {gen1_cache}\ntrain: train.h5\nval: val.h5\nchannels: 4\nnames: [car, pedestrian]\n")
    with pytest.raises(ValueError, match="channels: 4' does not match the event caches.*expected channels: 9"):
        resolve_data(y)


def test_validating_on_data_of_another_input_width_is_one_line(data_yaml, tmp_path, capsys):
    """An event model of another bin count, or a frame model, on these caches (3 bins x 3 channels): exit 2 and one
    line naming the split file, both widths and the width that would match, before any batch reaches the model."""
    from event_data import tiny_event_checkpoint

    two_bins = tiny_event_checkpoint(tmp_path / "two.pt", EventRepresentation(bins=2, window_us=150_000))
    val = data_yaml.parent.resolve() / "val.h5"
    for model, reads in ((two_bins, "6 (T=2 x 3)"), ("ems-res10.yaml", "3 (images)")):
        code = run(["val", f"model={model}", f"data={data_yaml}", "imgsz=64", "batch=2",
                    f"project={tmp_path / 'runs'}"])
        err = capsys.readouterr().err
        head, tail = (f"ems-yolo: error: {val}: 9 input channels (3 bins x 3 of ems_frames), but the model ",
                      f"{Path(model).name} reads {reads}; expected data of {reads.split()[0]} channels\n")
        assert code == 2 and err.startswith(head) and err.endswith(tail) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left


@pytest.mark.slow
def test_benchmark_of_an_event_model_validates_each_format_on_the_caches(data_yaml, tmp_path, capsys):
    """`ems-yolo benchmark` on event caches: the PyTorch model and its ONNX and TorchScript exports score the same
    on the same windows; the table names the data as the user gave it."""
    import csv

    from event_data import tiny_event_checkpoint

    pt = tiny_event_checkpoint(tmp_path / "ev.pt", REP)
    codes = []
    log = ultralytics_log(lambda: codes.append(
        run(["benchmark", f"model={pt}", f"data={data_yaml}", "imgsz=64", f"project={tmp_path / 'runs'}"])))
    assert codes == [0], capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "runs" / "benchmark" / "benchmarks.csv").open()))
    assert [r["format"] for r in rows] == ["pytorch", "onnx", "torchscript"]
    for r in rows:
        assert float(r["mAP50-95"]) == pytest.approx(float(rows[0]["mAP50-95"]), abs=1e-3), rows
    assert f"Benchmarks of ev.pt on {data_yaml} at imgsz=64 (batch 1):" in log


def test_missing_gen1_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="(?s)never downloads.*prophesee.*gen1 preprocess"):
        resolve_data("gen1.yaml")


def predict_cli(run: Path, source, folder: Path, *keys: str) -> None:
    """`ems-yolo predict` with the trained event model (conf 0.001, 96 px) into `folder`; it must succeed."""
    r = CliRunner().invoke(app, ["predict", f"model={run / 'weights' / 'last.pt'}", f"source={source}", "conf=0.001",
                                 "imgsz=96", *keys, f"project={folder.parent}", f"name={folder.name}"])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def trained(data_yaml, tmp_path_factory):
    d = load_model_yaml("ems-res10.yaml")
    d["width_multiple"] = 0.25
    project = tmp_path_factory.mktemp("runs")
    model = EMSYOLO(derive_model_yaml(d))
    model.train(data=str(data_yaml), epochs=4, imgsz=96, batch=4, nbs=4, optimizer="AdamW", lr0=0.003,
                warmup_epochs=0, workers=0, plots=False, verbose=False, seed=0, project=str(project), name="ev")
    return project / "ev", model


@pytest.mark.slow
def test_event_training_at_T3_lowers_loss_and_scores_both_protocols(trained, data_yaml, caplog):
    run, model = trained
    assert model.model.yaml["time_steps"] == 3 and model.model.yaml["input"] == "events"
    assert model.model.yaml["channels"] == 9  # 3 bins x 3 channels
    rows = list(csv.DictReader((run / "results.csv").open()))
    loss = [sum(float(r[f"train/{k}"]) for k in ("box_loss", "obj_loss", "cls_loss")) for r in rows]
    assert loss[-1] < loss[0]
    with caplog.at_level("INFO"):
        metrics = EMSYOLO(run / "weights" / "last.pt").val(data=str(data_yaml), imgsz=96, batch=8, workers=0,
                                                           plots=False, project=str(run.parent), name="val")
    assert "protocol B" in caplog.text and "Prophesee/RVT protocol" in caplog.text
    assert set(metrics.prophesee) >= {"mAP50-95", "mAP50", "mAP75"}
    val_times = EventCache(data_yaml.parent / "val.h5").t_us
    assert metrics.prophesee["images"] == int((val_times >= 500_000).sum()) > 0  # protocol A skips the first 0.5 s
    assert metrics.box.map == pytest.approx(float(rows[-1]["metrics/mAP50-95(B)"]), abs=1e-4)  # = last epoch's


@pytest.mark.slow
def test_predict_on_recording_and_cache(trained, gen1_synth, gen1_cache, tmp_path):
    run, _ = trained
    name, td, bb = find_recordings(gen1_synth / "val")[0]
    predict_cli(run, td, tmp_path / "p", "stride_ms=250")
    out = tmp_path / "p" / f"{name}_bbox.npy"
    det = read_bbox(out)
    assert len(det) and np.all(np.diff(det["t"]) >= 0) and (det["t"] % 250_000 == det["t"][0] % 250_000).all()
    assert (tmp_path / "p" / f"{name}.avi").is_file()
    results = EMSYOLO(run / "weights" / "last.pt").predict(td, stride_ms=250, conf=0.001, imgsz=96, save=False)
    times = np.array([int(r.path.rsplit("@", 1)[1].removesuffix("us")) for r in results])
    assert np.all(np.diff(times) == 250_000)
    assert set(times[[len(r.boxes) > 0 for r in results]].tolist()) == set(det["t"].tolist())
    api = np.concatenate([r.boxes.xyxy.numpy() for r in results])  # the Python API gives the CLI's boxes
    np.testing.assert_allclose(api[:, :2], np.stack([det["x"], det["y"]], 1), atol=1e-3)
    predict_cli(run, gen1_cache / "val.h5", tmp_path / "h")
    det = read_bbox(tmp_path / "h" / "val_bbox.npy")
    assert set(np.unique(det["t"])) <= set(EventCache(gen1_cache / "val.h5").t_us.tolist())


def test_cli_gen1_preprocess_and_video_to_events(gen1_synth, tmp_path):
    r = CliRunner().invoke(app, ["gen1", "preprocess", f"src={gen1_synth}", f"dst={tmp_path / 'c'}", "bins=2",
                                 "window_ms=100", "splits=[val]"])
    assert r.exit_code == 0, r.output
    c = EventCache(tmp_path / "c" / "val.h5")
    assert c.representation.bins == 2 and c.representation.window_us == 100_000 and len(c) > 0
    assert not (tmp_path / "c" / "train.h5").exists()
    d = yaml.safe_load((tmp_path / "c" / "data.yaml").read_text())
    assert d["val"] == "val.h5" and "train" not in d and d["channels"] == 6  # 2 bins x 3
    if not ESIM_VIDEO.is_file():
        pytest.skip("esim test video not present")
    out = tmp_path / "esim_td.dat"
    r = CliRunner().invoke(app, ["events", f"source={ESIM_VIDEO}", f"out={out}", "c_on=0.25", "c_off=0.25"])
    assert r.exit_code == 0, r.output
    ev = read_dat(out)
    assert len(ev) > 1000 and np.all(np.diff(ev["t"]) >= 0) and ev["x"].max() < 304 and ev["y"].max() < 240


@pytest.mark.slow
def test_predict_on_video_simulates_events_first(trained, tmp_path):
    if not ESIM_VIDEO.is_file():
        pytest.skip("esim test video not present")
    run, _ = trained
    predict_cli(run, ESIM_VIDEO, tmp_path / "v", "events=True")
    out = tmp_path / "v"
    assert len(read_dat(out / "esim_test_frames_td.dat")) > 1000
    det = read_bbox(out / "esim_test_frames_bbox.npy")
    assert len(det) > 0 and (det["x"] >= -1).all() and (det["x"] + det["w"] <= 305).all()
    assert (out / "esim_test_frames.avi").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evt3_sample.raw", "evt2_sample.raw"])
def test_predict_on_real_raw_recordings_writes_an_annotated_video(trained, tmp_path, name):
    """An event model takes a camera's .raw recording directly (the representation at the recording's sensor size,
    resized to imgsz), one window per stride."""
    import cv2

    source = SHARED_DATA / "events" / name
    if not source.exists():
        pytest.skip("shared .raw sample not available")
    run, _ = trained
    predict_cli(run, source, tmp_path / "raw", "stride_ms=2")
    stem = source.stem
    video = cv2.VideoCapture(str(tmp_path / "raw" / f"{stem}.avi"))
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    w, h = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    span_ms = {"evt3_sample": 8.8, "evt2_sample": 50.0}[stem]
    assert frames == int(span_ms // 2) + 1 or frames == int(span_ms // 2)  # one frame per 2 ms window
    assert (w, h) == {"evt3_sample": (1280, 720), "evt2_sample": (640, 480)}[stem]
    assert read_bbox(tmp_path / "raw" / f"{stem}_bbox.npy").dtype == BBOX_DTYPE


@pytest.mark.slow
def test_predict_on_an_rvt_hdf5_event_file(trained, tmp_path):
    """An RVT-layout HDF5 event file (not a sample cache) goes through the same sliding windows as a .dat."""
    import hdf5plugin

    sample = SHARED_DATA / "events" / "sample_ncars.dat"
    if not sample.exists():
        pytest.skip("shared N-CARS sample not available")
    ev = read_dat(sample)
    path = tmp_path / "ncars_td.dat.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("events")
        for k in "txyp":
            g.create_dataset(k, data=ev[k], **hdf5plugin.Blosc())
        g["width"], g["height"] = 304, 240
    run, _ = trained
    predict_cli(run, path, tmp_path / "h5", "stride_ms=25")
    det = read_bbox(tmp_path / "h5" / "ncars_bbox.npy")
    assert set(np.unique(det["t"]).tolist()) <= {25_000, 50_000, 75_000, 100_000}
    assert (tmp_path / "h5" / "ncars.avi").is_file()


def test_preprocess_takes_raw_and_rvt_h5_recordings(gen1_synth, gen1_cache, tmp_path):
    """A recording as EVT 2.0 .raw, or as RVT's _td.dat.h5, gives the same samples as its .dat."""
    import hdf5plugin

    from ems_yolo.events import write_raw_evt2

    name, td, bb = find_recordings(gen1_synth / "val")[0]
    events = read_dat(td)
    for suffix in ("_td.raw", "_td.dat.h5"):
        src = tmp_path / suffix.strip("_.") / "val"
        src.mkdir(parents=True)
        (src / bb.name).write_bytes(bb.read_bytes())
        if suffix == "_td.raw":
            write_raw_evt2(src / f"{name}{suffix}", events, 304, 240)
        else:
            with h5py.File(src / f"{name}{suffix}", "w") as f:
                for k in "txyp":
                    f.create_dataset(f"events/{k}", data=events[k], **hdf5plugin.Blosc(cname="zstd"))
        assert [r[1].name for r in find_recordings(src)] == [f"{name}{suffix}"]
        preprocess_dataset(src.parent, tmp_path / f"cache{suffix}", "gen1", REP, splits=("val",), progress=False)
        ours, ref = EventCache(tmp_path / f"cache{suffix}" / "val.h5"), EventCache(gen1_cache / "val.h5")
        n = int((ref.recording == ref.recordings.index(name)).sum())
        assert len(ours) == n > 0
        for i in range(n):
            np.testing.assert_array_equal(ours.stored(i), ref.stored(i))
            np.testing.assert_array_equal(ours.boxes(i), ref.boxes(i))


def test_parallel_preprocessing_writes_the_same_caches(gen1_synth, gen1_cache, tmp_path):
    preprocess_dataset(gen1_synth, tmp_path / "w2", "gen1", REP, progress=False, workers=2)
    for split in ("train", "val", "test"):
        with h5py.File(tmp_path / "w2" / f"{split}.h5") as a, h5py.File(gen1_cache / f"{split}.h5") as b:
            for name in ("samples", "labels", "t_us", "recording", "label_count", "recordings"):
                np.testing.assert_array_equal(a[name][:], b[name][:])
