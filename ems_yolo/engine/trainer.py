"""EMSTrainer: Ultralytics' DetectionTrainer building EMS models, with an offline AMP check and atomic checkpoints.

Distributed training is Ultralytics': `device=0,1,...` launches its DDP workers (nccl). Processes started by
`torchrun` (any number per machine, any number of machines) are workers too: their world is torchrun's
WORLD_SIZE (Ultralytics counts only this machine's devices), and with `device=cpu` they join over gloo, so the
same distributed code path (sampler, gradient averaging, rank-0 checkpoints, EMA, resume) runs without a GPU.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from copy import copy, deepcopy
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ems_yolo import ultralytics_compat as compat  # first: offline environment before Ultralytics loads
from ultralytics.cfg import get_save_dir
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOCAL_RANK, LOGGER, RANK
from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first, unwrap_model

from ems_yolo.cfg import (
    DEFAULT_MODEL,
    LONG_RUN_MIN,
    MODEL_KEYS,
    QUICK_RUN_MIN,
    builtin_train_defaults,
    load_model_yaml,
)
from ems_yolo.data.datasets import resolve_data
from ems_yolo.data.splits import build_split_dataset
from ems_yolo.engine.checkpoints import load_checkpoint_file  # also hook 7: every checkpoint read is the safe loader
from ems_yolo.engine.autoanchor import check_anchors
from ems_yolo.engine.validator import EMSValidator
from ems_yolo.nn.model import EMSDetectionModel, local_bn_stats, raw_levels
from ems_yolo.utils.checks import image_hw
from ems_yolo.utils.files import atomic_write_text, claim_run


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


def trim_results_csv(csv: Path, epochs: int) -> None:
    """Keep the header and the rows of the first `epochs` epochs of a run's results.csv (rows of epochs after the
    checkpoint, written before a kill, would be duplicated by the resumed run)."""
    if not csv.is_file():
        return
    lines = csv.read_text().splitlines(keepends=True)
    if len(lines) > epochs + 1:
        atomic_write_text(csv, "".join(lines[:epochs + 1]))


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

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, command: dict | None = None):
        """`command`: the keys of the user's `ems-yolo train` command line (model and train keys), for hints."""
        self.command = command
        super().__init__(cfg, overrides, _callbacks)
        compat.atomic_checkpoints(self)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if LOCAL_RANK != -1 and world > 1:  # a DDP worker (torchrun's or Ultralytics' launcher's): all processes
            self.world_size = world

    def check_resume(self, overrides: dict) -> None:
        """Ultralytics' resume, then the run folder is fixed before anything is written: a resumed run is the folder
        its checkpoint lives in (`<run>/weights/last.pt`), never the paths the checkpoint records (they may point
        anywhere). The folder is claimed for cleanup."""
        super().check_resume(overrides)
        if self.resume:
            last = Path(self.args.resume).resolve()
            run = last.parent.parent
            if last.parent.name != "weights":
                raise ValueError(f"{last}: resume=True needs the last.pt of a run, expected <run>/weights/last.pt "
                                 "(a checkpoint's recorded run folder is not trusted)")
            recorded = self.args.save_dir
            if recorded and Path(recorded).resolve() != run:
                LOGGER.warning(f"{last}: its train_args.save_dir '{recorded}' is not the folder it lives in; "
                               f"resuming in {run}")
            self.args.save_dir, self.args.project, self.args.name = str(run), str(run.parent), run.name
        elif RANK in {-1, 0}:
            self.args.save_dir = str(get_save_dir(self.args))
        if RANK in {-1, 0}:
            claim_run(self.args.save_dir)

    def resume_training(self, ckpt) -> None:
        """Ultralytics' resume; then results.csv keeps only the checkpoint's epochs (the checkpoint was read once,
        by Ultralytics)."""
        super().resume_training(ckpt)
        if self.resume and ckpt is not None and RANK in {-1, 0}:
            trim_results_csv(Path(self.save_dir) / "results.csv", self.start_epoch)

    def _setup_ddp(self) -> None:
        """Ultralytics' process group on accelerators; gloo for CPU workers (the device stays the CPU)."""
        if self.device.type != "cpu":
            return super()._setup_ddp()
        dist.init_process_group("gloo", timeout=timedelta(hours=3), rank=RANK, world_size=self.world_size)

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

    def final_eval(self) -> None:
        """Ultralytics' final validation of best.pt. Its stand-alone validator puts every DDP rank on an
        accelerator, so CPU workers validate best.pt's weights through the path every epoch uses (all ranks, each
        on its shard, statistics gathered on rank 0) after Ultralytics' stripping of last.pt and best.pt."""
        if not (self.device.type == "cpu" and self.world_size > 1):
            return super().final_eval()
        best = [str(self.best)]  # rank 0's run: torchrun's other ranks never chose a run folder of their own
        dist.broadcast_object_list(best, src=0)
        self.best = Path(best[0])
        if not self.best.exists():
            return super().final_eval()
        with torch_distributed_zero_first(LOCAL_RANK):
            if RANK in {-1, 0}:
                ckpt = strip_optimizer(self.last) if self.last.exists() else {}
                strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})
        LOGGER.info(f"\nValidating {self.best}...")
        ema = self.ema.ema
        self.ema.ema = load_checkpoint_file(self.best)["model"].float().to(self.device).eval()
        try:
            self.metrics = self.validator(trainer=self)
        finally:
            self.ema.ema = ema
        if RANK in {-1, 0}:
            self.metrics.pop("fitness", None)
            self.epoch += 1  # as Ultralytics: the best metrics logged at step epochs + 1
            self.run_callbacks("on_fit_epoch_end")
            self.epoch -= 1

    def get_validator(self) -> EMSValidator:
        """Validator used after every epoch."""
        return EMSValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def _cpu_time_note(self, model: EMSDetectionModel) -> None:
        """Say before the first batch what the run will cost on this CPU: one image's forward and backward at the
        training size is timed (after one untimed pass) on a copy of the model (so neither BatchNorm statistics,
        gradients nor, under DDP, the gradient hooks of the trained parameters see it) and scaled to the training
        set. A run longer than
        LONG_RUN_MIN is a WARNING naming a command that ends within QUICK_RUN_MIN."""
        h, w = image_hw(self.args.imgsz)
        x = torch.rand(1, int(model.yaml.get("channels", 3)), h, w, device=self.device)
        probe = deepcopy(model)
        with local_bn_stats(probe):  # rank 0 alone: no collective
            for _ in range(2):  # the first pass also sets up kernels: the second is timed
                start = time.perf_counter()
                sum(o.float().mean() for o in raw_levels(probe(x))).backward()
                seconds = time.perf_counter() - start
        n = len(self.train_loader.dataset)
        LOGGER.info(f"CPU training: one image takes {seconds:.2f} s at {h}x{w}, T={model.time_steps}")
        keys = self.command or {"model": self.args.model, "data": self.args.data}
        warning = long_run_warning(seconds, (h, w), n, self.epochs, keys)
        if warning:
            LOGGER.warning(warning)
        else:
            LOGGER.info(f"an epoch of {n} images takes about {seconds * n / 60:.1f} min ({self.epochs} epochs: "
                        f"about {seconds * n * self.epochs / 60:.0f} min)")

    def _setup_train(self) -> None:
        """Ultralytics' set-up with its AMP check replaced by an offline one, then AutoAnchor on the training labels
        (unless `autoanchor: false` in the model YAML or when resuming)."""
        with compat.offline_amp_check(check_amp_offline), compat.cpu_ddp():
            super()._setup_train()
        model = unwrap_model(self.model)
        if self.device.type == "cpu" and RANK in {-1, 0}:
            self._cpu_time_note(model)
        anchored = hasattr(model.model[-1], "anchor_grid")  # an anchor head (SpikeDetect is anchor-free)
        if anchored and model.yaml.get("autoanchor", True) and not self.resume:  # every rank fits the same anchors
            thr = float((model.yaml.get("loss") or {}).get("anchor_t", 4.0))
            if check_anchors(model, self.train_loader.dataset, max(image_hw(self.args.imgsz)), thr):
                self.ema.ema.model[-1].anchor_grid.copy_(model.model[-1].anchor_grid)


