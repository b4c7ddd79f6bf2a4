"""First runs that finish (issue 22 item 1) and hints that run as printed (item 6).

The generated datasets train at their own size for a few CPU minutes unless imgsz=/epochs= are set; a run
estimated longer than LONG_RUN_MIN is a WARNING naming a command that ends in minutes. Every command the tool
prints is run here as printed through the CLI: train commands up to the start of their first epoch (data, model,
set-up and the CPU estimate done, stopped there by a callback), every other one to the end.
"""

import logging
import re
import shlex

import pytest
import yaml
from ultralytics.utils.callbacks import base as ul_callbacks

from ems_yolo import EMSYOLO
from ems_yolo.cfg import BUILTIN_TRAIN_DEFAULTS, LONG_RUN_MIN, QUICK_RUN_MIN, builtin_train_defaults
from ems_yolo.cli import run
from ems_yolo.data.events import EventDetectionDataset
from ems_yolo.engine.trainer import long_run_warning, quick_run, train_command
from ems_yolo.events.synthetic import make_synthetic_gen1


class Stopped(Exception):
    """Raised by the test callback when a training run reaches its first epoch."""


@pytest.fixture
def log():
    """The messages Ultralytics' logger emits during the test, with their levels."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def started(monkeypatch):
    """Training runs stop when their first epoch starts; the list collects each run's trainer arguments."""
    seen = []

    def stop(trainer):
        seen.append(trainer.args)
        raise Stopped

    monkeypatch.setitem(ul_callbacks.default_callbacks, "on_train_epoch_start",
                        [*ul_callbacks.default_callbacks["on_train_epoch_start"], stop])
    return seen


def run_printed(line: str, started: list | None = None):
    """Run a printed `ems-yolo ...` line through the CLI: its exit code, or for a train command the arguments of
    the run it started."""
    argv = shlex.split(line)
    assert argv[0] == "ems-yolo", line
    if argv[1] != "train" or "--help" in argv:
        return run(argv[1:])
    with pytest.raises(Stopped):
        run(argv[1:])
    return started[-1]


def test_generated_datasets_default_to_their_size_and_a_short_run():
    assert builtin_train_defaults(None) == {"imgsz": 160, "epochs": 10} == BUILTIN_TRAIN_DEFAULTS["shapes"]
    assert builtin_train_defaults("gen1-synthetic.yaml") == {"imgsz": 320, "epochs": 8}  # 304x240 sensor
    assert builtin_train_defaults("gen4-synthetic") == {"imgsz": 640, "epochs": 10}  # 640x360 caches
    assert builtin_train_defaults("shapes", {"imgsz"}) == {"epochs": 10}
    assert builtin_train_defaults("coco8.yaml") == {} and builtin_train_defaults("my/shapes.yaml") == {}


def test_bare_train_resolves_the_builtin_size_and_epochs_and_user_values_win(tiny_yaml_file, started, tmp_path):
    model = tiny_yaml_file()
    args = run_printed(f"ems-yolo train model={model}", started)
    assert (args.imgsz, args.epochs) == (160, 10)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"epochs": 3}))
    with pytest.raises(Stopped):
        EMSYOLO(model).train(cfg=str(cfg), data="shapes", imgsz=96)
    assert (started[-1].imgsz, started[-1].epochs) == (96, 3)


