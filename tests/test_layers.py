"""The package's layers point one way, Ultralytics is only reached through its seam, and `import ems_yolo` is inert."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import ems_yolo
import ems_yolo.cfg

PACKAGE = Path(ems_yolo.__file__).parent
CFG_INIT = Path(ems_yolo.cfg.__file__)

# Lower rank = lower layer. A module may import its own layer (same rank, same name) or any lower rank.
LAYERS = {
    "ems_yolo.utils": 0,
    "ems_yolo.cfg": 1,
    "ems_yolo.ultralytics_compat": 2,
    "ems_yolo.events": 2,
    "ems_yolo.nn": 3,
    "ems_yolo.energy": 4,
    "ems_yolo.data": 4,
    "ems_yolo.engine": 5,
    "ems_yolo.cli": 6,
    "ems_yolo": 6,  # the package's __init__ (lazy re-exports)
    "ems_yolo.__main__": 7,  # `python -m ems_yolo`: the CLI
}


def _layer(module: str) -> str:
    """The LAYERS key a module belongs to (its longest matching prefix)."""
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)


def _modules() -> dict[str, Path]:
    found = {"ems_yolo.cfg": CFG_INIT}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found[name] = path
    return found


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) of every ems_yolo / ultralytics import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "ems_yolo"]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("ems_yolo", "ultralytics"):
                out.append((node.lineno, name, id(node) in top))
    return out


def test_no_import_points_up_the_layers():
    modules = _modules()
    assert {"ems_yolo.engine.predictor", "ems_yolo.data.events", "ems_yolo.energy.report"} <= set(modules)
    bad = []
    for name, path in modules.items():
        own = _layer(name)
        for line, imported, _ in _imports(path):
            if not imported.startswith("ems_yolo") or imported == "ems_yolo" or imported not in modules and \
                    imported.rsplit(".", 1)[0] not in modules:
                continue
            target = _layer(imported)
            if target == "ems_yolo":  # `from ems_yolo import x` names a submodule x
                continue
            same_rank_other = LAYERS[target] == LAYERS[own] and target != own
            if LAYERS[target] > LAYERS[own] or same_rank_other:
                bad.append(f"{path.name}:{line} ({own}) imports {imported} ({target})")
    assert bad == []


def test_events_is_a_pure_library():
    for name, path in _modules().items():
        if _layer(name) == "ems_yolo.events":
            imported = [m for _, m, _ in _imports(path)]
            allowed = ("ems_yolo.events", "ems_yolo.utils", "ems_yolo.cfg")
            assert all(m.startswith(allowed) for m in imported), (name, imported)


def test_ultralytics_only_after_the_seam():
    """Every module that imports Ultralytics imports ems_yolo.ultralytics_compat (the offline set-up) first (at
    module level, or in the function that defers both imports)."""
    for name, path in _modules().items():
        if name == "ems_yolo.ultralytics_compat":
            continue
        imports = _imports(path)
        first_ul = min((line for line, m, _ in imports if m.startswith("ultralytics")), default=None)
        if first_ul is None:
            continue
        compat = [line for line, m, _ in imports if "ultralytics_compat" in m]
        assert compat and min(compat) < first_ul, f"{name}: imports ultralytics before ems_yolo.ultralytics_compat"


def test_import_ems_yolo_is_inert_and_first_use_is_offline(tmp_path):
    """`import ems_yolo` loads neither torch nor Ultralytics nor changes the environment; the first module that
    uses Ultralytics sets the offline switches before Ultralytics can probe the network."""
    code = (
        "import os, socket, sys\n"
        "calls = []\n"
        "def refuse(*a, **k):\n    calls.append(a[:1]); raise OSError('no network')\n"
        "socket.getaddrinfo = refuse; socket.create_connection = refuse\n"
        "import ems_yolo\n"
        "assert 'ultralytics' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "assert 'YOLO_OFFLINE' not in os.environ\n"
        "from ems_yolo import EMSYOLO\n"
        "assert os.environ['YOLO_OFFLINE'] == 'true' and os.environ['YOLO_AUTOINSTALL'] == 'False'\n"
        "import ultralytics.utils; assert ultralytics.utils.ONLINE is False\n"
        "assert calls == [], calls\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["EMS_YOLO_HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert (tmp_path / "ultralytics" / "Ultralytics" / "Arial.ttf").is_file()