def train_command(keys: dict) -> str:
    """The `ems-yolo train` command line of `keys` (model and train keys, as `EMSYOLO(...)` and its `train` take
    them); unset model settings (None, False) and the default model are left out."""
    parts = ["ems-yolo", "train"]
    for key, value in keys.items():
        if value is None or (key in MODEL_KEYS and value is False) or (key == "model" and value == DEFAULT_MODEL):
            continue
        text = f"[{','.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)
        parts.append(shlex.quote(f"{key}={text}"))
    return " ".join(parts)


def quick_run(seconds: float, hw: tuple[int, int], n: int, epochs: int, data=None) -> dict:
    """imgsz, epochs and, when even one epoch is too long, the `fraction` of the training set, for a run of about
    QUICK_RUN_MIN at `seconds` per image of size `hw` (time scaled with the pixel count): a generated dataset at
    its own size, other data at 320 px at most."""
    native = builtin_train_defaults(data).get("imgsz", 320)
    size = min(max(hw), native)
    per_image = seconds * size * size / (hw[0] * hw[1])
    budget = QUICK_RUN_MIN * 60 / (per_image * n)  # epochs over the whole training set
    if budget >= 1:
        return {"imgsz": size, "epochs": min(epochs, math.floor(budget))}
    return {"imgsz": size, "epochs": 1, "fraction": max(math.floor(budget * 100) / 100, 0.01)}


def long_run_warning(seconds: float, hw: tuple[int, int], n: int, epochs: int, keys: dict) -> str:
    """The warning for a CPU run estimated over LONG_RUN_MIN at `seconds` per image (size `hw`, `n` training
    images), with the command (`keys` with imgsz/epochs/fraction replaced) that ends in about QUICK_RUN_MIN; ''
    for a shorter run."""
    total_min = seconds * n * epochs / 60
    if total_min <= LONG_RUN_MIN:
        return ""
    quick = quick_run(seconds, hw, n, epochs, keys.get("data"))
    return (f"CPU training: an epoch of {n} images at {hw[0]}x{hw[1]} takes about {seconds * n / 60:.1f} min, "
            f"{epochs} epochs about {total_min / 60:.1f} h. This ends in about {QUICK_RUN_MIN:.0f} min: "
            f"{train_command({**keys, **quick})} (or train on a GPU: device=0)")
