"""tools/bench_events.py, the README's event I/O benchmark, at toy sizes: every section runs and reports rates."""

import re
import subprocess
import sys
from pathlib import Path

from shared_data import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_events.py"


def test_bench_events_reports_dat_and_raw_rates_side_by_side():
    r = subprocess.run([sys.executable, str(SCRIPT), "--events", "20000", "--seconds", "1", "--windows", "5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"decode \(full read_dat\):\s+[\d.]+ M events/s", out)
    assert re.search(r"EVT 2\.0 windowed read \(50 ms, indexed\): median [\d.]+ ms", out)
    if (SHARED_DATA / "events" / "evt3_sample.raw").exists():
        for name, n in (("evt3_sample.raw", "219,596"), ("evt2_sample.raw", "539,481")):
            line = next(x for x in out.splitlines() if x.startswith(f"real {name}"))
            assert f"{n} events" in line and "page faults/read" in line
            assert float(re.search(r"ems-yolo\s+([\d.]+) M events/s", line).group(1)) > 1.0
            if "expelliarmus not installed" not in out:
                assert re.search(r"ratio ems-yolo/expelliarmus [\d.]+", line)
