"""tools/gpu_check.sh, the prepared GPU check, run as a user runs it: from a fresh copy of the checkout (its tracked
files, no venv, no ems_yolo/cfg link), with a Python that lacks ems-yolo, on its CPU dry-run path."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The checkout's files as a fresh clone has them (tracked and not ignored; no .venv, no cfg link)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    dst = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())
    return dst


def gpu_check(clone: Path, *args: str, python: str = sys.executable, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": python, **(env or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(clone / "tools" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=clone.parent)


def test_dry_run_from_a_fresh_clone_passes_every_check_and_prints_the_summary(clone):
    r = gpu_check(clone, "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header = next(x for x in lines if x.startswith("gpu_check on CPU (dry run)"))
    assert f"ems_yolo from {clone / '.gpu_check' / 'site' / 'ems_yolo'}" in header  # the laid-out package, with cfg
    summary = lines[lines.index(header) + 2:]
    rows = {line.split("  ")[0].strip(): line for line in summary if not line.startswith("  bench")}
    assert set(rows) == {"default LIF backend", "Triton LIF vs torch", "training smoke", "torch.compile",
                         "CUDA graph predict", "bench_speed CUDA"}
    assert " ok " in rows["training smoke"] and "loss" in rows["training smoke"]
    assert " ok " in rows["Triton LIF vs torch"] or " skip " in rows["Triton LIF vs torch"]
    assert " ok " in rows["bench_speed CUDA"]
    bench = [line for line in summary if line.startswith("  bench")]
    assert any("training img/s, COCO model 640px T=4 b16 (default)" in b and "target >= 400" in b for b in bench)
    assert any("trainer img/s" in b for b in bench)


@pytest.fixture(scope="module")
def python_without_ultralytics(tmp_path_factory) -> str:
    """A Python with torch but without Ultralytics: this one's packages less Ultralytics and ems-yolo, without site
    processing (no .pth files, no editable installs)."""
    site = Path(torch.__file__).parents[1]
    folder = tmp_path_factory.mktemp("python")
    farm = folder / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("ultralytics", "ems_yolo", "ems-yolo", "__editable__")) \
                and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{farm}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_a_python_without_ultralytics_gets_one_line_naming_it(clone, python_without_ultralytics):
    """That Python and no wheel folder: one line naming what is missing and how to fetch it, exit 2."""
    r = gpu_check(clone, "--dry-run", python=python_without_ultralytics)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "lacks ultralytics" in err[0] and "pip download --no-deps" in err[0], r.stderr


def test_what_is_missing_is_installed_from_the_wheel_folder(clone, python_without_ultralytics, tmp_path):
    """A wheel in .whl/ of what the Python lacks (a stand-in 'ultralytics' whose import fails, needing numpy, which
    the Python has) is installed into .gpu_check/site; the checks then run and report the broken import."""
    copy = tmp_path / "clone"
    shutil.copytree(clone, copy, ignore=shutil.ignore_patterns(".gpu_check"))
    (copy / ".whl").mkdir()
    with zipfile.ZipFile(copy / ".whl" / "ultralytics-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("ultralytics/__init__.py", 'raise ImportError("stand-in ultralytics")\n')
        info = "ultralytics-0.0.1.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: ultralytics\nVersion: 0.0.1\n"
                   "Requires-Dist: numpy\nRequires-Dist: polars-not-needed ; extra == 'export'\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"ultralytics/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    r = gpu_check(copy, "--dry-run", python=python_without_ultralytics)
    assert f"installing ultralytics-0.0.1-py3-none-any.whl into {copy / '.gpu_check' / 'site'}" in r.stdout, r.stderr
    assert (copy / ".gpu_check" / "site" / "ultralytics" / "__init__.py").is_file()
    assert r.returncode == 1 and "ImportError: stand-in ultralytics" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so(clone):
    r = gpu_check(clone)
    assert r.returncode == 2 and "no CUDA device; run with --dry-run" in r.stderr
