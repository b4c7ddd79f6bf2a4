"""EMSYOLO: the `ultralytics.YOLO`-style facade for spiking EMS models.

    EMSYOLO("ems-res10.yaml").train(data="coco8.yaml", epochs=3)
    EMSYOLO("runs/detect/train/weights/best.pt").val()
    EMSYOLO("best.pt").predict("video.mp4"); EMSYOLO("best.pt").export(format="onnx")

`ann=True` builds the ANN twin of a YAML (LIF replaced by ReLU, T = 1), trained and used the same way;
`checkpoint=True` recomputes activations in backward (less training memory, more compute).
Time steps come from the model YAML or checkpoint and can be overridden with `time_steps=`; an override of a YAML
is written to a derived YAML file (the trainer rebuilds models from the file named in its arguments, also in DDP
workers), so the new T is what checkpoints record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.utils import DEFAULT_CFG_DICT

from ems_yolo.data.datasets import load_data, resolve_data
from ems_yolo.engine.trainer import EMSTrainer, model_for_data
from ems_yolo.engine.validator import EMSValidator
from ems_yolo.nn.model import (
    EMSDetectionModel,
    ann_twin,
    find_model_yaml,
    load_model_yaml,
)
from ems_yolo.utils.files import content_addressed
from ems_yolo.utils.offline import ems_home

# Training defaults that differ from Ultralytics' to follow the EMS-YOLO recipe (model-spec §9).
EMS_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "SGD", "lrf": 0.1, "cos_lr": True, "close_mosaic": 0}


def default_project() -> str:
    """Run folders go to ./runs/detect, as Ultralytics users expect (not to a folder frozen in its settings)."""
    return str(Path.cwd() / "runs" / "detect")


def derive_model_yaml(cfg: dict) -> Path:
    """Write a model dict to `$EMS_YOLO_HOME/models/<stem>-<hash>.yaml` (content-addressed, written once)."""
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != "yaml_file"}, sort_keys=False)
    return content_addressed(ems_home() / "models", Path(cfg.get("yaml_file", "model")).stem, text)


def set_time_steps(model: nn.Module, time_steps: int) -> None:
    """Change T of a built model in place (every module holding `time_steps`, and the model YAML)."""
    if time_steps < 1:
        raise ValueError(f"time_steps must be >= 1, got {time_steps}")
    for m in model.modules():
        if hasattr(m, "time_steps") and isinstance(m.time_steps, int):
            m.time_steps = time_steps
    model.yaml["time_steps"] = time_steps


def resolve_model_source(
    model: str | Path, time_steps: int | None = None, ann: bool = False, checkpoint: bool = False
) -> str:
    """Map a model argument to a YAML path or an existing weights file; errors early for missing files.

    `time_steps`, `ann` (the ANN twin: ReLU, T=1) and `checkpoint` (activation checkpointing) on a YAML are
    written to a derived YAML.
    """
    text = str(model).strip()
    p = Path(text).expanduser()
    if p.suffix in (".yaml", ".yml") or (not p.suffix and not p.exists()):
        path = find_model_yaml(text)
        if time_steps or ann or checkpoint:
            cfg = load_model_yaml(path)
            if time_steps:
                cfg["time_steps"] = int(time_steps)
            if checkpoint:
                cfg["checkpoint"] = True
            path = derive_model_yaml(ann_twin(cfg) if ann else cfg)
        return str(path)
    if ann or checkpoint:
        raise ValueError(f"ann and checkpoint are model YAML settings; '{text}' is a weights file")
    if not p.exists():
        raise FileNotFoundError(f"model weights '{text}' not found (ems-yolo does not download weights)")
    return str(p)


class EMSYOLO(Model):
    """Spiking YOLO model: train, val, predict and export through the Ultralytics engine."""

    def __init__(
        self,
        model: str | Path = "ems-res10.yaml",
        task: str = "detect",
        verbose: bool = False,
        time_steps: int | None = None,
        ann: bool = False,
        checkpoint: bool = False,
    ):
        source = resolve_model_source(model, time_steps, ann, checkpoint)
        super().__init__(source, task=task, verbose=verbose)
        if time_steps and isinstance(self.model, nn.Module) and self.model.yaml.get("time_steps") != time_steps:
            set_time_steps(self.model, int(time_steps))
        elif time_steps and not isinstance(self.model, nn.Module):
            raise ValueError(f"time_steps is fixed in exported model '{source}' (T is unrolled into the graph)")

    @property
    def task_map(self) -> dict:
        """Engine classes for the detect task."""
        return {
            "detect": {
                "model": EMSDetectionModel,
                "trainer": EMSTrainer,
                "validator": EMSValidator,
                "predictor": DetectionPredictor,
            }
        }

    @property
    def time_steps(self) -> int | None:
        """T of a PyTorch model (None for exported models, whose T is baked in)."""
        return self.model.yaml.get("time_steps") if isinstance(self.model, nn.Module) else None

    def _new(self, cfg: str, task: str | None = None, verbose: bool = False) -> None:
        """Build from an ems-yolo model YAML (Ultralytics' loader would not know our file names)."""
        self.cfg = str(find_model_yaml(cfg))
        self.task = "detect"
        self.model = EMSDetectionModel(load_model_yaml(self.cfg), verbose=verbose)
        self.overrides["model"] = self.cfg
        self.overrides["task"] = self.task
        self.model.args = {**DEFAULT_CFG_DICT, **self.overrides}
        self.model.task = self.task
        self.model_name = self.cfg

    def train(self, trainer=None, **kwargs):
        """Train with the EMS-YOLO recipe defaults (overridable); `data` defaults to the built-in dataset."""
        kwargs = {**EMS_TRAIN_DEFAULTS, "project": default_project(), **kwargs}
        if not kwargs.get("resume"):
            kwargs["data"] = resolve_data(kwargs.get("data") or self.overrides.get("data"))
        return super().train(trainer=trainer, **kwargs)

    def energy(
        self,
        data: str | None = None,
        imgsz: int | None = None,
        batch: int = 8,
        split: str = "val",
        max_batches: int | None = None,
        project: str | None = None,
        name: str = "energy",
        **energy_kwargs,
    ):
        """Firing rates on `data`, synaptic operations and energy vs the ANN twin; files go to a run folder.

        A model YAML is built for the dataset (its classes, channels and, for events, T = bins), as training would;
        a checkpoint is measured as it is.

        `energy_kwargs`: e_ac, e_mac (pJ) or preset ("fp32", "fp16", "int8"), device.
        """
        from ultralytics.utils.files import increment_path

        from ems_yolo.engine.energy import energy_dataloader, run_energy

        if not isinstance(self.model, nn.Module):
            raise ValueError("energy needs a PyTorch model (a YAML or .pt), not an exported one")
        imgsz = int(imgsz or self.overrides.get("imgsz") or 640)
        data = resolve_data(data or self.overrides.get("data"))
        model = self.model if self.ckpt else model_for_data(self.model.yaml, load_data(data, split=split))
        loader = energy_dataloader(data, imgsz, batch, split)
        folder = increment_path(Path(project or default_project()) / name)
        return run_energy(model, loader, imgsz, folder, max_batches=max_batches, **energy_kwargs)

    def val(self, validator=None, **kwargs):
        """Validate on `data` (default: the checkpoint's dataset, else the built-in one)."""
        kwargs["data"] = resolve_data(kwargs.get("data") or self.overrides.get("data"))
        kwargs.setdefault("project", default_project())
        return super().val(validator=validator, **kwargs)

    def predict(self, source=None, stream: bool = False, predictor=None, **kwargs):
        """Ultralytics prediction; saved results go to ./runs/detect/<name> unless `project` is given."""
        kwargs.setdefault("project", default_project())
        return super().predict(source, stream, predictor, **kwargs)
