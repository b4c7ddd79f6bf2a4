"""Event I/O and representation speed: `.dat` decode rate, windowed-read latency, representation throughput.

A synthetic recording with a Gen1-like event rate (default 20 M events over 30 s, about 0.67 M events/s as in
Gen1) is written to a temporary `.dat`, then:
  - decode rate: full `read_dat` of the file (events/s);
  - windowed reads: `read_dat(path, t, t + 50 ms)` at random times (median latency; binary search on time);
  - representations: EMS frames / histogram / voxel of the 250 ms window before random label times (frames/s).
The real Prophesee sample of ../shared/data is decoded too when present, and the real `.raw` recordings
(EVT 3.0, EVT 2.0) side by side with the `expelliarmus` C reader when it is installed (a benchmark-only extra:
`pip install expelliarmus`; runs interleaved, best of 100, with the page faults each read took: fresh pages are
what a numpy decoder pays for beyond its passes, and they vary with the allocator's state), plus a written EVT 2.0
copy of the synthetic file for decode rate and windowed reads.

    python tools/bench_events.py [--events 20000000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ems_yolo.events import EVENT_DTYPE, EventRepresentation, read_dat, write_dat
from ems_yolo.events.raw import RawReader, read_raw, write_raw_evt2

EVENTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "events"
SAMPLE = EVENTS_DIR / "sample_ncars.dat"
RAW_REPEATS = 100
RAW_SAMPLES = {"evt3": EVENTS_DIR / "evt3_sample.raw", "evt2": EVENTS_DIR / "evt2_sample.raw"}


def synthetic_events(n: int, seconds: float, seed: int = 0) -> np.ndarray:
    """n uniformly placed events with sorted timestamps over `seconds`, on a 304 x 240 sensor."""
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, int(seconds * 1e6), n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 304, n), rng.integers(0, 240, n), rng.integers(0, 2, n)
    return ev


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000_000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--windows", type=int, default=200)
    args = p.parse_args()

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_td.dat"
        write_dat(path, synthetic_events(args.events, args.seconds))
        size_mb = path.stat().st_size / 1e6
        full = min(timed(lambda: read_dat(path), 3))
        print(f"file: {args.events:,} events over {args.seconds:.0f} s ({size_mb:.0f} MB)")
        print(f"decode (full read_dat):       {args.events / full / 1e6:8.1f} M events/s  ({full:.2f} s)")

        t_max = int(args.seconds * 1e6)
        starts = rng.integers(0, t_max - 50_000, args.windows)
        lat = [timed(lambda s=s: read_dat(path, int(s), int(s) + 50_000), 1)[0] for s in starts]
        n_win = args.events * 0.05 / args.seconds
        print(f"windowed read (50 ms, ~{n_win:,.0f} events): median {statistics.median(lat) * 1e3:.2f} ms, "
              f"p95 {np.percentile(lat, 95) * 1e3:.2f} ms")

        ends = rng.integers(250_000, t_max, 20)
        windows = [read_dat(path, int(e) - 250_000, int(e)) for e in ends]
        print(f"representations (250 ms window, ~{np.mean([len(w) for w in windows]):,.0f} events, 240x304):")
        for name in ("ems_frames", "histogram", "voxel"):
            rep = EventRepresentation(name=name, bins=5)
            sec = min(timed(lambda: [rep(w, int(e)) for w, e in zip(windows, ends)], 3))
            print(f"  {name:<11} T=5: {len(windows) / sec:8.1f} samples/s  ({sec / len(windows) * 1e3:.1f} ms each)")

        raw = write_raw_evt2(Path(tmp) / "bench.raw", read_dat(path), 304, 240)
        sec = min(timed(lambda: read_raw(raw), 3))
        print(f"EVT 2.0 .raw copy ({raw.stat().st_size / 1e6:.0f} MB): decode {args.events / sec / 1e6:.1f} M events/s")
        reader = RawReader(raw)
        reader.read(0, 1)  # builds the sparse index once
        lat = [timed(lambda s=s: reader.read(int(s), int(s) + 50_000), 1)[0] for s in starts[:50]]
        print(f"EVT 2.0 windowed read (50 ms, indexed): median {statistics.median(lat) * 1e3:.2f} ms, "
              f"p95 {np.percentile(lat, 95) * 1e3:.2f} ms")

    raw_side_by_side()
    if SAMPLE.is_file():
        n = len(read_dat(SAMPLE))
        sec = statistics.median(timed(lambda: read_dat(SAMPLE), 50))
        print(f"real sample {SAMPLE.name}: {n:,} events decoded in {sec * 1e3:.2f} ms ({n / sec / 1e6:.1f} M events/s)")


def raw_side_by_side() -> None:
    """Decode rate of the real .raw recordings: ems-yolo (numpy) and expelliarmus (C), same files, same run."""
    try:
        from expelliarmus import Wizard
    except ImportError:
        Wizard = None
        print("expelliarmus not installed (pip install expelliarmus): ems-yolo's .raw rates only")
    for enc, path in RAW_SAMPLES.items():
        if not path.is_file():
            continue
        n = len(read_raw(path))
        readers = {"ems-yolo": lambda p=path: read_raw(p)}
        if Wizard is not None:
            readers["expelliarmus"] = Wizard(encoding=enc, fpath=str(path)).read
        best, faults = {k: float("inf") for k in readers}, dict.fromkeys(readers, 0)
        for _ in range(RAW_REPEATS):  # interleaved, so both see the same machine state
            for name, read in readers.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                read()
                best[name] = min(best[name], time.perf_counter() - t)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        rates = ", ".join(f"{k} {n / v / 1e6:6.1f} M events/s ({faults[k] / RAW_REPEATS:,.0f} page faults/read)"
                          for k, v in best.items())
        line = f"real {path.name} ({enc}, {n:,} events): {rates}"
        if Wizard is not None:
            line += f", ratio ems-yolo/expelliarmus {best['expelliarmus'] / best['ems-yolo']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
