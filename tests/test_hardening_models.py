"""Issue #21, part A: nothing in a checkpoint runs, and model definitions are checked when the model is built.

D1: checkpoints whose every global passes the allow-list still asked torch's `weights_only` unpickler to call
classes (a `DetectionModel(cfg)` whose `activation` is evaluated); each payload below must be refused with one line
naming the file and what it asked for, through the Python API, Ultralytics' own loader and the CLI, and write no
marker, while real checkpoints (ems-yolo's, a stock Ultralytics one, the converted originals) load as before.
D12, D15: a model definition with a bad row, `loss:` or `neuron:` value, or a size that cannot fit in memory (the
YAML's or an original checkpoint's) is one line naming the file and the row or key when the model is built, before
anything is allocated. D13: a stock Ultralytics checkpoint cannot be fine-tuned (one line saying how), but still
works with info, val and predict.
"""

from __future__ import annotations

import collections
import os
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from ems_yolo.cfg import DATASETS_DIR, load_model_yaml
from ems_yolo.cli import run
from ems_yolo.engine.checkpoints import load_checkpoint_file, write_checkpoint
from ems_yolo.nn.model import EMSDetectionModel
from shared_data import SHARED_DATA

IMAGE = DATASETS_DIR / "coco8" / "images" / "val" / "000000000036.jpg"  # the shipped COCO8, read only


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
    distill = allocated(DistillationModel, feats_idx=[0], _teacher_feats={}, _student_feats={})
    save("setstate", {"model": distill, "epoch": -1},
         "needs ultralytics.nn.distill_model.DistillationModel.__setstate__")
    save("build_dict", {"model": legit, "epoch": -1, "x": Call(collections.OrderedDict, (), {"a": 1})},
         "sets the state of a collections.OrderedDict")
    save("no_state", {"model": Call(DetectionModel, ()), "epoch": -1},
         "leaves a ultralytics.nn.tasks.DetectionModel without its state")
    save("empty_state", {"model": allocated(DetectionModel, training=False), "epoch": -1},
         "restores a ultralytics.nn.tasks.DetectionModel without its parameters, buffers and submodules")
    dunder = torch.nn.Linear(2, 2)
    dunder.weight.__dict__["__module__"] = "x"  # restored with setattr on the parameter
    save("param_dunder", {"model": dunder, "epoch": -1}, "sets special attributes of a parameter")
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
            "no_state", "empty_state", "param_dunder", "class_value", "exec", "eval", "os_system"]


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

    from ems_yolo.engine.checkpoints import convert_original

    original = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
    in_memory = load_checkpoint_file(original)["model"]
    converted = load_checkpoint_file(convert_original(original, tmp_path / "converted.pt"))["model"].float()
    assert converted.names == in_memory.names == {0: "class0", 1: "class1"}
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(),
                                                 in_memory.half().float().state_dict().values()))


# D12, D13, D15: model definitions are checked (types, values, sizes) when the model is built.

