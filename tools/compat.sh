#!/usr/bin/env bash
# Run the test suite against another Ultralytics release, by default the oldest one setup.cfg allows:
#   bash tools/compat.sh [VERSION] [pytest arguments...]
# A second venv (.venv-ultralytics-VERSION) holds that release and an editable ems-yolo; everything else (torch,
# the other dependencies, pytest) comes from the project venv through a path entry, so nothing large is installed.
# Not part of CI (a second full run of the suite); run it when the seam (ems_yolo/ultralytics_compat.py) changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=8.4.135
if [[ $# -gt 0 && $1 != -* ]]; then VERSION=$1; shift; fi
make install
VENV=.venv-ultralytics-$VERSION
PY=.venv/bin/python
test -x "$VENV/bin/python" || python3 -m venv --without-pip "$VENV"
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/project-venv.pth"
$PY -m pip --python "$VENV/bin/python" install -q --no-deps "ultralytics==$VERSION"
$PY -m pip --python "$VENV/bin/python" install -q --no-deps -e .
"$VENV/bin/python" -c "import ems_yolo.ultralytics_compat, ultralytics; print('ultralytics', ultralytics.__version__, ultralytics.__file__)"
"$VENV/bin/python" -m pytest -q "$@"
