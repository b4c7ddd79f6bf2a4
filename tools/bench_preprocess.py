"""Parallel dataset preprocessing: `preprocess_dataset` (what `ems-yolo gen1 preprocess` runs) with 1 and with N
worker processes on the same recordings, side by side in one run; the caches are checked to be identical.

The recordings are Gen1-shaped: 304x240, 0.67 M events/s (Gen1's mean rate), two boxes labelled at 4 Hz, written
as `<name>_td.dat` + `<name>_bbox.npy` into a temporary train/ folder; the representation is the paper's
(5 bins over 250 ms).

    python tools/bench_preprocess.py [--workers 2] [--recordings 6] [--seconds 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from ems_yolo.events import BBOX_DTYPE, EVENT_DTYPE, write_bbox, write_dat
from ems_yolo.events.automotive import preprocess_dataset

RATE = 670_000  # events per second


def write_recording(folder: Path, name: str, seconds: float, rng: np.random.Generator) -> None:
    """Uniform random events and two random boxes every 250 ms."""
    n = int(RATE * seconds)
    events = np.zeros(n, EVENT_DTYPE)
    events["t"] = np.sort(rng.integers(0, int(seconds * 1e6), n))
    events["x"], events["y"], events["p"] = rng.integers(0, 304, n), rng.integers(0, 240, n), rng.integers(0, 2, n)
    write_dat(folder / f"{name}_td.dat", events, 304, 240)
    times = np.arange(250_000, int(seconds * 1e6), 250_000)
    boxes = np.zeros(2 * len(times), BBOX_DTYPE)
    boxes["t"] = np.repeat(times, 2)
    boxes["x"], boxes["y"] = rng.uniform(0, 200, len(boxes)), rng.uniform(0, 150, len(boxes))
    boxes["w"], boxes["h"] = rng.uniform(20, 100, len(boxes)), rng.uniform(20, 90, len(boxes))
    boxes["class_id"], boxes["track_id"], boxes["class_confidence"] = np.tile([0, 1], len(times)), 0, 1
    boxes["track_id"] = np.tile([0, 1], len(times))
    write_bbox(folder / f"{name}_bbox.npy", boxes, version=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recordings", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "train").mkdir(parents=True)
        for i in range(args.recordings):
            write_recording(src / "train", f"rec{i:03d}", args.seconds, rng)
        for workers in (1, args.workers):
            start = time.perf_counter()
            preprocess_dataset(src, Path(tmp) / str(workers), "gen1", progress=False, workers=workers)
            seconds[workers] = time.perf_counter() - start
        with h5py.File(Path(tmp) / "1" / "train.h5") as a, h5py.File(Path(tmp) / str(args.workers) / "train.h5") as b:
            assert all(np.array_equal(a[k][:], b[k][:]) for k in ("samples", "labels", "t_us", "recording"))
            samples = len(a["t_us"])
    print(f"preprocess {args.recordings} recordings of {args.seconds:g} s ({samples} samples), caches identical:")
    for workers, s in seconds.items():
        print(f"  workers={workers}: {s:6.2f} s  ({samples / s:.1f} samples/s)")
    print(f"  speed-up workers={args.workers} / workers=1: {seconds[1] / seconds[args.workers]:.2f}x")


if __name__ == "__main__":
    main()
