"""Location of the real data beside the repository (`../shared/data`), read in place by the tests."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SAMPLE = SHARED_DATA / "events" / "sample_ncars.dat"  # the real Prophesee recording (N-CARS)
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason="shared N-CARS sample not available")
