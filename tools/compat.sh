#!/usr/bin/env bash
# Run the test suite against another release of a dependency, by default the oldest one setup.cfg allows:
#   bash tools/compat.sh [VERSION] [pytest arguments...]            Ultralytics VERSION (default 8.4.135)
#   bash tools/compat.sh --torch [VERSION] [pytest arguments...]    torch VERSION (default 2.6.0) and its torchvision;
#                                                                   runs tests/test_compile.py unless tests are named
# A second venv (.venv-ultralytics-VERSION / .venv-torch-VERSION) holds that release and an editable ems-yolo;
# everything else (the other dependencies, pytest) comes from the project venv through a path entry, so only the
# release itself (and, for torch, the CUDA libraries of its wheel) is installed. Not part of CI; run it when the
# seam (ems_yolo/ultralytics_compat.py) or the custom ops (ems_yolo/nn/ops) change. PROJECT_PY names another
# project venv's python (default .venv/bin/python, made by `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=ultralytics
VERSION=8.4.135
if [[ ${1:-} == --torch ]]; then PACKAGE=torch; VERSION=2.6.0; shift; fi
if [[ $# -gt 0 && $1 != -* && $1 != tests* ]]; then VERSION=$1; shift; fi
PY=${PROJECT_PY:-.venv/bin/python}
[[ -n ${PROJECT_PY:-} ]] || make install
VENV=.venv-$PACKAGE-$VERSION
test -x "$VENV/bin/python" || python3 -m venv --without-pip "$VENV"
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/project-venv.pth"
if [[ $PACKAGE == torch ]]; then
    # torchvision as pip resolves it for this torch (torch 2.15.0 came out before a torchvision of its own: 0.29.2,
    # which asks for torch>=2.14); the machine's cap on torch (a pip constraints file) is lifted for this venv only
    PIP_CONSTRAINT=/dev/null $PY -m pip --python "$VENV/bin/python" install -q "torch==$VERSION" torchvision
    [[ $# -gt 0 && $1 != -* ]] || set -- tests/test_compile.py "$@"
else
    $PY -m pip --python "$VENV/bin/python" install -q --no-deps "ultralytics==$VERSION"
fi
$PY -m pip --python "$VENV/bin/python" install -q --no-deps -e .
"$VENV/bin/python" -c "import ems_yolo.ultralytics_compat, torch, ultralytics
print('torch', torch.__version__, torch.__file__); print('ultralytics', ultralytics.__version__, ultralytics.__file__)"
"$VENV/bin/python" -m pytest -q "$@"
