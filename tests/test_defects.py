"""Defects a new user hit (issue 12) that are not a bad-input error: each test failed before its fix."""

import csv
import json
import logging

import pytest
import torch
from ultralytics_logs import ultralytics_log

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.model import derive_model_yaml

FAST = dict(batch=4, workers=0, plots=False, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_yaml_file):
    return tiny_yaml_file(0.125)


@pytest.fixture(scope="module")
def data():
    return str(make_shapes_dataset(n_train=8, n_val=4, imgsz=64))


@pytest.fixture(scope="module")
def run(tiny, data, tmp_path_factory):
    """One short training run at 64 px, its log kept."""
    project = tmp_path_factory.mktemp("defects")
    log = ultralytics_log(lambda: EMSYOLO(tiny, time_steps=1).train(data=data, epochs=1, imgsz=64,
                                                                    project=str(project), name="r", **FAST))
    return project / "r", log


def test_results_name_losses_as_ultralytics_plots_them(run):
    folder, _ = run
    header = next(csv.reader((folder / "results.csv").open()))
    assert {"train/box_loss", "train/obj_loss", "train/cls_loss", "val/box_loss"} <= set(header)


def test_training_summary_and_cpu_note_use_the_training_size(run):
    _, log = run
    assert "(T=1, 64x64)" in log and "640x640" not in log
    assert "CPU training: one image takes" in log and "an epoch of 8 images takes about" in log


def test_export_hints_name_ems_yolo_commands(run, caplog):
    folder, _ = run
    with caplog.at_level(logging.INFO):
        EMSYOLO(folder / "weights" / "best.pt").export(format="torchscript", imgsz=64)
    assert "ems-yolo predict model=" in caplog.text and "ems-yolo val model=" in caplog.text
    assert "yolo predict task" not in caplog.text and "yolo val task" not in caplog.text


def test_save_json_without_detections_scores_zero(run, data, tmp_path):
    folder, _ = run
    metrics = EMSYOLO(folder / "weights" / "best.pt").val(data=data, imgsz=64, conf=0.999, save_json=True,
                                                          project=str(tmp_path), name="v", **FAST)
    assert json.loads((tmp_path / "v" / "predictions.json").read_text()) == []
    assert metrics.coco == {"coco/mAP50-95": 0.0, "coco/mAP50": 0.0}


def test_energy_of_an_untrained_model_says_the_ratio_means_nothing(run, tiny, data, tmp_path):
    folder, _ = run
    untrained = EMSYOLO(tiny).energy(data=data, imgsz=64, batch=2, max_batches=1, project=str(tmp_path))
    trained = EMSYOLO(folder / "weights" / "best.pt").energy(data=data, imgsz=64, batch=2, max_batches=1,
                                                            project=str(tmp_path))
    assert untrained.untrained and "UNTRAINED weights" in untrained.table()
    assert not trained.untrained and "UNTRAINED" not in trained.table()
    assert json.loads((tmp_path / "energy" / "energy.json").read_text())["untrained"] is True


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"time_steps": 0}, "time_steps=0: expected a positive integer"),
    ({"channels": 0}, "channels=0: expected a positive integer"),
    ({"nc": -1}, "nc=-1: expected a positive integer"),
    ({"input": "rgb"}, "input='rgb': expected one of frames, events"),
])
def test_python_api_checks_values_like_the_cli(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMSYOLO(tiny, **kwargs)


def test_python_api_checks_mode_values(tiny):
    model = EMSYOLO(tiny)
    for call, message in ((lambda: model.info(imgsz=0), "imgsz=0"),
                          (lambda: model.train(imgsz=-5), "imgsz=-5"),
                          (lambda: model.predict("x.dat", stride_ms=0), "stride_ms=0"),
                          (lambda: model.energy(max_batches=0), "max_batches=0")):
        with pytest.raises(ValueError, match=message):
            call()


def test_model_yaml_channels_are_not_silently_replaced(tiny, data):
    cfg = load_model_yaml(tiny)
    cfg["channels"] = 4
    with pytest.raises(ValueError, match="channels: 4, but the data .* has 3 channels"):
        EMSYOLO(str(derive_model_yaml(cfg))).train(data=data, epochs=1, imgsz=64, **FAST)


def test_finished_checkpoint_is_not_resumed(run):
    folder, _ = run
    with pytest.raises(ValueError, match="training to 1 epochs is finished"):
        EMSYOLO(folder / "weights" / "last.pt").train(resume=True)
    assert torch.load(folder / "weights" / "last.pt", weights_only=False)["epoch"] == -1
