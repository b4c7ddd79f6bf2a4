"""Issue #21, part A: nothing in a checkpoint runs, and model definitions are checked when the model is built.

D1: checkpoints whose every global passes the allow-list still asked torch's `weights_only` unpickler to call
classes (a `DetectionModel(cfg)` whose `activation` is evaluated); each payload below must be refused with one line
naming the file and what it asked for, through the Python API, Ultralytics' own loader and the CLI, and write no
marker, while real checkpoints (ems-yolo's, a stock Ultralytics one, the converted originals) load as before.
"""

from __future__ import annotations

import collections
import os
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from ems_yolo.cfg import load_model_yaml
from ems_yolo.cli import run
from ems_yolo.engine.checkpoints import load_checkpoint_file, write_checkpoint
from ems_yolo.nn.model import EMSDetectionModel
from shared_data import SHARED_DATA

IMAGE = SHARED_DATA / "coco8" / "images" / "val" / "000000000036.jpg"


class Call:
    """Pickles as `func(*args)` (REDUCE), with `state` set afterwards (BUILD) when given."""

    def __init__(self, func, args=(), state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def allocated(cls: type, **state):
    """An instance that pickles as `cls.__new__(cls)` (NEWOBJ) followed by `state` (BUILD), as protocol 2 writes
    any object; its `__init__` never ran."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _evil_cfg(marker: Path) -> dict:
    """A DetectionModel YAML whose `activation` writes `marker` when Ultralytics' parser evaluates it."""
    return {"nc": 2, "activation": f"({_touch(marker)} and None) or __import__('torch').nn.SiLU()",
            "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]]],
            "head": [[[-1], 1, "Detect", ["nc"]]]}


@pytest.fixture(scope="module")
def tiny():
    d = load_model_yaml("ems-res10.yaml")
    d.update(width_multiple=0.125, time_steps=1)
    return d


@pytest.fixture(scope="module")
def evil(tmp_path_factory, tiny):
    """Malicious checkpoints by name -> (file, what the refusal names); all share one marker file."""
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.nn.distill_model import DistillationModel
    from ultralytics.nn.tasks import DetectionModel

    d = tmp_path_factory.mktemp("evil")
    marker = d / "PWNED"
    legit = EMSDetectionModel(tiny, verbose=False)
    rce = Call(DetectionModel, (_evil_cfg(marker),))
    files = {}

    def save(name: str, ckpt: dict, names: str) -> None:
        files[name] = (d / f"{name}.pt", names)
        torch.save(ckpt, files[name][0])

    save("activation", {"model": rce, "epoch": -1}, "calls ultralytics.nn.tasks.DetectionModel")
    save("autobackend", {"model": Call(AutoBackend, (str(files["activation"][0]),)), "epoch": -1},
         "calls ultralytics.nn.autobackend.AutoBackend")
    save("ems_class", {"model": Call(EMSDetectionModel, (deepcopy(tiny),)), "epoch": -1},
         "calls ems_yolo.nn.model.EMSDetectionModel")
    save("in_ema", {"model": legit, "ema": rce, "epoch": -1}, "calls ultralytics.nn.tasks.DetectionModel")
    save("in_train_args", {"model": legit, "epoch": -1, "train_args": {"epochs": 3, "hook": [rce]}},
         "calls ultralytics.nn.tasks.DetectionModel")
    save("setstate", {"model": allocated(DistillationModel, feats_idx=[0], _teacher_feats={}, _student_feats={}), "epoch": -1},
         "needs ultralytics.nn.distill_model.DistillationModel.__setstate__")
    save("build_dict", {"model": legit, "epoch": -1, "x": Call(collections.OrderedDict, (), {"a": 1})},
         "sets the state of a collections.OrderedDict")
    hooked = torch.nn.Identity()
    hooked._forward_pre_hooks[0] = DetectionModel  # a class from the file, called by every forward
    save("class_value", {"model": hooked, "epoch": -1}, "keeps ultralytics.nn.tasks.DetectionModel as a value")
    save("exec", {"model": legit, "epoch": -1, "x": Call(exec, (_touch(marker),))}, "needs builtins.exec")
    save("eval", {"model": legit, "epoch": -1, "x": Call(eval, (_touch(marker),))}, "needs builtins.eval")
    save("os_system", {"model": legit, "epoch": -1, "x": Call(os.system, (f"touch {marker}",))},
         f"needs {os.system.__module__}.system")
    files["marker"] = marker
    return files


PAYLOADS = ["activation", "autobackend", "ems_class", "in_ema", "in_train_args", "setstate", "build_dict",
            "class_value", "exec", "eval", "os_system"]


@pytest.mark.parametrize("name", PAYLOADS)
def test_d1_payloads_are_refused_without_running(evil, name):
    """The safe loader and Ultralytics' own `load_checkpoint` (routed to it) refuse, naming the file and the
    callable or class; nothing ran."""
    from ultralytics.nn.tasks import load_checkpoint

    path, names = evil[name]
    for load in (load_checkpoint_file, load_checkpoint):
        with pytest.raises(ValueError) as e:
            load(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and names in message and "\n" not in message
    assert not evil["marker"].exists()


def test_d1_payloads_were_live(evil, monkeypatch):
    """The activation payload does write the marker when its pickle is run (trust=True: a plain torch.load) and
    Ultralytics' parser evaluates `activation` (its restricted mode off): both defences are needed."""
    import ultralytics.nn.tasks

    from ems_yolo.engine import checkpoints

    path = evil["activation"][0]
    monkeypatch.setattr(checkpoints, "_TRUSTED", {path.resolve()})
    with pytest.raises(ValueError, match="unsupported activation"):  # trusted, but the activation is parsed
        load_checkpoint_file(path)
    assert not evil["marker"].exists()
    monkeypatch.setattr(ultralytics.nn.tasks, "SAFE_LOAD", False)
    try:
        assert type(load_checkpoint_file(path)["model"]).__name__ == "DetectionModel"
        assert evil["marker"].read_text() == "pwned"
    finally:
        evil["marker"].unlink(missing_ok=True)


def test_d1_api_refuses(evil):
    from ems_yolo import EMSYOLO

    for name in ("activation", "in_ema", "setstate"):
        with pytest.raises(ValueError, match="refused. If you trust this file, pass trust=True"):
            EMSYOLO(evil[name][0])
    assert not evil["marker"].exists()


@pytest.mark.parametrize("command", ["val", "predict", "export", "train", "energy", "info"])
def test_d1_cli_refuses(evil, command, capsys):
    """Every command that loads a model: exit 2 and one `ems-yolo: error:` line naming file and callable."""
    extra = {"val": ["data=coco8.yaml"], "predict": [f"source={IMAGE}"], "export": ["format=onnx"],
             "train": ["data=coco8.yaml", "epochs=1"], "energy": ["data=coco8.yaml"], "info": []}[command]
    for name in ("activation", "in_train_args"):
        path, names = evil[name]
        assert run([command, f"model={path}", "imgsz=64", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ems-yolo: error: {path}: ") and names in err[0], err
    assert not evil["marker"].exists()


def test_d1_ultralytics_parser_never_evaluates_activation(tmp_path):
    """Ultralytics' restricted mode is on: an `activation` string is parsed, not evaluated (hook 10)."""
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "PWNED"
    with pytest.raises(TypeError, match="unsupported activation"):
        DetectionModel(_evil_cfg(marker), verbose=False)
    assert not marker.exists()
    cfg = {**_evil_cfg(marker), "activation": "nn.ReLU()"}
    assert isinstance(DetectionModel(cfg, verbose=False).model[0].act, torch.nn.ReLU)


def test_d1_real_checkpoints_still_load(tmp_path, tiny):
    """ems-yolo's own checkpoint, a stock Ultralytics one saved as Ultralytics saves it (with an optimizer state and
    training arguments), and the converted original give the same outputs as the models they were saved from."""
    from ultralytics import YOLO
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    x = torch.rand(1, 3, 64, 64)
    ours = EMSDetectionModel(tiny, verbose=False)
    path = write_checkpoint({"model": ours, "epoch": -1, "train_args": {"epochs": 3}}, tmp_path / "ems.pt")
    loaded = load_checkpoint_file(path)["model"].float().eval()
    assert type(loaded) is EMSDetectionModel and loaded.yaml == ours.yaml
    assert torch.equal(loaded(x)[0], ours.half().float().eval()(x)[0])

    yolo = YOLO("yolov8n.yaml")
    yolo.save(tmp_path / "yolov8n_ul.pt")
    stock = yolo.model.half().float().eval()
    opt = torch.optim.SGD(stock.parameters(), lr=0.01, momentum=0.9)
    stock(x)[0].sum().backward()
    opt.step()
    stock.eval()
    torch.save({"epoch": 0, "model": None, "ema": deepcopy(stock).half(), "optimizer": opt.state_dict(),
                "train_args": IterableSimpleNamespace(**DEFAULT_CFG_DICT).__dict__,
                "ns": IterableSimpleNamespace(a=1)}, tmp_path / "last_ul.pt")
    for name, dict_key in (("yolov8n_ul.pt", "model"), ("last_ul.pt", "ema")):
        ckpt = load_checkpoint_file(tmp_path / name)
        model = ckpt[dict_key].float().eval()
        assert type(model).__name__ == "DetectionModel"
    assert ckpt["ns"].a == 1 and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert torch.allclose(model(x)[0], deepcopy(stock).half().float()(x)[0])
    assert YOLO(str(tmp_path / "yolov8n_ul.pt")).model.yaml["nc"] == 80  # Ultralytics' loader, routed here

    converted = load_checkpoint_file(SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt")["model"]
    assert converted.names == {0: "class0", 1: "class1"}
