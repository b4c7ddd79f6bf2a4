"""ems-yolo checkpoint files: Ultralytics' checkpoint dict, written atomically, and original EMS-YOLO files as such.

A converted original checkpoint is an ordinary ems-yolo checkpoint (the model pickled as `EMSDetectionModel`, FP16
like Ultralytics' own, `epoch: -1` as a finished run) with a `converted_from` record of where it came from.
"""

from __future__ import annotations

from copy import deepcopy
from datetime import datetime
from pathlib import Path

import torch

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics import __version__ as ultralytics_version
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.original import ORIGINAL_TIME_STEPS, OriginalCheckpoint, load_original
from ems_yolo.utils.files import atomic_write

ORIGINAL_FORMAT = "EMS-YOLO original (BICLab/EMS-YOLO train.py, pickled models.yolo.Model)"


def write_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write a checkpoint dict atomically, its model as an FP16 copy (the in-memory model is left as it is)."""
    ckpt = dict(ckpt)
    if isinstance(ckpt.get("model"), torch.nn.Module):
        ckpt["model"] = deepcopy(ckpt["model"]).half()
    ckpt.update(date=datetime.now().astimezone().isoformat(), version=ultralytics_version)
    return atomic_write(path, lambda f: torch.save(ckpt, f))


def converted_checkpoint(model: EMSDetectionModel, orig: OriginalCheckpoint) -> dict:
    """The ems-yolo checkpoint dict of a converted original model (a finished run: nothing to resume)."""
    return {
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"task": "detect"},
        "train_metrics": None,
        "train_results": None,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "converted_from": {
            "file": str(orig.path),
            "format": ORIGINAL_FORMAT,
            "weights": orig.source,
            "epoch": orig.epoch,
            "date": orig.date,
            "time_steps": model.time_steps,
        },
    }


def load_converted(
    path: str | Path, time_steps: int | None = None, model_yaml: str | Path | None = None
) -> tuple[EMSDetectionModel, dict]:
    """An original checkpoint as Ultralytics' `load_checkpoint` returns a native one: (model in eval mode with
    `args`, `pt_path` and `task` attached, checkpoint dict)."""
    base = load_model_yaml(model_yaml) if model_yaml else None
    model, orig = load_original(path, int(time_steps or ORIGINAL_TIME_STEPS), base)
    model.args = {**DEFAULT_CFG_DICT, "task": "detect"}
    model.pt_path, model.task = str(path), "detect"
    LOGGER.info(conversion_summary(model, orig, time_steps))
    return model, converted_checkpoint(model, orig)


def conversion_summary(model: EMSDetectionModel, orig: OriginalCheckpoint, time_steps: int | None) -> str:
    """What was converted: classes, T (and where it came from), parameters, anchors, source epoch and date."""
    names = ", ".join(model.names.values())
    t_note = "given" if time_steps else "the original code's default; not stored in its checkpoints, set time_steps="
    anchors = "; ".join(", ".join(f"({w:g}, {h:g})" for w, h in zip(a[::2], a[1::2])) for a in model.yaml["anchors"])
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{orig.path}: original EMS-YOLO checkpoint ('{orig.source}' weights of epoch {orig.epoch}, saved "
        f"{orig.date or 'on an unknown date'}), {len(orig.tensors)} tensors mapped one-to-one\n"
        f"  model {Path(model.yaml['yaml_file']).name}: {model.yaml['nc']} classes ({names}), "
        f"T={model.time_steps} ({t_note}), "
        f"input {model.yaml['input']}, {params:,} parameters\n"
        f"  anchors (px, P4/16 then P5/32, as trained): {anchors}"
    )


def convert_original(
    source: str | Path,
    out: str | Path | None = None,
    model: str | Path | None = None,
    time_steps: int | None = None,
) -> Path:
    """Convert an original EMS-YOLO checkpoint into an ems-yolo one (default `<source stem>-ems.pt` beside it);
    `model` names the ems-yolo YAML whose rows it must match (its neuron, loss and input settings are used)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint '{source}' not found")
    _, ckpt = load_converted(source, time_steps, model)
    return write_checkpoint(ckpt, out or source.with_name(f"{source.stem}-ems.pt"))
