"""Every CLI mode is a method of EMSYOLO with the same arguments: each runs both ways and gives the same result."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.cli import app
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.model import derive_model_yaml

pytestmark = pytest.mark.slow


def cli(*args: str) -> None:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output


def api(mode: str, kv: dict):
    """The same call through Python: model keys to the constructor, everything else to the mode's method."""
    keys = ("model", "time_steps", "ann", "checkpoint", "nc", "channels", "input")
    model_keys = {k: kv.pop(k) for k in keys if k in kv}
    return getattr(EMSYOLO(**model_keys), mode)(**kv)


def both(mode: str, project, **kv):
    """Run `mode` through the CLI (run folder 'cli') and through EMSYOLO (run folder 'api'), same random state."""
    torch.manual_seed(0)
    cli(mode, *(f"{k}={v}" for k, v in kv.items()), f"project={project}", "name=cli")
    torch.manual_seed(0)
    return api(mode, {**kv, "project": str(project), "name": "api"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    project = tmp_path_factory.mktemp("facade")
    d = load_model_yaml("ems-res10.yaml")
    d["width_multiple"] = 0.25
    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    common = dict(model=derive_model_yaml(d), data=data, epochs=2, imgsz=64, batch=4, workers=0, seed=0,
                  plots=False, time_steps=1)
    both("train", project / "train", **common)
    return project, data


def test_train(setup):
    project, _ = setup
    rows = [list(csv.DictReader((project / "train" / n / "results.csv").open())) for n in ("cli", "api")]
    assert len(rows[0]) == 2
    for a, b in zip(*rows):
        for key in ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/mAP50(B)"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key


def test_val(setup):
    project, data = setup
    best = project / "train" / "cli" / "weights" / "best.pt"
    both("val", project / "val", model=best, data=data, imgsz=64, batch=4, workers=0, save_json=True, plots=False)
    preds = [json.loads((project / "val" / n / "predictions.json").read_text()) for n in ("cli", "api")]
    assert preds[0] == preds[1] and len(preds[0]) > 0


def test_val_energy(setup):
    project, data = setup
    best = project / "train" / "cli" / "weights" / "best.pt"
    both("val", project / "valE", model=best, data=data, imgsz=64, batch=4, workers=0, energy=True, plots=False)
    reports = [json.loads((project / "valE" / n / "energy.json").read_text()) for n in ("cli", "api")]
    assert reports[0] == reports[1] and reports[0]["layers"]


def test_predict(setup):
    project, data = setup
    best = project / "train" / "cli" / "weights" / "best.pt"
    source = data.parent / "images" / "val"
    both("predict", project / "pred", model=best, source=source, imgsz=64, conf=0.001, save=True, save_txt=True)
    labels = [sorted((project / "pred" / n / "labels").glob("*.txt")) for n in ("cli", "api")]
    assert len(labels[0]) == 4 and [p.name for p in labels[0]] == [p.name for p in labels[1]]
    for a, b in zip(*labels):
        assert np.allclose(np.loadtxt(a, ndmin=2), np.loadtxt(b, ndmin=2), atol=1e-4)


def test_predict_uses_the_nms_iou_of_val(setup, tmp_path):
    """predict's NMS IoU is val's (0.6, the original's), not Ultralytics' 0.7, unless `iou` is given."""
    project, data = setup
    image = str(sorted((data.parent / "images" / "val").iterdir())[0])
    model = EMSYOLO(project / "train" / "cli" / "weights" / "best.pt")
    for given, used in (({}, 0.6), ({"iou": 0.45}, 0.45)):
        model.predict(image, imgsz=64, project=str(tmp_path), **given)
        assert model.predictor.args.iou == used


def test_export(setup, tmp_path):
    project, _ = setup
    best = project / "train" / "cli" / "weights" / "best.pt"
    cli("export", f"model={best}", "format=torchscript", "imgsz=64")
    exported = best.with_suffix(".torchscript")
    first = torch.jit.load(exported)
    exported.rename(tmp_path / "cli.torchscript")
    f = api("export", {"model": best, "format": "torchscript", "imgsz": 64})
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(first(x), torch.jit.load(f)(x))


def test_energy(setup):
    project, data = setup
    both("energy", project / "energy", model="ems-res10.yaml", data=data, imgsz=64, batch=2, max_batches=1,
         preset="fp16")
    reports = [json.loads((project / "energy" / n / "energy.json").read_text()) for n in ("cli", "api")]
    assert reports[0] == reports[1] and reports[0]["e_mac"] == 1.5


def test_info(caplog):
    with caplog.at_level(logging.INFO):
        cli("info", "model=ems-res10.yaml", "nc=2", "imgsz=320", "time_steps=4")
        cli_text = caplog.text
        caplog.clear()
        layers, params, grads, gflops = api("info", {"model": "ems-res10.yaml", "nc": 2, "imgsz": 320, "time_steps": 4})
    assert params == 6_207_050 and f"{params:,} parameters" in cli_text
    assert f"{gflops:.1f} GFLOPs total (T=4, 320x320)" in cli_text and caplog.text.count("summary:") == 1
