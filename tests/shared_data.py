"""Location of the real data beside the repository (`../shared/data`), read in place by the tests."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
