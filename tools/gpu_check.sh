#!/usr/bin/env bash
# The prepared GPU check: CUDA training smoke with AMP and channels_last, the Triton LIF against the torch LIF,
# tools/bench_speed.py on CUDA, one summary table (tools/gpu_check.py; under 8 minutes on one recent NVIDIA GPU).
#   bash tools/gpu_check.sh            # on a machine with a GPU
#   bash tools/gpu_check.sh --dry-run  # the same code at toy sizes on the CPU (how CI tests the script)
# Installs nothing beyond the project: the project venv when it exists, else the interpreter's own torch with
# ems-yolo added without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
  "$PY" -c "import ems_yolo" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
fi
exec "$PY" tools/gpu_check.py "$@"
