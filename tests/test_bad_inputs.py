"""Every command of the CLI against bad values and bad files: exit code 2, one line naming the key or file, no
traceback, no run folder or cache entry left behind, the input files unchanged, no payload executed."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ems_yolo.cfg import ems_home, load_model_yaml
from ems_yolo.cli import run
from shared_data import SAMPLE, SHARED_DATA

ORIGINAL = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
VIDEO = SHARED_DATA / "videos" / "esim_test_frames.avi"


class Payload:
    """Unpickling this writes `marker` (through exec): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _yaml(path: Path, d: dict | str) -> Path:
    path.write_text(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False))
    return path


def _dataset(root: Path, files: dict) -> Path:
    """A 2-class frame dataset (the same split for train and val): name -> label text; a None label makes the image
    an empty file, a label "text" makes it a text file."""
    import cv2

    for split in ("images", "labels"):
        (root / split / "train").mkdir(parents=True)
    for name, label in files.items():
        image = root / "images" / "train" / name
        if label is None:
            image.write_bytes(b"")
        elif label == "text":
            image.write_text("not an image")
        else:
            cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
            (root / "labels" / "train" / f"{Path(name).stem}.txt").write_text(label)
    return _yaml(root / "data.yaml", {"path": str(root), "train": "images/train", "val": "images/train",
                                      "names": {0: "a", 1: "b"}})


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad files (and a few good ones to combine them with), by name."""
    from ems_yolo.engine.checkpoints import write_checkpoint
    from ems_yolo.nn import EMSDetectionModel

    d = tmp_path_factory.mktemp("bad")
    tiny = load_model_yaml("ems-res10.yaml")
    tiny.update(width_multiple=0.125, time_steps=1)
    f = {"dir": d, "marker": d / "pwned.txt"}
    f["tiny_yaml"] = _yaml(d / "tiny.yaml", tiny)
    model = EMSDetectionModel(tiny, verbose=False)
    f["finished"] = write_checkpoint({"model": model, "optimizer": None, "epoch": -1,
                                      "train_args": {"epochs": 3, "task": "detect"}}, d / "finished.pt")
    f["empty_pt"] = d / "empty.pt"
    f["empty_pt"].write_bytes(b"")
    f["random_pt"] = d / "random.pt"
    f["random_pt"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["truncated_pt"] = d / "truncated.pt"
    f["truncated_pt"].write_bytes(f["finished"].read_bytes()[: f["finished"].stat().st_size // 2])
    f["malicious_pt"] = d / "malicious.pt"
    torch.save({"model": model, "epoch": -1, "extra": Payload(f["marker"])}, f["malicious_pt"])
    f["foreign_pt"] = d / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, f["foreign_pt"])
    f["bad_nc"] = _yaml(d / "bad_nc.yaml", {**tiny, "nc": "abc"})
    f["bad_t"] = _yaml(d / "bad_t.yaml", {**tiny, "time_steps": 0})
    f["unknown_module"] = _yaml(d / "unknown_module.yaml", {**tiny, "head": [[-1, 1, "Foo", [8]], *tiny["head"]]})
    f["malformed_yaml"] = _yaml(d / "malformed.yaml", "nc: [1, 2\nbackbone: {")
    f["empty_yaml"] = _yaml(d / "empty.yaml", "")
    f["channels4"] = _yaml(d / "channels4.yaml", {**tiny, "channels": 4})
    f["no_images"] = _yaml(d / "no_images.yaml", {"path": str(d / "nowhere"), "train": "images/train",
                                                  "val": "images/val", "names": {0: "a"}})
    f["empty_jpg"] = d / "empty.jpg"
    f["empty_jpg"].write_bytes(b"")
    f["text_video"] = d / "notavideo.mp4"
    f["text_video"].write_text("not a video")
    f["corrupt_h5"] = d / "corrupt.h5"
    f["corrupt_h5"].write_bytes(np.random.default_rng(1).bytes(2048))
    f["bad_label_data"] = _dataset(d / "bad_label", {"a.png": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n"})
    f["bad_class_data"] = _dataset(d / "bad_class", {"a.png": "7 0.5 0.5 0.2 0.2\n"})
    f["bad_coords_data"] = _dataset(d / "bad_coords", {"a.png": "0 50 60 20 20\n"})
    f["empty_image_data"] = _dataset(d / "empty_image", {"a.png": "0 0.5 0.5 0.2 0.2\n", "b.jpg": None})
    f["text_image_data"] = _dataset(d / "text_image", {"a.png": "0 0.5 0.5 0.2 0.2\n", "c.jpg": "text"})
    f["truncated_raw"] = d / "truncated.raw"
    f["truncated_raw"].write_bytes(b"% evt 2.0\n% geometry 16x16\n% end\n\x00\x00\x00")
    f["future_raw"] = d / "future.raw"
    f["future_raw"].write_bytes(b"% evt 4.0\n% end\n")
    f["outside_raw"] = d / "outside.raw"
    f["outside_raw"].write_bytes(b"% evt 2.0\n% geometry 16x16\n% end\n"
                                 + np.array([(0x8 << 28) | 1, (1 << 28) | (20 << 11) | 3], "<u4").tobytes())
    f["missing"] = d / "missing.pt"
    f["sample_dat"] = SAMPLE
    f["original"] = ORIGINAL
    f["video"] = VIDEO
    f["gen1_dst"] = d / "gen1-out"
    return f


CASES = [
    # info
    ("info modle=ems-res10.yaml", "'modle' is not a valid key for 'info'"),
    ("info model=missing.yaml", "model YAML 'missing.yaml' not found"),
    ("info imgsz=0", "imgsz=0: expected a positive integer"),
    ("info imgsz=-5", "imgsz=-5: expected a positive integer"),
    ("info channels=-3", "channels=-3: expected a positive integer"),
    ("info channels=0", "channels=0: expected a positive integer"),
    ("info time_steps=0", "time_steps=0: expected a positive integer"),
    ("info time_steps=abc", "time_steps='abc': expected a positive integer"),
    ("info nc=0", "nc=0: expected a positive integer"),
    ("info input=rgb", "input='rgb': expected one of frames, events"),
    ("info detailed=maybe", "detailed='maybe': expected True or False"),
    ("info model={bad_nc}", "bad_nc.yaml: nc='abc': expected a positive integer"),
    ("info model={bad_t}", "bad_t.yaml: time_steps=0: expected a positive integer"),
    ("info model={unknown_module}", "unknown module 'Foo'"),
    ("info model={malformed_yaml}", "malformed.yaml"),
    ("info model={empty_yaml}", "empty.yaml"),
    ("info notakeyvalue", "'notakeyvalue' is not a key=value pair"),
    # train
    ("train epohcs=3", "'epohcs' is not a valid key for 'train'. Did you mean 'epochs'?"),
    ("train epochs=0", "epochs=0: expected a positive integer"),
    ("train epochs=abc", "epochs='abc': expected a positive integer"),
    ("train imgsz=0", "imgsz=0: expected a positive integer"),
    ("train imgsz=-5", "imgsz=-5: expected a positive integer"),
    ("train time_steps=0", "time_steps=0: expected a positive integer"),
    ("train data=missing.yaml", "missing.yaml"),
    ("train model={tiny_yaml} data={no_images} epochs=1", "nowhere"),
    ("train model={empty_pt}", "empty.pt: empty file"),
    ("train model={truncated_pt}", "truncated.pt: not a readable PyTorch checkpoint"),
    ("train model={random_pt}", "random.pt: not a readable PyTorch checkpoint"),
    ("train model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("train model={foreign_pt}", "foreign.pt: holds no model"),
    ("train model={finished} resume=True", "finished.pt: training to 3 epochs is finished"),
    ("train model={channels4} imgsz=64 epochs=1", "channels4.yaml: channels: 4, but the data"),
    ("train energy=True", "'energy' applies to 'val' only"),
    ("train model={missing}", "missing.pt: model weights not found"),
    ("train sync_bn=maybe", "sync_bn='maybe': expected True or False"),
    ("train model={finished} sync_bn=True", "sync_bn"),
    ("train model={tiny_yaml} data={bad_label_data} imgsz=64 epochs=1", "a.txt:2: 4 fields '1 0.5 0.5 0.2'"),
    ("train model={tiny_yaml} data={bad_class_data} imgsz=64 epochs=1",
     "a.txt:1: class 7, expected an integer in 0..1"),
    ("train model={tiny_yaml} data={bad_coords_data} imgsz=64 epochs=1", "a.txt:1: coordinates 50 60 20 20 outside"),
    ("train model={tiny_yaml} data={empty_image_data} imgsz=64 epochs=1", "b.jpg: empty file, expected an image"),
    # val
    ("val model={missing}", "missing.pt: model weights not found"),
    ("val model={empty_pt}", "empty.pt: empty file"),
    ("val model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("val model={finished} time_steps=0", "time_steps=0: expected a positive integer"),
    ("val model={finished} imgsz=0", "imgsz=0: expected a positive integer"),
    ("val energy=maybe", "energy='maybe': expected True or False"),
    ("val iou=2", "iou"),
    ("val stride_ms=5", "'stride_ms' applies to 'predict' only"),
    ("val model={finished} data={no_images}", "nowhere"),
    ("val model={finished} data={text_image_data} imgsz=64", "c.jpg: not a JPG image"),
    ("val model={finished} data={bad_label_data} imgsz=64", "a.txt:2: 4 fields"),
    # predict
    ("predict model={finished}", "predict needs source="),
    ("predict model={finished} source={missing}", "missing.pt"),
    ("predict model={finished} source={sample_dat} stride_ms=0", "stride_ms=0: expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=-5", "stride_ms=-5: expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=abc", "stride_ms='abc': expected a positive number"),
    ("predict model={finished} source={sample_dat}", "records no event representation"),
    ("predict model={finished} source={corrupt_h5}", "corrupt.h5"),
    ("predict model={random_pt} source={sample_dat}", "random.pt: not a readable PyTorch checkpoint"),
    ("predict model={finished} source={video} events=maybe", "events='maybe': expected True or False"),
    ("predict model={finished} source={empty_jpg}", "empty.jpg"),
    ("predict model={finished} source={text_video}", "notavideo.mp4"),
    # export
    ("export model={finished} format=bogus", "bogus"),
    ("export model={missing}", "missing.pt: model weights not found"),
    ("export model={truncated_pt}", "truncated.pt: not a readable PyTorch checkpoint"),
    ("export model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("export model={finished} imgsz=0", "imgsz=0: expected a positive integer"),
    # energy
    ("energy max_batches=0", "max_batches=0: expected a positive integer"),
    ("energy preset=fp8", "preset='fp8': expected one of fp32, fp16, int8"),
    ("energy e_ac=-1", "e_ac=-1: expected a positive number"),
    ("energy split=dev", "split='dev': expected one of train, val, test"),
    ("energy imgsz=0", "imgsz=0: expected a positive integer"),
    ("energy model={empty_pt}", "empty.pt: empty file"),
    ("energy model={tiny_yaml} data=missing.yaml", "missing.yaml"),
    ("energy modle=x", "'modle' is not a valid key for 'energy'"),
    # convert
    ("convert", "convert needs source="),
    ("convert source={missing}", "missing.pt"),
    ("convert source={truncated_pt} out={dir}/out.pt", "truncated.pt"),
    ("convert source={finished} out={dir}/out.pt", "finished.pt: 'model' is ems_yolo.nn.model.EMSDetectionModel"),
    ("convert source={random_pt} out={dir}/out.pt", "random.pt: cannot be read as a PyTorch checkpoint"),
    ("convert source={original} out={dir}/out.pt time_steps=0", "time_steps=0: expected a positive integer"),
    ("convert source={original} out={dir}/out.pt model=ems-res34.yaml", "but ems-res34.yaml has"),
    ("convert source={original} out={dir}/out.pt model=missing.yaml", "model YAML 'missing.yaml' not found"),
    # gen1
    ("gen1 preprocess dst={gen1_dst}", "gen1 preprocess needs src="),
    ("gen1 preprocess src={dir}/nowhere dst={gen1_dst}", "nowhere"),
    ("gen1 unpack src=a dst=b", "unknown gen1 action 'unpack'"),
    ("gen1 preprocess src={dir} dst={gen1_dst} bins=0", "bins=0: expected a positive integer"),
    ("gen1 preprocess src={dir} dst={gen1_dst} representation=raw", "representation='raw': expected one of"),
    ("gen1 preprocess src={dir} dst={gen1_dst} window_ms=-1", "window_ms=-1: expected a positive number"),
    # gen4
    ("gen4 preprocess dst={gen1_dst}", "gen4 preprocess needs src="),
    ("gen4 preprocess src={dir}/nowhere dst={gen1_dst}", "gen4 folder"),
    ("gen4 preprocess src={dir} dst={gen1_dst} workers=-1", "workers=-1: expected a non-negative integer"),
    ("gen4 preprocess src={dir} dst={gen1_dst} workers=two", "workers='two': expected a non-negative integer"),
    # events
    ("events", "events needs source="),
    ("events source={missing}", "missing.pt"),
    ("events source={text_video} out={dir}/x_td.dat", "notavideo.mp4"),
    ("events source={video} out={dir}/x_td.dat c_on=0", "c_on=0: expected a positive number"),
    ("events source={video} out={dir}/x_td.dat sigma=-1", "sigma=-1: expected a non-negative number"),
    ("events source={video} out={dir}/x_td.dat max_frames=0", "max_frames=0: expected a positive integer"),
    ("events source={video} out={dir}/x_td.dat width=0", "width=0: expected a positive integer"),
    ("events source={truncated_raw} info=True", "truncated.raw: truncated final word (3 of 4 bytes)"),
    ("events source={future_raw} info=True", "future.raw: header 'evt 4.0' is not supported"),
    ("events source={outside_raw} out={dir}/o_td.dat", "outside.raw: event at x=20, y=3 is outside the 16x16"),
    ("events source={sample_dat} out={dir}/o.txt", "o.txt: cannot write events there"),
    ("events source={sample_dat} out={dir}/o.raw", "sensor size is unknown"),
    ("events source={sample_dat}", "needs out=<file.dat or file.raw> (or info=True)"),
    ("events source={video} info=True", "info=True describes an event file"),
    ("events source={sample_dat} info=maybe", "info='maybe': expected True or False"),
    ("predict model={finished} source={truncated_raw}", "truncated.raw"),
]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_harness_covers_every_command():
    from ems_yolo.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert commands == {c.split()[0] for c, _ in CASES} == {"info", "train", "val", "predict", "export", "energy",
                                                          "convert", "gen1", "gen4", "events"}
    assert len(CASES) >= 60


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2(command, message, bad, tmp_path, monkeypatch, capsys):
    if "{original}" in command and not ORIGINAL.exists() or "{sample_dat}" in command and not SAMPLE.exists():
        pytest.skip("shared data not available")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default run folders (runs/detect/...) would appear here
    inputs = _digest(bad["dir"])
    argv = command.format(**bad).split()
    code = run(argv)
    out, err = capsys.readouterr()
    first = err.strip().splitlines()[0] if err.strip() else ""
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert first.startswith("ems-yolo: error: ") and message in first, err
    assert "Traceback" not in out + err
    assert list(work.iterdir()) == []  # no run folder left behind
    assert _digest(bad["dir"]) == inputs  # inputs unchanged, nothing written beside them
    assert not bad["marker"].exists()  # no payload ran
    assert not [p for p in ems_home().rglob("*.tmp")]  # no half-written cache entry


def test_debug_switch_shows_the_traceback(bad, monkeypatch):
    monkeypatch.setenv("EMS_YOLO_DEBUG", "1")
    with pytest.raises(ValueError, match="empty file"):
        run(["val", f"model={bad['empty_pt']}"])
    monkeypatch.delenv("EMS_YOLO_DEBUG")
    with pytest.raises(ValueError, match="imgsz=0"):
        run(["info", "imgsz=0", "--debug"])


def test_malicious_checkpoint_loads_only_when_trusted(bad, tmp_path, capsys):
    """Refused by default; with trust=True the user takes the risk and the pickle runs (which shows the payload is
    real and that the refusal is what kept it from running)."""
    from ems_yolo import EMSYOLO

    with pytest.raises(ValueError, match="pass trust=True"):
        EMSYOLO(bad["malicious_pt"])
    assert not bad["marker"].exists()
    try:
        assert run(["val", f"model={bad['malicious_pt']}", "trust=True", "imgsz=64", "batch=4", "plots=False",
                    f"project={tmp_path}"]) == 0, capsys.readouterr().err
        assert bad["marker"].read_text() == "pwned"
    finally:
        bad["marker"].unlink(missing_ok=True)


def test_help_imports_neither_torch_nor_ultralytics():
    import subprocess
    import sys

    code = ("import sys; from ems_yolo.cli import run; rc = run(['--help']); "
            "print(rc, 'torch' in sys.modules, 'ultralytics' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "120"})
    assert r.stdout.strip().splitlines()[-1] == "0 False False", r.stdout + r.stderr
