"""A tiny SpikeYOLO (cfg/models/spikeyolo-tiny.yaml: SpikeYOLO's blocks, I-LIF, SpikeDetect with Ultralytics' v8
loss) learns (issue 24 item 7): on the built-in data its validation mAP50 rises above the first epoch's, and on
generated Gen1 events (data=gen1-synthetic) it trains with T taken from the data's bins."""

import csv

import pytest

from ems_yolo import EMSYOLO
from ems_yolo.data.shapes import make_shapes_dataset

RECIPE = dict(optimizer="AdamW", lr0=0.01, warmup_epochs=1, warmup_bias_lr=0.0, seed=0, workers=0, plots=False,
              batch=8, nbs=8, verbose=False)


def _map50(run) -> list[float]:
    return [float(r["metrics/mAP50(B)"]) for r in csv.DictReader((run / "results.csv").open())]


def test_tiny_spikeyolo_learns_on_builtin_data(tmp_path):
    data = make_shapes_dataset(n_train=64, n_val=16, imgsz=96)
    model = EMSYOLO("spikeyolo-tiny.yaml")
    metrics = model.train(data=str(data), epochs=8, imgsz=96, mosaic=0.0, project=str(tmp_path), name="s", **RECIPE)
    curve = _map50(tmp_path / "s")
    assert len(curve) == 8 and curve[0] < 0.001 and min(curve[-3:]) > 0.002, curve  # seeded: 0 -> 0.004
    assert metrics.box.map50 > 0.002 and type(model.model.model[-1]).__name__ == "SpikeDetect"


@pytest.mark.slow  # about 5 CPU minutes, most of it generating the recordings
def test_tiny_spikeyolo_learns_on_gen1_synthetic(tmp_path):
    model = EMSYOLO("spikeyolo-tiny.yaml")
    model.train(data="gen1-synthetic", epochs=8, imgsz=96, project=str(tmp_path), name="g", **RECIPE)
    assert model.model.yaml["time_steps"] == 5 and model.model.yaml["input"] == "events"  # T = the data's bins
    curve = _map50(tmp_path / "g")
    assert curve[0] < 0.01 and max(curve) > 0.03, curve  # seeded: 0 -> 0.08 at epoch 5
