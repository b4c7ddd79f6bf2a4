"""`ems-yolo benchmark`: accuracy, size and speed of one model in each format ems-yolo runs (PyTorch and the
formats it exports), validated on the data the user names; offline (Ultralytics' benchmark would download its
default dataset and try twenty export formats).

Every file goes into one run folder: `weights/` holds the model as a .pt and its exports, one validation run per
format beside it, and `benchmarks.csv` the table that is also logged.
"""

from __future__ import annotations

from pathlib import Path

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.utils import LOGGER

from ems_yolo.utils.files import atomic_write_text

COLUMNS = ("format", "size_mb", "mAP50", "mAP50-95", "inference_ms", "fps")


def benchmark_formats(weights: Path, data: str, formats: tuple[str, ...], folder: Path, imgsz: int,
                      device: str | None, data_name: str) -> list[dict]:
    """Export `weights` (an ems-yolo .pt in `folder`/weights) to each format and validate each file on `data` (the
    resolved YAML of what the user named `data_name`) with batch 1; returns one row per format (COLUMNS) and writes
    them to `folder`/benchmarks.csv."""
    from ems_yolo.engine.model import EMSYOLO

    rows = []
    for fmt in formats:
        path = weights if fmt == "pytorch" else Path(EMSYOLO(weights).export(format=fmt, imgsz=imgsz, device=device))
        metrics = EMSYOLO(path).val(data=data, imgsz=imgsz, batch=1, device=device, project=str(folder), name=fmt,
                                    plots=False, verbose=False)
        ms = metrics.speed["inference"]
        rows.append({"format": fmt, "size_mb": round(path.stat().st_size / 1e6, 2),
                     "mAP50": round(float(metrics.box.map50), 4), "mAP50-95": round(float(metrics.box.map), 4),
                     "inference_ms": round(ms, 2), "fps": round(1000 / ms, 1) if ms else None})
    table = [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    atomic_write_text(folder / "benchmarks.csv", "\n".join(table) + "\n")
    LOGGER.info(f"\nBenchmarks of {weights.name} on {data_name} at imgsz={imgsz} (batch 1):\n"
                + "\n".join("".join(f"{v:>14}" for v in line.split(",")) for line in table)
                + f"\nResults saved to {folder / 'benchmarks.csv'}")
    return rows

