"""Frame detection end to end through the Ultralytics engine: train, resume, val, predict, export, offline."""

import csv
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA
from typer.testing import CliRunner

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.cli import app
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.model import derive_model_yaml
from ems_yolo.engine.trainer import EMSTrainer
from ems_yolo.nn import EMSDetectionModel

pytestmark = pytest.mark.slow
VIDEO = SHARED_DATA / "videos" / "pedestrians.avi"
FAST = dict(workers=0, plots=False, batch=4, verbose=False)


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Every engine call in this module runs with internet sockets and DNS failing; attempts are recorded."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in tests")
        return real_connect(self, address)

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def tiny_yaml(tiny_yaml_file):
    """EMS-Res10 at quarter width as a YAML file."""
    return tiny_yaml_file(0.25)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, tiny_yaml):
    """A short seeded training on the built-in data; reused by the val/predict/export tests."""
    project = tmp_path_factory.mktemp("runs")
    data = make_shapes_dataset(n_train=64, n_val=16, imgsz=96)
    model = EMSYOLO(tiny_yaml, time_steps=1)
    metrics = model.train(
        data=str(data), epochs=6, imgsz=96, optimizer="AdamW", lr0=0.003, warmup_epochs=1, mosaic=0.0,
        seed=0, project=str(project), name="shapes", **FAST,
    )
    return project / "shapes", metrics, data


def test_builtin_data_training_learns(shapes_run):
    run, metrics, _ = shapes_run
    assert metrics.box.map50 > 0
    ckpt = torch.load(run / "weights" / "best.pt", weights_only=False)
    assert ckpt["model"].yaml["time_steps"] == 1  # checkpoints record T
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert len(rows) == 6 and "train/obj_loss" in rows[0]


def test_cli_train_on_coco8_writes_weights_and_results(tmp_path, tiny_yaml, caplog, coco8):
    data = tmp_path / "coco8.yaml"
    names = "".join(f"  {i}: c{i}\n" for i in range(80))
    data.write_text(f"path: {coco8}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    r = CliRunner().invoke(
        app,
        ["train", f"model={tiny_yaml}", f"data={data}", "epochs=2", "imgsz=64", "batch=4", "workers=0",
         f"project={tmp_path}", "name=c8", "time_steps=2", "plots=False"],
    )
    assert r.exit_code == 0, r.output
    weights = tmp_path / "c8" / "weights"
    assert (weights / "best.pt").is_file() and (weights / "last.pt").is_file()
    rows = list(csv.DictReader((tmp_path / "c8" / "results.csv").open()))
    assert len(rows) == 2
    assert torch.load(weights / "last.pt", weights_only=False)["model"].yaml["time_steps"] == 2


def test_cli_rejects_typos_with_closest_key(capsys):
    from ems_yolo.cli import run

    assert run(["train", "epohcs=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ems-yolo: error: 'epohcs' is not a valid key for 'train'. Did you mean 'epochs'?")


def test_missing_coco_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="(?s)never downloads.*cocodataset.org"):
        EMSYOLO("ems-res10.yaml").val(data="coco.yaml")


def test_val_reports_map_and_pycocotools(shapes_run, caplog):
    run, _, data = shapes_run
    with caplog.at_level("INFO"):
        metrics = EMSYOLO(run / "weights" / "best.pt").val(
            data=str(data), imgsz=96, save_json=True, project=str(run.parent), name="val", **FAST
        )
    text = caplog.text
    assert "mAP50" in text and "mAP50-95" in text
    assert 0 < metrics.box.map50 <= 1
    assert set(metrics.coco) == {"coco/mAP50-95", "coco/mAP50"}
    assert 0 <= metrics.coco["coco/mAP50-95"] <= metrics.coco["coco/mAP50"] <= 1
    assert "pycocotools" in text