def test_long_run_warning_names_a_command_that_ends_in_minutes():
    # 0.125 s per image at 160 px: 32 s an epoch of 256 images, so 18 epochs in 10 minutes
    text = long_run_warning(2.0, (640, 640), 256, 100, {"model": "ems-res10.yaml", "imgsz": 640})
    assert text.startswith("CPU training: an epoch of 256 images at 640x640 takes about 8.5 min, 100 epochs about")
    assert text.endswith(f"ends in about {QUICK_RUN_MIN:.0f} min: ems-yolo train imgsz=160 epochs=18 "
                         "(or train on a GPU: device=0)")
    coco = {"model": "ems-res34.yaml", "data": "coco.yaml", "time_steps": 4, "epochs": 150, "imgsz": 640}
    assert quick_run(1.0, (640, 640), 118_287, 150, "coco.yaml") == {"imgsz": 320, "epochs": 1, "fraction": 0.02}
    assert train_command({**coco, **quick_run(1.0, (640, 640), 118_287, 150, "coco.yaml")}) == (
        "ems-yolo train model=ems-res34.yaml data=coco.yaml time_steps=4 epochs=1 imgsz=320 fraction=0.02")
    assert long_run_warning(0.1, (160, 160), 256, 10, {}) == ""  # 4.3 min
    assert LONG_RUN_MIN > QUICK_RUN_MIN


def test_a_long_run_warns_and_its_command_runs(tiny_yaml_file, started, log):
    model = tiny_yaml_file()
    run_printed(f"ems-yolo train model={model} imgsz=64 epochs=100000 fraction=0.05", started)
    warnings = [r.getMessage() for r in log if r.levelno == logging.WARNING and "CPU training" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in log]
    command = re.search(r"ends in about \d+ min: (ems-yolo train .*) \(or train on a GPU", warnings[0]).group(1)
    assert command.startswith(f"ems-yolo train model={model} imgsz=64 epochs=")
    args = run_printed(command, started)
    assert f"epochs={args.epochs}" in command and args.epochs < 100000 and args.fraction == 0.05


@pytest.fixture
def trained(tiny_yaml_file, tmp_path):
    """A finished one-epoch run on a few built-in images."""
    model = EMSYOLO(tiny_yaml_file(), time_steps=1)
    model.train(epochs=1, imgsz=64, fraction=0.05, batch=4, project=str(tmp_path / "runs"), name="t", plots=False)
    return tmp_path / "runs" / "t" / "weights" / "best.pt"


def test_export_and_finished_run_hints_run_as_printed(trained, started, log, capsys):
    EMSYOLO(trained).export(format="onnx", imgsz=64)
    text = "\n".join(r.getMessage() for r in log)
    hints = re.findall(r"^(?:Predict|Validate):\s+(ems-yolo .*?)\s*$", text, re.M)
    assert [h.split()[1] for h in hints] == ["predict", "val"] and "source=" in hints[0]
    for hint in hints:
        assert run_printed(hint) == 0, hint

    assert run(["train", f"model={trained}", "resume=True"]) == 2  # finished: the error names what to run instead
    hint = re.search(r"to train further from these weights: (ems-yolo train .*?)\)", capsys.readouterr().err)
    args = run_printed(hint.group(1), started)
    assert args.model == str(trained)


def test_usage_and_preprocess_hints_run_as_printed(tmp_path, started, capsys):
    assert run(["train", "epochs"]) == 2
    hint = re.search(r"see '(ems-yolo train --help)'", capsys.readouterr().err).group(1)
    assert run_printed(hint) == 0 and "Train a spiking detector" in capsys.readouterr().out

    src = make_synthetic_gen1(tmp_path / "rec", n_train=1, n_val=1, n_test=1, duration_s=1.0)
    assert run(["gen1", "preprocess", f"src={src}", f"dst={tmp_path / 'c'}", "bins=2", "splits=[train,val]"]) == 0
    hint = re.search(r"train with: (ems-yolo train .*)", capsys.readouterr().out).group(1)
    args = run_printed(hint, started)
    assert args.data.endswith(".yaml") and args.epochs == 100  # not generated data: Ultralytics' defaults
    full = len(EventDetectionDataset(tmp_path / "c" / "train.h5", 64))  # fraction= (the long-run hint's) on events
    assert len(EventDetectionDataset(tmp_path / "c" / "train.h5", 64, fraction=0.5)) == max(1, round(full / 2)) < full
    assert run(["gen1", "preprocess", f"src={src}", f"dst={tmp_path / 'v'}", "splits=[val]"]) == 0
    assert "train with" not in capsys.readouterr().out  # no train split: no train command
