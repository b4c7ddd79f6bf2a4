"""EMSTrainer: Ultralytics' DetectionTrainer building EMS models, with offline AMP check and atomic checkpoints."""

from __future__ import annotations

from copy import copy
from pathlib import Path
from unittest import mock

import torch
import ultralytics.engine.trainer as ul_trainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ems_yolo.data.datasets import (
    is_event_data,
    load_data,
    resolve_data,
    split_event_path,
)
from ems_yolo.engine.autoanchor import check_anchors
from ems_yolo.engine.validator import EMSValidator, build_event_dataset
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.utils.files import atomic_write_bytes
from ems_yolo.utils.flops import image_hw


class AtomicPath(type(Path())):
    """A Path whose `write_bytes` goes through a temporary sibling and `os.replace`, so an interrupted save never
    leaves a truncated checkpoint behind (Ultralytics writes last.pt/best.pt with `Path.write_bytes`)."""

    def write_bytes(self, data) -> int:  # noqa: D102
        view = memoryview(data)
        atomic_write_bytes(Path(self), view)
        return view.nbytes


def check_amp_offline(model: torch.nn.Module) -> bool:
    """AMP check without Ultralytics' download of a reference model: the EMS model itself must give finite
    outputs under autocast on the training device."""
    p = next(model.parameters())
    if p.device.type == "cpu":
        return False
    ch = int(model.yaml.get("channels", 3))
    x = torch.rand(2, ch, 128, 128, device=p.device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(p.device.type):
            y = model(x)[0]
        ok = bool(torch.isfinite(y).all())
    finally:
        model.train(was_training)
    if not ok:
        LOGGER.warning("AMP check failed (non-finite outputs under autocast); training in full precision")
    return ok


def model_for_data(cfg, data: dict, verbose: bool = False) -> EMSDetectionModel:
    """Build a model for a dataset: its classes and channels; on event data `events` input with T = time bins
    of the cached representation (step t reads bin t)."""
    events = data.get("events")
    kw = {"input_kind": "events", "time_steps": events["bins"]} if events else {}
    return EMSDetectionModel(cfg, nc=data["nc"], ch=data["channels"], verbose=verbose, **kw)


class EMSTrainer(DetectionTrainer):
    """Detection trainer for spiking EMS models; everything else (loop, EMA, augmentation, DDP) is Ultralytics'."""

    def __init__(self, cfg=ul_trainer.DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.last, self.best = AtomicPath(self.last), AtomicPath(self.best)

    def get_dataset(self) -> dict:
        """Resolve `data=` offline (built-in data, cfg/datasets names, clear errors); event caches load here."""
        self.args.data = resolve_data(self.args.data)
        return load_data(self.args.data) if is_event_data(self.args.data) else super().get_dataset()

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        """Event cache splits get EventDetectionDataset; image folders go to Ultralytics."""
        if split_event_path(img_path):
            return build_event_dataset(img_path, self.args, mode)
        return super().build_dataset(img_path, mode, batch)

    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> EMSDetectionModel:
        """Build the EMS model for this dataset (`model_for_data`), loading `weights` when given."""
        model = model_for_data(cfg, self.data, verbose and RANK == -1)
        if weights:
            model.load(weights)
        return model

    def get_validator(self) -> EMSValidator:
        """Validator used after every epoch."""
        return EMSValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def _setup_train(self) -> None:
        """Ultralytics' set-up with its AMP check (which downloads yolo26n.pt) replaced by an offline one, then
        AutoAnchor on the training labels (unless `autoanchor: false` in the model YAML or when resuming)."""
        with mock.patch.object(ul_trainer, "check_amp", check_amp_offline):
            super()._setup_train()
        model = unwrap_model(self.model)
        if model.yaml.get("autoanchor", True) and not self.resume:  # every rank fits the same (seeded) anchors
            thr = float((model.yaml.get("loss") or {}).get("anchor_t", 4.0))
            if check_anchors(model, self.train_loader.dataset, max(image_hw(self.args.imgsz)), thr):
                self.ema.ema.model[-1].anchor_grid.copy_(model.model[-1].anchor_grid)
