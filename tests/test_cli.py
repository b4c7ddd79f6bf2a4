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