def _edited_original(path: Path, *edits: tuple[bytes, bytes]) -> Path:
    """The shared original checkpoint with byte-level edits of its pickle (each `old` must occur)."""
    import zipfile

    with zipfile.ZipFile(SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt") as zin, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                for old, new in edits:
                    assert old in data
                    data = data.replace(old, new, 1)
            zout.writestr(info.filename, data)
    return path


def _unicode(text: str) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text.encode()


def _names_as_mixed_dict(data_names: bytes) -> tuple[bytes, bytes]:
    """['class0', 'class1'] -> {0: 'a', 'x': 'b'} (the list's memo slot kept)."""
    i0, i1 = data_names.index(_unicode("class0")), data_names.index(_unicode("class1"))
    start, end = i0 - 7, i1 + len(_unicode("class1")) + 5  # ']' LONG_BINPUT '(' ... 'e'
    old = data_names[start:end + 1]
    new = b"}" + old[1:6] + b"(K\x00" + _unicode("a") + _unicode("x") + _unicode("b") + b"u"
    return old, new


def _original_pickle() -> bytes:
    import zipfile

    with zipfile.ZipFile(SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt") as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _float_after(key: str, old: float, new: float) -> tuple[bytes, bytes]:
    import struct

    head = _unicode(key)
    data = _original_pickle()
    i = data.index(head) + len(head) + 5  # LONG_BINPUT
    assert data[i:i + 9] == b"G" + struct.pack(">d", old)
    return data[i - 5 - len(head):i + 9], head + data[i - 5:i] + b"G" + struct.pack(">d", new)


ORIGINAL_EDITS = {
    "n_str": ([(b"K\x01" + _unicode("ConcatBlock_ms"), _unicode("2") + _unicode("ConcatBlock_ms"))],
              "model row 1 of the pickled YAML", "positive integer repeat count n, got '2'"),
    "names_mixed": ([_names_as_mixed_dict(_original_pickle())] if (SHARED_DATA / "checkpoints").exists() else [],
                    "names have keys [0, 'x']", "expected the integers 0..1"),
    "width_huge": ([_float_after("width_multiple", 1.0, 1e5)] if (SHARED_DATA / "checkpoints").exists() else [],
                   "width_multiple=100000.0: expected a positive number up to 16"),
}


@pytest.mark.parametrize("case", sorted(ORIGINAL_EDITS))
def test_d12_d15_bad_original_checkpoints_are_one_line(tmp_path, case, capsys):
    """convert: a pickled YAML row with n='2', names {0: 'a', 'x': 'b'}, width_multiple 1e5 (368 TB): exit 2,
    one line naming the file and what was expected; nothing written."""
    edits, *expected = ORIGINAL_EDITS[case]
    source = _edited_original(tmp_path / f"orig_{case}.pt", *edits)
    out = tmp_path / "converted.pt"
    assert run(["convert", f"source={source}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ems-yolo: error: {source}: "), err
    assert all(e in err[0] for e in expected), err
    assert not out.exists()


def _model_yaml(path: Path, tiny: dict, edit) -> Path:
    import yaml

    d = deepcopy(tiny)
    d.pop("yaml_file", None)
    edit(d)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


YAML_EDITS = {  # name: (edit of the tiny ems-res10 dict, what the one line must say)
    "stride0": (lambda d: d["backbone"][1][3].__setitem__(2, 0), ["model row 1 (EMSBlock2", "cannot run"]),
    "nn_module": (lambda d: d["backbone"].__setitem__(2, [-1, 1, "nn.Module", []]),
                  ["model row 2", "unknown module 'nn.Module'"]),
    "upsample_huge": (lambda d: d["head"][3][3].__setitem__(1, 1e9), ["model row 8 (nn.Upsample", "overflowed"]),
    "ul_detect": (lambda d: d["head"].__setitem__(-1, [[10, 6], 1, "Detect", ["nc"]]),
                  ["model row 11", "EMSDetect row", "to fine-tune, train an ems-yolo model"]),
    "loss_box": (lambda d: d.__setitem__("loss", {"box": "x"}), ["loss.box: expected a non-negative gain, got 'x'"]),
    "loss_str": (lambda d: d.__setitem__("loss", "x"), ["loss: expected a mapping"]),
    "loss_balance": (lambda d: d.__setitem__("loss", {"balance": [4.0, 1.0, 0.4]}),
                     ["loss.balance: 3 entries but the head has 2 levels"]),
    "tau_str": (lambda d: d.__setitem__("neuron", {"tau": "abc", "vth": 0.5}),
                ["neuron.tau: expected a decay factor in [0, 1], got 'abc'"]),
    "vth_negative": (lambda d: d.__setitem__("neuron", {"vth": -1}), ["neuron.vth: expected a positive threshold"]),
    "time_steps_huge": (lambda d: d.__setitem__("time_steps", 10**9),
                        ["time_steps=1000000000: expected a positive integer up to 1,024"]),
    "time_steps_width_too_big": (lambda d: d.update(time_steps=1024, width_multiple=16),  # within each bound
                                 ["time_steps: the model needs about", "GB of memory"]),
    "width_huge": (lambda d: d.__setitem__("width_multiple", 1e5),
                   ["width_multiple=100000.0: expected a positive number up to 16"]),
}


@pytest.mark.parametrize("case", sorted(YAML_EDITS))
def test_d12_d15_bad_model_yaml_is_refused_at_build(tmp_path, tiny, case, capsys):
    """`info` builds the model: a bad row, loss or neuron value, or a size that cannot fit is one line naming the
    YAML and the row or key, not a crash at train time (or an OOM kill)."""
    edit, expected = YAML_EDITS[case]
    path = _model_yaml(tmp_path / f"{case}.yaml", tiny, edit)
    assert run(["info", f"model={path}", "imgsz=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ems-yolo: error: {path}: "), err
    assert all(e in err[0] for e in expected), err
    with pytest.raises(ValueError, match=str(path)):
        EMSDetectionModel(str(path), verbose=False)


def test_errors_of_a_yaml_with_overrides_name_the_users_file(tmp_path, tiny, capsys):
    """With `time_steps=` (or nc, ann, ...) the model is built from a derived copy in $EMS_YOLO_HOME; its errors
    still name the user's YAML."""
    path = _model_yaml(tmp_path / "tau.yaml", tiny, lambda d: d.__setitem__("neuron", {"tau": "abc", "vth": 0.5}))
    for extra in ([], ["time_steps=2"], ["nc=3"]):
        assert run(["info", f"model={path}", "imgsz=64", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ems-yolo: error: {path}: neuron.tau: "), err


def test_d15_info_sizes_that_cannot_fit(tmp_path, tiny, capsys):
    """T = 1e9 (an OOM kill before) and imgsz = 99999 (a 120 GB request) are refused by the keys' bounds; sizes
    within the bounds that still cannot fit (T = 1024 at 8192 px) are refused before allocating, with the estimate
    and the key; the same model at sane sizes still reports its summary."""
    path = _model_yaml(tmp_path / "tiny.yaml", tiny, lambda d: None)
    for keys, expected in ((["time_steps=1000000000", "imgsz=64"], "time_steps=1000000000: expected a positive "
                            "integer up to 1,024"), (["imgsz=99999"], "imgsz=99999: expected")):
        assert run(["info", f"model={path}", *keys]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert run(["info", f"model={path}", "time_steps=1024", "imgsz=8192"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imgsz: the model needs about" in err[0] and "T=1024" in err[0], err
    assert "at 8192x8192" in err[0], err
    assert run(["info", f"model={path}", "imgsz=64", "time_steps=2"]) == 0


def test_dry_run_counts_what_the_real_model_has(tiny):
    """The meta-device dry run counts the real model's parameters and the real outputs of its rows."""
    from ems_yolo.nn.dry_run import dry_run

    model = EMSDetectionModel(tiny, verbose=False).eval()  # T = 1: every row's output counted once
    sizes = dry_run(model.yaml, 3, (64, 96))
    assert sizes.params == sum(p.numel() for p in model.parameters())
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in model.model]
    model.model[-1].training = True
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    numel = sum(o.numel() if isinstance(o, torch.Tensor) else sum(x.numel() for x in o) for o in outputs)
    assert sizes.step_activations == numel


def test_d13_stock_ultralytics_checkpoint_is_refused_for_training_and_still_validates(tmp_path, capsys, coco8):
    """Fine-tuning a stock Ultralytics YOLO .pt: one line naming the file, the head rows ems-yolo takes and how to
    fine-tune (no IndexError, nothing written); info, val and predict with the same file work."""
    from ultralytics import YOLO

    weights = tmp_path / "yolov8n_ul.pt"
    YOLO("yolov8n.yaml").save(weights)
    data = tmp_path / "coco8.yaml"
    names = "".join(f"  {i}: c{i}\n" for i in range(80))
    data.write_text(f"path: {coco8}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    common = ["imgsz=64", "batch=2", "workers=0", "device=cpu", f"project={tmp_path / 'runs'}", "plots=False"]
    assert run(["train", f"model={weights}", f"data={data}", "epochs=1", "name=t", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ems-yolo: error: {weights}: "), err
    assert "EMSDetect row" in err[0] and "to fine-tune, train an ems-yolo model" in err[0]
    assert not (tmp_path / "runs" / "t").exists()
    assert run(["info", f"model={weights}", "imgsz=64"]) == 0
    assert run(["val", f"model={weights}", f"data={data}", "name=v", *common]) == 0
    assert run(["predict", f"model={weights}", f"source={IMAGE}", "name=p", *common]) == 0
    assert (tmp_path / "runs" / "p" / IMAGE.name).is_file()


def test_d1_loads_after_torch_dynamo_wrapped_module_setstate(tmp_path, tiny):
    """Once torch._dynamo is used (export, compile), nn.Module.__setstate__ is its tagging wrapper: still vetted."""
    from torch._dynamo.mutation_guard import install_generation_tagging_init

    install_generation_tagging_init()
    assert "patched_setstate" in torch.nn.Module.__setstate__.__qualname__
    path = write_checkpoint({"model": EMSDetectionModel(tiny, verbose=False), "epoch": -1}, tmp_path / "a.pt")
    assert type(load_checkpoint_file(path)["model"]) is EMSDetectionModel
