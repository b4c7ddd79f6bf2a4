"""Event prediction takes frame prediction's keys with frame prediction's defaults (issue 22 item 4): nothing saved
from Python unless asked, save_txt / save_conf / save_crop / show per window, a progress bar; `ems-yolo events` on a
video without out= writes under the runs folder, never beside the video."""

import cv2
import numpy as np
import pytest
from event_data import random_events, tiny_event_checkpoint

from ems_yolo.cli import run
from ems_yolo.engine.model import EMSYOLO
from ems_yolo.events.io import read_dat, write_dat
from ems_yolo.events.representations import EventRepresentation

STRIDE_MS = 250  # a 1 s recording: windows ending at 250, 500, 750, 1000 ms


@pytest.fixture(scope="module")
def event_model(tmp_path_factory):
    """A tiny untrained event model (2 bins of 50 ms, 64x48) and a 1 s recording of random events."""
    d = tmp_path_factory.mktemp("ev")
    pt = tiny_event_checkpoint(d / "ev.pt", EventRepresentation(bins=2, window_us=50_000, height=48, width=64))
    rec = d / "rec_td.dat"
    write_dat(rec, random_events(20_000, 1_000_000, 64, 48), width=64, height=48)
    return str(pt), rec


def test_python_saves_nothing_by_default_and_writes_labels_and_crops_when_asked(event_model, tmp_path, capsys):
    pt, rec = event_model
    common = dict(stride_ms=STRIDE_MS, imgsz=64, conf=0.001, project=str(tmp_path))
    results = EMSYOLO(pt).predict(str(rec), name="default", **common)
    assert len(results) == 4 and not (tmp_path / "default").exists()  # as frames: nothing saved from Python
    assert "rec_td.dat windows: 100% ━━━━━━━━━━━━ 4/4" in capsys.readouterr().out  # a progress bar of the windows

    results = EMSYOLO(pt).predict(str(rec), name="keys", save_txt=True, save_conf=True, save_crop=True, show=True,
                                  **common)  # show: no display here, one warning (as Ultralytics' predictor)
    out = tmp_path / "keys"
    assert sorted(p.name for p in out.iterdir()) == ["crops", "labels"]  # no video, no _bbox.npy: save=False
    boxed = [r for r in results if len(r.boxes)]
    assert boxed, "an untrained model at conf=0.001 finds boxes"
    for r in boxed:
        t = r.path.rsplit("@", 1)[1]
        rows = np.loadtxt(out / "labels" / f"rec_{t}.txt", ndmin=2)
        assert rows.shape == (len(r.boxes), 6)  # class, x, y, w, h (normalised), score
        np.testing.assert_allclose(rows[:, 5], r.boxes.conf.numpy(), atol=1e-5)
        np.testing.assert_allclose(rows[:, 1:5], r.boxes.xywhn.numpy(), atol=1e-5)
    crops = list((out / "crops").rglob("*.jpg"))
    assert len(crops) == sum(len(r.boxes) for r in boxed) and all(cv2.imread(str(c)) is not None for c in crops)


def test_cli_saves_by_default(event_model, tmp_path, capsys):
    pt, rec = event_model
    assert run(["predict", f"model={pt}", f"source={rec}", f"stride_ms={STRIDE_MS}", "imgsz=64",
                f"project={tmp_path}", "name=cli"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["rec.avi", "rec_bbox.npy"]
    assert int(cv2.VideoCapture(str(tmp_path / "cli" / "rec.avi")).get(cv2.CAP_PROP_FRAME_COUNT)) == 4


def test_events_from_a_video_go_under_the_runs_folder(tmp_path, monkeypatch, capsys):
    video = tmp_path / "in" / "clip.avi"
    video.parent.mkdir()
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(6):
        frame = np.zeros((48, 64, 3), np.uint8)
        cv2.rectangle(frame, (4 + 6 * i, 10), (20 + 6 * i, 30), (255, 255, 255), -1)  # a moving square
        writer.write(frame)
    writer.release()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for expected in ("clip_td.dat", "clip-2_td.dat"):  # a second run does not replace the first one's file
        assert run(["events", f"source={video}", "width=64", "height=48"]) == 0
        out = work / "runs" / "events" / expected
        assert len(read_dat(out)) > 100 and str(out) in capsys.readouterr().out
    assert sorted(p.name for p in video.parent.iterdir()) == ["clip.avi"]  # nothing beside the input
