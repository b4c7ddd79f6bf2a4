#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): items 1-5 of issue 23 on one GPU in one summary table, in under
# 8 minutes.
#   bash tools/gpu_check.sh            # on a machine with a GPU
#   bash tools/gpu_check.sh --dry-run  # the same code at toy sizes on the CPU (how make test checks the script)
# Python: the project venv (.venv, made by `make install`) when it exists; else $PYTHON or python3, which needs
# torch. Then tools/gpu_check_env.py lays out the checkout's package with its cfg in .gpu_check/site (never the
# checkout's own ems_yolo/, which lacks cfg) and installs there what that Python lacks of ems-yolo's requirements
# from the wheels in $EMS_YOLO_WHEELS (default .whl/), or says in one line what is missing and how to fetch it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  exec .venv/bin/python tools/gpu_check.py "$@"
fi
PY=${PYTHON:-python3}
SITE=$PWD/.gpu_check/site
"$PY" tools/gpu_check_env.py --site "$SITE" --wheels "${EMS_YOLO_WHEELS:-.whl}" || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py "$@"
