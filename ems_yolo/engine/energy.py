"""Energy reports through the engine: the dataset's validation images, the model's input size, files in a run folder.

`EMSYOLO.energy(...)`, `ems-yolo energy ...` and `EMSYOLO.val(energy=True)` all end here: firing rates are
measured on real data with `SpikeMonitor` hooks, and the per-layer table, `energy.csv`, `energy.json` and the
firing-rate bar chart `firing_rates.png` are written to the run folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.cfg import get_cfg
from ultralytics.data.build import build_dataloader, build_yolo_dataset
from ultralytics.utils import DEFAULT_CFG, LOGGER

from ems_yolo.data.datasets import load_data
from ems_yolo.data.splits import build_split_dataset
from ems_yolo.energy.report import EnergyReport, energy_report
from ems_yolo.utils.checks import image_hw


def energy_dataloader(data: str | None, imgsz: int, batch: int = 8, split: str = "val", workers: int = 0):
    """Square, unaugmented batches of a dataset split (images letterboxed to imgsz; event samples stretched)."""
    d = load_data(data, split=split)
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "data": d["yaml_file"], "rect": False})
    dataset = build_split_dataset(d[split], cfg, d, "val",
                                  lambda: build_yolo_dataset(cfg, d[split], batch, d, mode="val", rect=False))
    return build_dataloader(dataset, batch, workers, shuffle=False, pin_memory=False)


def save_report(report: EnergyReport, folder: str | Path) -> Path:
    """Log the per-layer table and write energy.csv, energy.json and firing_rates.png into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    LOGGER.info(report.table())
    report.to_csv(folder / "energy.csv")
    report.to_json(folder / "energy.json")
    report.plot_firing_rates(folder / "firing_rates.png")
    LOGGER.info(f"Energy report saved to {folder} (energy.csv, energy.json, firing_rates.png)")
    return folder


def run_energy(model: torch.nn.Module, loader, imgsz: int, folder: str | Path, untrained: bool = False,
               **kwargs) -> EnergyReport:
    """Measure, report and save; `kwargs` go to `energy_report` (e_ac, e_mac, preset, max_batches, device).
    `untrained` (a model built from a YAML) is stated in the report beside the ratio, which then means nothing."""
    report = replace(energy_report(model, loader, imgsz, **kwargs), untrained=untrained)
    save_report(report, folder)
    return report


def energy_after_val(model: torch.nn.Module, untrained: bool = False):
    """`on_val_end` callback: the energy report on the validator's own data loader, in its run folder."""

    def callback(validator) -> None:
        run_energy(model, validator.dataloader, max(image_hw(validator.args.imgsz)), validator.save_dir, untrained)

    return callback
