"""The `ems-yolo` console script, run as a user would."""

import os
import subprocess
import sys
from pathlib import Path

EXE = Path(sys.executable).parent / "ems-yolo"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    assert "info" in r.stdout


def test_help_version_and_the_bare_command_exit_0():
    """`ems-yolo`, `ems-yolo help`, `-h` and `--help` print the commands; `version` and `--version` the version."""
    from ems_yolo import __version__

    for args in ((), ("help",), ("-h",), ("--help",)):
        r = run(*args)
        assert r.returncode == 0 and "Commands" in r.stdout and "predict" in r.stdout, (args, r.stdout, r.stderr)
    for args in (("version",), ("--version",)):
        r = run(*args)
        assert r.returncode == 0 and r.stdout.strip() == f"ems-yolo {__version__}", (args, r.stdout, r.stderr)
    r = run("predict", "-h")
    assert r.returncode == 0 and "source" in r.stdout
    r = run("info", "--help")  # help texts are plain text: brackets stay
    assert r.returncode == 0 and "int or [h, w] (default 640)" in r.stdout
    helps = {m: run(m, "--help").stdout for m in ("train", "val", "predict", "export")}  # each lists its own keys
    for mode, keys in (("train", ("checkpoint:", "sync_bn:")), ("val", ("energy:",)), ("predict", ("stride_ms:",))):
        assert all((k in helps[m]) == (m == mode) for k in keys for m in helps), (mode, keys)
    r = run("val", "checkpoint=True")
    assert r.returncode == 2 and "'checkpoint' applies to 'train' only" in r.stderr


def test_info_prints_table_and_summary():
    r = run("info", "model=ems-res10.yaml", "nc=2", "imgsz=320", "time_steps=4")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "EMSBlock2" in out and "EMSDetect" in out
    summary = [line for line in out.splitlines() if "summary:" in line][-1]
    assert "6,207,050 parameters" in summary
    assert "2.9 GFLOPs per time step, 11.7 GFLOPs total (T=4, 320x320)" in summary


def test_info_errors_are_one_clear_line():
    r = run("info", "modle=ems-res10.yaml")
    assert r.returncode == 2 and "Did you mean 'model'" in r.stderr
    r = run("info", "model=missing.yaml")
    assert r.returncode == 2
    assert "ems-yolo: error: model YAML 'missing.yaml' not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_values_and_files_are_one_line_from_the_console_script(tmp_path):
    """Issue 21 through the installed script: a refused export format, a dataset YAML whose nc and names disagree
    and a file named .onnx that is not one each give exit code 2 and one line naming the key or the user's file."""
    import cv2
    import numpy as np
    import yaml

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.full((32, 32, 3), 127, np.uint8))
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "nc": 3,
                                    "names": ["a", "b"]}))
    fake = tmp_path / "model.onnx"
    fake.write_text("not a model\n")
    for args, first in (
        (["export", "format=tflite"], "ems-yolo: error: format='tflite': expected one of onnx, torchscript"),
        (["val", f"data={data}", "imgsz=64"], f"ems-yolo: error: {data}: 'nc: 3' but 'names' has 2 classes"),
        (["predict", f"model={fake}", f"source={root / 'images'}"], f"ems-yolo: error: {fake}: not an ONNX model"),
    ):
        r = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=os.environ.copy())
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.splitlines()[0].startswith(first) and len(r.stderr.splitlines()) == 1, r.stderr
        assert sorted(tmp_path.iterdir()) == sorted([root, fake])  # no run folder
