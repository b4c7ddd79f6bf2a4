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


def test_settings_show_change_reset_and_runs_dir_is_honoured(home, tmp_path, capsys):
    from ems_yolo.cfg import default_project
    from ems_yolo.utils.settings import load_settings

    code, out, _ = cli(capsys, "settings")
    assert code == 0 and "runs_dir: runs" in out and str(home / "settings.yaml") in out
    runs = tmp_path / "elsewhere"
    code, out, _ = cli(capsys, "settings", f"runs_dir={runs}")
    assert code == 0 and f"runs_dir: {runs}" in out
    assert load_settings()["runs_dir"] == str(runs) and default_project() == str(runs / "detect")
    r = run("checks")  # another process reads the same file
    assert f"runs: {runs / 'detect'}" in r.stdout
    code, _, err = cli(capsys, "settings", "runs_dir_typo=x")
    assert code == 2 and "Did you mean 'runs_dir'" in err
    (home / "settings.yaml").write_text("runs_dirr: x\n")
    code, _, err = cli(capsys, "settings")
    assert code == 2 and err.count("\n") == 1 and "settings.yaml: 'runs_dirr' is not an ems-yolo setting" in err
    code, out, _ = cli(capsys, "settings", "reset")
    assert code == 0 and "runs_dir: runs" in out and load_settings()["runs_dir"] == "runs"