def test_resume_after_interruption(tmp_path, tiny_yaml):
    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    model = EMSYOLO(tiny_yaml, time_steps=1)

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    model.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=str(data), epochs=3, imgsz=64, project=str(tmp_path), name="r", **FAST)
    last = tmp_path / "r" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    assert not list(last.parent.glob(".*tmp*"))  # atomic writes leave no temporaries
    EMSYOLO(last).train(resume=True)
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_predict_video_keeps_every_frame(shapes_run, tmp_path):
    if not VIDEO.is_file():
        pytest.skip("pedestrian video not present")
    run, _, _ = shapes_run
    r = CliRunner().invoke(
        app, ["predict", f"model={run / 'weights' / 'best.pt'}", f"source={VIDEO}", "imgsz=64",
              f"project={tmp_path}", "name=vid", "verbose=False"],
    )
    assert r.exit_code == 0, r.output
    out = next((tmp_path / "vid").iterdir())
    cap, n = cv2.VideoCapture(str(out)), 0
    while cap.read()[0]:
        n += 1
    src, m = cv2.VideoCapture(str(VIDEO)), 0
    while src.read()[0]:
        m += 1
    assert n == m == 341


def test_predict_images_gives_results(shapes_run):
    run, _, data = shapes_run
    images = sorted((data.parent / "images" / "val").glob("*.png"))[:3]
    results = EMSYOLO(run / "weights" / "best.pt").predict([str(p) for p in images], imgsz=96, conf=0.001,
                                                           verbose=False)
    assert len(results) == 3
    assert sum(len(r.boxes) for r in results) > 0
    assert all(r.boxes.xyxy.shape[1] == 4 for r in results)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_predicts(shapes_run, fmt):
    run, _, data = shapes_run
    best = run / "weights" / "best.pt"
    model = EMSYOLO(best)
    f = model.export(format=fmt, imgsz=96)
    x = torch.rand(1, 3, 96, 96)
    ref = model.model.float().eval()(x)[0].detach()
    if fmt == "onnx":
        import onnxruntime

        sess = onnxruntime.InferenceSession(f, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    else:
        out = torch.jit.load(f)(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4)
    image = str(sorted((data.parent / "images" / "val").glob("*.png"))[0])
    res = EMSYOLO(f).predict(image, imgsz=96, conf=0.001, verbose=False)
    ref_res = EMSYOLO(best).predict(image, imgsz=96, conf=0.001, verbose=False)
    assert len(res[0].boxes) == len(ref_res[0].boxes)
    if len(ref_res[0].boxes):
        assert np.allclose(res[0].boxes.xyxy.numpy(), ref_res[0].boxes.xyxy.numpy(), atol=1e-2)


def test_ddp_launcher_imports_our_trainer(tmp_path, tiny_yaml):
    """The script Ultralytics' DDP launcher generates must rebuild EMSTrainer (by import, not by value)."""
    import pickletools
    import zipfile

    from ultralytics.utils.dist import generate_ddp_file

    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    trainer = EMSTrainer(overrides={"model": tiny_yaml, "data": str(data), "project": str(tmp_path), "epochs": 1})
    trainer.model = trainer.get_model(cfg=tiny_yaml, verbose=False)
    script = Path(generate_ddp_file(trainer))
    state_file = script.with_suffix(".pt")
    try:
        text = script.read_text()
        if not state_file.exists():  # Ultralytics < 8.4.140 writes the import into the script itself
            assert "from ems_yolo.engine.trainer import EMSTrainer" in text and "EMSTrainer(cfg=cfg" in text
            return
        assert 'state["trainer"](cfg=cfg, overrides=state["args"]' in text
        state = torch.load(state_file, weights_only=False)
        assert state["trainer"] is EMSTrainer
        with zipfile.ZipFile(state_file) as z:  # torch.save: a zip holding the pickle
            pickle_bytes = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        globals_ = [arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"]
        assert "ems_yolo.engine.trainer EMSTrainer" in globals_  # by reference: workers import ems_yolo
    finally:
        script.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)


def test_ann_twin_trains_and_exports(tmp_path):
    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    d = load_model_yaml("ems-res10.yaml")
    d["width_multiple"] = 0.25
    model = EMSYOLO(derive_model_yaml(d), ann=True)
    assert model.time_steps == 1 and model.model.yaml["neuron"]["kind"] == "relu"
    assert not any(type(m).__name__ == "LIF" for m in model.model.modules())
    model.train(data=str(data), epochs=1, imgsz=64, project=str(tmp_path), name="ann", **FAST)
    best = tmp_path / "ann" / "weights" / "best.pt"
    row = list(csv.DictReader((tmp_path / "ann" / "results.csv").open()))[-1]
    val = EMSYOLO(best).val(data=str(data), imgsz=64, project=str(tmp_path), name="v", **{**FAST, "batch": 8})
    assert val.box.map == pytest.approx(float(row["metrics/mAP50-95(B)"]), abs=1e-4)  # the training run's figure
    assert Path(EMSYOLO(best).export(format="torchscript", imgsz=64)).is_file()
    with pytest.raises(ValueError, match="model YAML settings"):
        EMSYOLO(best, ann=True)


def test_energy_cli_and_val_energy(shapes_run, tmp_path):
    run, _, data = shapes_run
    best = run / "weights" / "best.pt"
    r = CliRunner().invoke(app, ["val", f"model={best}", f"data={data}", "imgsz=96", "batch=4", "workers=0",
                                 "energy=True", f"project={tmp_path}", "name=v", "plots=False"])
    assert r.exit_code == 0, r.output
    for f in ("energy.csv", "energy.json", "firing_rates.png"):
        assert (tmp_path / "v" / f).is_file(), f
    r = CliRunner().invoke(app, ["energy", "model=ems-res10.yaml", f"data={data}", "imgsz=64", "max_batches=1",
                                 "batch=2", "preset=fp16", f"project={tmp_path}", "name=e"])
    assert r.exit_code == 0, r.output
    import json

    report = json.loads((tmp_path / "e" / "energy.json").read_text())
    flat = json.dumps(report)
    assert '"e_mac": 1.5' in flat and '"e_ac": 0.4' in flat
    with (tmp_path / "e" / "energy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("kind") == "AC" for r in rows) and any(r.get("kind") == "MAC" for r in rows)


def test_autoanchor_runs_in_training_and_can_be_disabled(tmp_path, tiny_yaml, caplog):
    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    with caplog.at_level("INFO"):
        EMSYOLO(tiny_yaml).train(data=str(data), epochs=1, imgsz=64, project=str(tmp_path), name="a", **FAST)
    assert "AutoAnchor: best possible recall" in caplog.text
    caplog.clear()
    d = load_model_yaml(tiny_yaml)
    d["autoanchor"] = False
    with caplog.at_level("INFO"):
        EMSYOLO(derive_model_yaml(d)).train(data=str(data), epochs=1, imgsz=64, project=str(tmp_path), name="b", **FAST)
    assert "AutoAnchor" not in caplog.text


def test_time_steps_override_on_a_checkpoint(shapes_run, tmp_path):
    """time_steps= on a .pt gives the model that the YAML at that T builds, with the checkpoint's weights."""
    run, _, data = shapes_run
    best = run / "weights" / "best.pt"
    model = EMSYOLO(best, time_steps=3)
    assert model.time_steps == 3 and {m.time_steps for m in model.model.modules() if "time_steps" in vars(m)} == {3}
    fresh = EMSDetectionModel({**model.model.yaml}, verbose=False)
    fresh.load_state_dict(model.model.float().state_dict())
    x = torch.rand(1, 3, 96, 96)
    assert torch.equal(model.model.eval()(x)[0], fresh.eval()(x)[0])
    r = CliRunner().invoke(app, ["val", f"model={best}", f"data={data}", "time_steps=2", "imgsz=96", "batch=4",
                                 "workers=0", "plots=False", f"project={tmp_path}", "name=v"])
    assert r.exit_code == 0, r.output
