"""The Ultralytics verbs a user reaches for, from the console script and from Python: checks, settings (runs_dir),
track, benchmark, tune; every one offline, writing only under the user's runs_dir, or refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "ems-yolo"


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script in a new process, whose Ultralytics settings folder follows its EMS_YOLO_HOME."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "YOLO_CONFIG_DIR"}
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh ems-yolo home (settings file) for this test, in this process and its subprocesses."""
    monkeypatch.setenv("EMS_YOLO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_checks_names_versions_devices_and_where_things_go(home, tmp_path):
    """The first run in a fresh home, too: no banner telling the user to run Ultralytics' `yolo settings`."""
    r = run("checks", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Creating new Ultralytics Settings" not in r.stdout + r.stderr
    assert (home / "ultralytics" / "Ultralytics" / "settings.json").is_file()  # its file exists, in our home
    out = r.stdout
    import torch
    import ultralytics

    assert f"torch {torch.__version__}" in out and f"ultralytics {ultralytics.__version__}" in out
    assert "CUDA" in out and "Triton" in out and "YOLO_OFFLINE=true" in out
    assert f"ems-yolo settings: {home / 'settings.yaml'}" in out
    assert f"runs: {tmp_path / 'runs' / 'detect'}" in out
    assert "'yolo settings'" not in out.replace("not 'yolo settings'", "")
    assert run("checks", "x=1").returncode == 2


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ems-yolo args` in this process: (exit code, stdout, stderr)."""
    from ems_yolo.cli import run as run_cli

    capsys.readouterr()
    code = run_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_settings_show_change_reset_and_runs_dir_is_honoured(home, tmp_path, capsys, steady):
    from ems_yolo.cfg import DATASETS_DIR, default_project
    from ems_yolo.utils.settings import load_settings

    code, out, _ = cli(capsys, "settings")
    assert code == 0 and "runs_dir: runs" in out and str(home / "settings.yaml") in out
    runs = tmp_path / "elsewhere"
    code, out, _ = cli(capsys, "settings", f"runs_dir={runs}")
    assert code == 0 and f"runs_dir: {runs}" in out
    assert load_settings()["runs_dir"] == str(runs) and default_project() == str(runs / "detect")
    r = run("checks")  # another process reads the same file
    assert f"runs: {runs / 'detect'}" in r.stdout
    image = DATASETS_DIR / "coco8" / "images" / "val" / "000000000036.jpg"
    for command in (["predict", f"source={image}"], ["val", "data=coco8.yaml", "batch=4", "plots=False"]):
        assert cli(capsys, *command, f"model={steady[0]}", "imgsz=64")[0] == 0
    assert (runs / "detect" / "predict" / image.name).is_file() and (runs / "detect" / "val").is_dir()
    assert sorted(tmp_path.iterdir()) == sorted([home, runs])  # nothing elsewhere
    code, _, err = cli(capsys, "settings", "runs_dir_typo=x")
    assert code == 2 and "Did you mean 'runs_dir'" in err
    (home / "settings.yaml").write_text("runs_dirr: x\n")
    code, _, err = cli(capsys, "settings")
    assert code == 2 and err.count("\n") == 1 and "settings.yaml: 'runs_dirr' is not an ems-yolo setting" in err
    code, out, _ = cli(capsys, "settings", "reset")
    assert code == 0 and "runs_dir: runs" in out and load_settings()["runs_dir"] == "runs"


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """A tiny frame checkpoint whose head ignores its input and is sure of the same boxes in every frame (zero
    weights, large objectness and class-0 biases), and a 4-frame video: what a tracker must follow with steady ids."""
    import cv2
    import numpy as np
    import torch

    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.engine.checkpoints import write_checkpoint
    from ems_yolo.nn import EMSDetectionModel

    d = tmp_path_factory.mktemp("steady")
    cfg = load_model_yaml("ems-res10.yaml")
    cfg.update(width_multiple=0.125, time_steps=1)
    model = EMSDetectionModel(cfg, nc=2, verbose=False)
    head = model.model[-1]
    with torch.no_grad():
        for conv in head.m:
            conv.weight.zero_()
            bias = conv.bias.view(head.na, head.no)
            bias[:, :4], bias[:, 4], bias[:, 5], bias[:, 6] = 0.0, 8.0, 8.0, -8.0
    model.names = {0: "thing", 1: "other"}
    pt = write_checkpoint({"model": model, "optimizer": None, "epoch": -1, "train_args": {"task": "detect"}},
                          d / "steady.pt")
    video = d / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for i in range(4):
        writer.write(np.full((64, 64, 3), 40 * i, np.uint8))
    writer.release()
    return str(pt), video


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["bytetrack.yaml", "botsort.yaml"])
def test_track_follows_boxes_with_steady_ids_from_python(steady, tracker, tmp_path):
    from ems_yolo import EMSYOLO

    pt, video = steady
    results = EMSYOLO(pt).track(str(video), imgsz=64, tracker=tracker, project=str(tmp_path))
    assert len(results) == 4 and all(len(r.boxes) > 0 for r in results)
    ids = [set(r.boxes.id.int().tolist()) for r in results[1:]]  # tracks are confirmed from the second frame on
    assert ids[0] and all(i == ids[0] for i in ids)  # the same boxes keep their ids
    assert not (tmp_path / "track").exists()  # Python saves nothing unless asked


def test_track_cli_writes_under_runs_dir_and_refuses_events_in_one_line(steady, home, tmp_path, capsys):
    import cv2

    pt, video = steady
    runs = tmp_path / "myruns"
    assert cli(capsys, "settings", f"runs_dir={runs}")[0] == 0
    code, out, err = cli(capsys, "track", f"model={pt}", f"source={video}", "imgsz=64", "tracker=bytetrack.yaml")
    assert code == 0, err
    saved = runs / "detect" / "track" / "clip.avi"
    assert int(cv2.VideoCapture(str(saved)).get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    code, _, err = cli(capsys, "track", f"model={pt}", "source=rec_td.dat")
    assert code == 2 and err.count("\n") == 1 and "expected a frame source" in err
    code, _, err = cli(capsys, "track", f"model={pt}", f"source={video}", "stride_ms=5")
    assert code == 2 and "'stride_ms' applies to 'predict' only" in err


def test_track_without_lap_is_one_line_naming_the_extra(steady, tmp_path):
    """Ultralytics would try to pip-install lap (auto-install is off: an ImportError traceback); ems-yolo says what
    to install."""
    pt, video = steady
    code = ("import sys; sys.modules['lap'] = None; from ems_yolo.cli import main; "
            f"sys.argv = ['ems-yolo', 'track', 'model={pt}', 'source={video}', 'imgsz=64']; main()")
    env = {k: v for k, v in os.environ.items() if k != "YOLO_CONFIG_DIR"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == ("ems-yolo: error: tracking needs the lap package, expected it "
                                                      "installed: pip install 'ems-yolo[track]' (or pip install lap)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_benchmark_cli_measures_every_format_on_the_named_data_under_runs_dir(steady, home, tmp_path, capsys):
    import csv

    pt, _ = steady
    runs = tmp_path / "myruns"
    assert cli(capsys, "settings", f"runs_dir={runs}")[0] == 0
    code, out, err = cli(capsys, "benchmark", f"model={pt}", "data=coco8.yaml", "imgsz=64")
    assert code == 0, err
    folder = runs / "detect" / "benchmark"
    rows = list(csv.DictReader((folder / "benchmarks.csv").open()))
    assert [r["format"] for r in rows] == ["pytorch", "onnx", "torchscript"]
    assert sorted(p.name for p in (folder / "weights").iterdir()) == ["steady.onnx", "steady.pt", "steady.torchscript"]
    for r in rows:  # the same model in three formats scores the same on the same 4 images
        assert float(r["size_mb"]) > 0 and float(r["inference_ms"]) > 0
        assert float(r["mAP50-95"]) == pytest.approx(float(rows[0]["mAP50-95"]), abs=1e-3)
    code, _, err = cli(capsys, "benchmark", f"model={pt}", "format=coreml")
    assert code == 2 and err.count("\n") == 1 and "expected one of pytorch, onnx, torchscript" in err
    code, _, err = cli(capsys, "benchmark", f"model={pt}", "data=nowhere.yaml", "imgsz=64")
    assert code == 2 and "dataset 'nowhere.yaml' not found" in err
    assert sorted(p.name for p in (runs / "detect").iterdir()) == ["benchmark"]  # refusals leave no run folder


@pytest.mark.slow
def test_benchmark_from_python_defaults_to_local_data_never_a_download(steady, tmp_path):
    """Ultralytics' `model.benchmark()` downloads coco8.zip; ems-yolo's validates on the checkpoint's data, else the
    built-in dataset."""
    from ems_yolo import EMSYOLO

    pt, _ = steady
    rows = EMSYOLO(pt).benchmark(imgsz=64, format="onnx", project=str(tmp_path))
    assert [r["format"] for r in rows] == ["onnx"] and 0 <= rows[0]["mAP50-95"] <= 1
    assert (tmp_path / "benchmark" / "onnx").is_dir() and (tmp_path / "benchmark" / "benchmarks.csv").is_file()
    with pytest.raises(ValueError, match="format='tflite': expected one of pytorch, onnx, torchscript"):
        EMSYOLO(pt).benchmark(format="tflite", project=str(tmp_path))


@pytest.fixture(scope="module")
def tiny_train():
    """A tiny frame model YAML (width 0.125, T=1) and a small built-in shapes set at 64 px."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.data.shapes import make_shapes_dataset
    from ems_yolo.engine.model import derive_model_yaml

    cfg = load_model_yaml("ems-res10.yaml")
    cfg.update(width_multiple=0.125, time_steps=1)
    return str(derive_model_yaml(cfg)), str(make_shapes_dataset(n_train=8, n_val=4, imgsz=64))


@pytest.mark.slow
def test_tune_from_python_trains_every_iteration_in_process_over_keys_that_matter(tiny_train, tmp_path):
    import json

    import yaml

    from ems_yolo import EMSYOLO
    from ems_yolo.engine.tuner import TUNE_SPACE

    model, data = tiny_train
    space = {"lr0": (1e-4, 1e-2), "fliplr": (0.0, 1.0)}
    folder = EMSYOLO(model).tune(iterations=2, space=space, data=data, epochs=1, imgsz=64, batch=4, workers=0,
                                 plots=False, project=str(tmp_path))
    assert folder == tmp_path / "tune" and sorted(p.name for p in tmp_path.iterdir()) == ["tune"]  # runs nested
    rows = [json.loads(line) for line in (folder / "tune_results.ndjson").read_text().splitlines()]
    assert len(rows) == 2 and not any(r.get("failed_datasets") for r in rows)  # both trainings ran and scored
    assert all(set(r["hyperparameters"]) == set(space) for r in rows)
    assert rows[0]["hyperparameters"] != rows[1]["hyperparameters"]  # the second iteration mutated the first
    assert set(yaml.safe_load((folder / "best_hyperparameters.yaml").read_text())) == set(space)
    assert (folder / "weights" / "best.pt").is_file()
    assert not {"box", "cls", "dfl"} & set(TUNE_SPACE)  # gains our loss ignores are not searched
    with pytest.raises(ValueError, match="'box' is a gain of Ultralytics' loss"):
        EMSYOLO(model).tune(space={"box": (1, 20)}, data=data)
    with pytest.raises(ValueError, match="use_ray=True"):
        EMSYOLO(model).tune(use_ray=True, data=data)


@pytest.mark.slow
def test_tune_cli_writes_under_runs_dir_and_refuses_bad_keys_in_one_line(tiny_train, home, tmp_path, capsys):
    model, data = tiny_train
    runs = tmp_path / "myruns"
    assert cli(capsys, "settings", f"runs_dir={runs}")[0] == 0
    code, out, err = cli(capsys, "tune", f"model={model}", f"data={data}", "iterations=1", "epochs=1", "imgsz=64",
                         "batch=4", "workers=0", "plots=False")
    assert code == 0, err
    best = runs / "detect" / "tune" / "best_hyperparameters.yaml"
    assert best.is_file() and f"best hyperparameters -> {best}" in out
    for bad, message in (("iterations=0", "iterations=0: expected a positive integer"),
                         ("epoch=1", "Did you mean 'epochs'")):
        code, _, err = cli(capsys, "tune", f"model={model}", f"data={data}", bad)
        assert code == 2 and message in err.splitlines()[0], err


@pytest.mark.slow
def test_an_export_format_without_its_package_is_one_line_naming_the_extra(steady, tmp_path):
    """Ultralytics would try to pip-install onnx (auto-install is off: a traceback); ems-yolo says what to install,
    and benchmark without format= skips that format with a warning."""
    pt, _ = steady
    env = {k: v for k, v in os.environ.items() if k != "YOLO_CONFIG_DIR"}
    hide = "import sys; sys.modules['onnx'] = None; from ems_yolo.cli import main; "
    r = subprocess.run([sys.executable, "-c", hide + f"sys.argv = ['ems-yolo', 'export', 'model={pt}', "
                        "'format=onnx', 'imgsz=64']; main()"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == ("ems-yolo: error: format=onnx needs onnx, expected installed: "
                                                      "pip install 'ems-yolo[export]'")
    code = (hide.replace("from ems_yolo.cli import main; ", "from ems_yolo import EMSYOLO; ") +
            f"rows = EMSYOLO('{pt}').benchmark(data='coco8.yaml', imgsz=64, project='{tmp_path}'); "
            "print([r['format'] for r in rows])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['pytorch', 'torchscript']"
    assert "benchmark: format=onnx skipped, it needs onnx (pip install 'ems-yolo[export]')" in r.stdout
