"""A wheel built from the repository works from a folder outside it: configs travel inside the package, and every
package of the source tree is in it."""

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def setup_cfg_packages() -> tuple[set[str], dict[str, str]]:
    """setup.cfg's `packages` and `package_dir` (package -> folder, relative to the repository)."""
    options = configparser.ConfigParser()
    options.read(REPO / "setup.cfg")
    packages = set(options["options"]["packages"].split())
    mapping = (line.split("=") for line in options["options"].get("package_dir", "").splitlines() if "=" in line)
    return packages, {name.strip(): folder.strip() for name, folder in mapping}


def source_packages(packages_dir: dict[str, str]) -> set[str]:
    """Every folder holding an __init__.py under ems_yolo/ and under the folders that package_dir maps, as a dotted
    package name (links are not followed: ems_yolo/cfg in a checkout is a link to cfg/)."""
    roots = {"ems_yolo": REPO / "ems_yolo", **{name: REPO / folder for name, folder in packages_dir.items()}}
    found = set()
    for name, root in roots.items():
        for folder, _, files in os.walk(root):
            if "__init__.py" in files:
                found.add(".".join([name, *Path(folder).relative_to(root).parts]))
    return found


def test_every_package_of_the_source_tree_is_listed_in_setup_cfg():
    """A package missing from setup.cfg is missing from the wheel (ems_yolo.nn.ops.lif once was: ImportError from an
    installed wheel only); a listed package that does not exist fails the build."""
    packages, package_dir = setup_cfg_packages()
    assert {"ems_yolo", "ems_yolo.cfg", "ems_yolo.nn.ops.lif"} <= source_packages(package_dir)
    assert source_packages(package_dir) == packages


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_info_train_predict_val_coco8_outside_the_repo(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-q", "-w", tmp_path / "dist"], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ems_yolo-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    # Dependencies (torch, ultralytics, ...) from this venv's site-packages; its ems_yolo (an editable install whose
    # finder is activated by a .pth file there, which a plain path entry does not process) stays invisible.
    deps = [p for p in sys.path if p.endswith("site-packages")]  # every site dir of this interpreter
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "EMS_YOLO_HOME": str(tmp_path / "home")}
    code = "import ems_yolo.cfg as c, ems_yolo as e; print(e.__file__); print(c.MODELS_DIR)"
    where = run([python, "-c", code], work, env)
    assert all(line.startswith(str(site)) for line in where.split()), where
    exe = venv / "bin" / "ems-yolo"
    out = run([exe, "info", "model=ems-res10.yaml", "nc=2", "imgsz=320"], work, env)
    assert "6,207,050 parameters" in out
    run([exe, "train", "epochs=1", "imgsz=64", "workers=0", "plots=False"], work, env)
    best = work / "runs" / "detect" / "train" / "weights" / "best.pt"
    assert best.is_file()
    image = next((tmp_path / "home" / "datasets").rglob("images/val/*.png"))
    run([exe, "predict", f"model={best}", f"source={image}", "imgsz=64"], work, env)
    assert (work / "runs" / "detect" / "predict" / f"{image.stem}.jpg").is_file()

    # COCO8 ships inside the wheel: val on it from another empty folder (read from a copy in the home)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run([exe, "val", f"model={best}", "data=coco8.yaml", "imgsz=64", "batch=4", "workers=0", "plots=False"],
              empty, env)
    assert re.search(r"\ball\s+4\s+\d+\s", out), out  # the 4 val images scored
    assert (empty / "runs" / "detect" / "val").is_dir()
    assert (tmp_path / "home" / "datasets" / "coco8" / "labels" / "val.cache").is_file()  # caches in the home
    assert not list(site.rglob("*.cache"))  # nothing written into the installed package
