"""EMSTrainer: Ultralytics' DetectionTrainer building EMS models, with an offline AMP check and atomic checkpoints."""

from __future__ import annotations

import time
from copy import copy, deepcopy

import torch

from ems_yolo import ultralytics_compat as compat  # first: offline environment before Ultralytics loads
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ems_yolo.cfg import load_model_yaml
from ems_yolo.data.datasets import resolve_data
from ems_yolo.data.splits import build_split_dataset
from ems_yolo.engine import checkpoints  # noqa: F401  (hook 7: every checkpoint read is the safe loader, DDP too)
from ems_yolo.engine.autoanchor import check_anchors
from ems_yolo.engine.validator import EMSValidator
from ems_yolo.nn.model import EMSDetectionModel, frozen_bn_stats
from ems_yolo.utils.checks import image_hw


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
    """Build a model for a dataset: its classes and channels; on event data `events` input with T = time bins of
    the cached representation (step t reads bin t), and the representation recorded in the model YAML (so
    checkpoints know how to turn a recording into input)."""
    cfg = deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
    events = data.get("events")
    if not events and cfg.get("channels") and int(cfg["channels"]) != int(data["channels"]):
        raise ValueError(f"{cfg.get('yaml_file', 'model YAML')}: channels: {cfg['channels']}, but the data "
                         f"({data.get('yaml_file', 'data YAML')}) has {data['channels']} channels, expected the same "
                         "(set channels= on the model or channels: in the data YAML)")
    if events:
        cfg.update(input="events", time_steps=int(events["bins"]), events=dict(events))
    return EMSDetectionModel(cfg, nc=data["nc"], ch=data["channels"], verbose=verbose)


class EMSTrainer(DetectionTrainer):
    """Detection trainer for spiking EMS models; everything else (loop, EMA, augmentation, DDP) is Ultralytics'."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        compat.atomic_checkpoints(self)

    def get_dataset(self) -> dict:
        """Resolve `data=` offline (built-in data, cfg/datasets names, clear errors), then Ultralytics' checks."""
        self.args.data = resolve_data(self.args.data)
        return super().get_dataset()

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        """Event caches (.h5 splits) get EventDetectionDataset; image folders are checked and go to Ultralytics."""
        frames = super().build_dataset
        return build_split_dataset(img_path, self.args, self.data, mode, lambda: frames(img_path, mode, batch))

    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> EMSDetectionModel:
        """Build the EMS model for this dataset (`model_for_data`), loading `weights` when given."""
        model = model_for_data(cfg, self.data)
        if verbose and RANK == -1:  # the summary at the training size, not the 640 px default
            model.log_layers()
            model.info(imgsz=self.args.imgsz)
        if weights:
            model.load(weights)
        return model

    def get_validator(self) -> EMSValidator:
        """Validator used after every epoch."""
        return EMSValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def _cpu_time_note(self, model: EMSDetectionModel) -> None:
        """Say before the first batch what an epoch will cost on this CPU: one image's forward and backward at the
        training size is timed (BatchNorm statistics untouched) and scaled to the training set."""
        h, w = image_hw(self.args.imgsz)
        x = torch.rand(1, int(model.yaml.get("channels", 3)), h, w, device=self.device)
        start = time.perf_counter()
        with frozen_bn_stats(model):
            sum(o.float().mean() for o in model(x)).backward()
        seconds = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        n = len(self.train_loader.dataset)
        epoch_min = seconds * n / 60
        total_h = epoch_min * self.epochs / 60
        note = (f"CPU training: one image takes {seconds:.2f} s at {h}x{w}, T={model.time_steps}, so an epoch of {n} "
                f"images takes about {epoch_min:.1f} min ({self.epochs} epochs: about {total_h:.1f} h)")
        if epoch_min > 5:
            LOGGER.warning(f"{note}. For a first run on CPU try imgsz=128 time_steps=2 (as `make demo` does), or a GPU "
                           "(device=0)")
        else:
            LOGGER.info(note)

    def _setup_train(self) -> None:
        """Ultralytics' set-up with its AMP check replaced by an offline one, then AutoAnchor on the training labels
        (unless `autoanchor: false` in the model YAML or when resuming)."""
        with compat.offline_amp_check(check_amp_offline):
            super()._setup_train()
        model = unwrap_model(self.model)
        if self.device.type == "cpu" and RANK in {-1, 0}:
            self._cpu_time_note(model)
        if model.yaml.get("autoanchor", True) and not self.resume:  # every rank fits the same (seeded) anchors
            thr = float((model.yaml.get("loss") or {}).get("anchor_t", 4.0))
            if check_anchors(model, self.train_loader.dataset, max(image_hw(self.args.imgsz)), thr):
                self.ema.ema.model[-1].anchor_grid.copy_(model.model[-1].anchor_grid)
