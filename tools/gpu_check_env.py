"""Make a bare checkout runnable by tools/gpu_check.py with a Python that has torch (the GPU machine's own Python).

Into a folder of its own (`--site`, put first on PYTHONPATH by tools/gpu_check.sh) it lays out the checkout's package
as its wheel does (`ems_yolo` with `cfg/` as `ems_yolo.cfg`, as setup.cfg maps it), so that the checkout's own
`ems_yolo/`, which lacks `cfg`, is never what is imported; and it installs, without the network, what the Python
lacks of ems-yolo's requirements (setup.cfg) from a folder of wheels (`--wheels`), with the requirements of each
wheel it installs. What is found nowhere is named in one line (with the command that fetches it) and the exit code
is 2. The `bench-gpu` extra (SpikingJelly, the LIF comparison) is optional: missing, it is named and skipped.
Standard library only: it runs before anything is installed.

    python tools/gpu_check_env.py --site .gpu_check/site --wheels .whl
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# distributions that satisfy a requirement under another name (OpenCV's builds share the module cv2)
ALIASES = {"opencv-python": ("opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")}
# requirements the check never imports (a 46 MB wheel: it would not fit beside the others in a 64 MiB carry)
NOT_NEEDED = {"hdf5plugin": "imported only to read RVT's .h5 event files, which the check does not read"}


def norm(name: str) -> str:
    """A distribution name in its normalised form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    """The distribution name of a requirement line ('ultralytics>=8.4,<9' -> 'ultralytics')."""
    return norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1))


def setup_requirements(extra: str | None = None) -> list[str]:
    """The names in setup.cfg's install_requires, or in one of its extras."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options.extras_require"][extra] if extra else cfg["options"]["install_requires"]
    return [requirement_name(line) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def wheel_requirements(wheel: Path) -> list[str]:
    """The unconditional requirements of a wheel and those whose marker is only a Python version this one meets
    (extras and platform markers are left out)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(z.read(meta).decode())
    out = []
    for line in headers.get_all("Requires-Dist") or []:
        req, _, marker = line.partition(";")
        if "extra" in marker or (marker.strip() and not python_marker_holds(marker)):
            continue
        out.append(requirement_name(req))
    return out


def python_marker_holds(marker: str) -> bool:
    """A `python_version <op> 'X.Y'` marker evaluated for this interpreter; any other marker counts as not met."""
    m = re.fullmatch(r"\s*python_version\s*(<=|>=|==|!=|<|>)\s*['\"](\d+)\.(\d+)['\"]\s*", marker)
    if not m:
        return False
    have, want = sys.version_info[:2], (int(m.group(2)), int(m.group(3)))
    return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want, "==": have == want,
            "!=": have != want}[m.group(1)]


def present(name: str) -> bool:
    """Whether this Python (with the site folder first on its path) has distribution `name` or an alias of it."""
    for candidate in (name, *ALIASES.get(name, ())):
        try:
            importlib.metadata.distribution(candidate)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def resolve(wanted: list[str], wheels: dict[str, Path], follow: bool = True) -> tuple[list[Path], list[str]]:
    """(wheels to install, names found nowhere) for `wanted` and, with `follow`, the requirements of every wheel
    chosen."""
    chosen: dict[str, Path] = {}
    missing: list[str] = []
    queue, seen = list(wanted), set()
    while queue:
        name = queue.pop(0)
        if name in seen or name == "ems-yolo":
            continue
        seen.add(name)
        if present(name):
            continue  # installed distributions are taken as consistent with their own requirements
        if name in wheels:
            chosen[name] = wheels[name]
            queue += wheel_requirements(wheels[name]) if follow else []
        else:
            missing.append(name)
    return list(chosen.values()), missing


def lay_out_package(site: Path) -> None:
    """`site/ems_yolo`: the checkout's package with cfg/ as ems_yolo/cfg, replaced at every run."""
    target = site / "ems_yolo"
    shutil.rmtree(target, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "cfg")
    shutil.copytree(ROOT / "ems_yolo", target, ignore=ignore)
    shutil.copytree(ROOT / "cfg", target / "cfg", ignore=shutil.ignore_patterns("__pycache__"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", type=Path, required=True, help="folder of the installed packages (created)")
    p.add_argument("--wheels", type=Path, required=True, help="folder of wheels to install missing requirements from")
    args = p.parse_args()
    if importlib.util.find_spec("torch") is None:
        print(f"gpu_check: {sys.executable} has no torch; install the torch build for this machine's CUDA first, or "
              "name a Python that has it with PYTHON=...", file=sys.stderr)
        return 2
    site = args.site.resolve()
    site.mkdir(parents=True, exist_ok=True)
    lay_out_package(site)
    sys.path.insert(0, str(site))
    wheels = {norm(w.name.split("-")[0]): w for w in sorted(args.wheels.glob("*.whl"))} if args.wheels.is_dir() else {}
    needed = [name for name in setup_requirements() if name not in NOT_NEEDED or present(name) or name in wheels]
    for name in sorted(set(setup_requirements()) - set(needed)):
        print(f"gpu_check: {name} not installed, not needed here ({NOT_NEEDED[name]})")
    install, missing = resolve(needed, wheels)
    if missing:
        print(f"gpu_check: {sys.executable} lacks {', '.join(missing)} (needed by ems-yolo or its requirements) and "
              f"{args.wheels}/ has no wheel of them; fetch them where the package index is reachable: python3 -m pip "
              f"download --no-deps --only-binary=:all: -d {args.wheels} {' '.join(missing)} (add --python-version and "
              "--platform for another machine), then run this again", file=sys.stderr)
        return 2
    # the extra names all that the one import bench_speed.py makes needs (not SpikingJelly's long list)
    optional, skipped = resolve(setup_requirements("bench-gpu"), wheels, follow=False)
    if skipped:
        print(f"gpu_check: optional {', '.join(skipped)} (the bench-gpu extra) not found: bench_speed.py skips the "
              "SpikingJelly comparison")
    if install or optional:
        print(f"gpu_check: installing {', '.join(w.name for w in install + optional)} into {site}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, install + optional)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
