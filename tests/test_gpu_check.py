"""tools/gpu_check.sh, the prepared GPU check, on its CPU dry-run path (the same code at toy sizes)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


def test_dry_run_passes_every_check_and_prints_the_summary():
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    summary = lines[lines.index(next(x for x in lines if x.startswith("gpu_check on CPU (dry run)"))):]
    rows = {line.split("  ")[0].strip(): line for line in summary[2:]}
    assert set(rows) == {"training smoke", "Triton LIF vs torch"}
    assert " ok " in rows["training smoke"] and "loss" in rows["training smoke"]
    assert " ok " in rows["Triton LIF vs torch"] or " skip " in rows["Triton LIF vs torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no CUDA device; run with --dry-run" in r.stderr
