"""The one seam between ems-yolo and Ultralytics' internals.

ems-yolo extends Ultralytics through its public override points (subclasses of `DetectionModel`, `Detect`,
`DetectionTrainer`, `DetectionValidator` and `Model`; `get_model`, `build_dataset`, `init_criterion`, callbacks).
What those cannot reach is hooked here, and only here; each hook says what it replaces, and
tests/test_ultralytics_compat.py fails loudly when the internal it relies on changes.

Importing this module is ems-yolo's first use of Ultralytics: it sets the offline environment before
`ultralytics` is imported (Ultralytics probes DNS at import, sends telemetry, auto-installs packages and downloads
a font for its plots). Every ems-yolo module that uses Ultralytics imports this module first; `import ems_yolo`
alone changes nothing. Users can still override any of the variables in their environment.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from ems_yolo.cfg import ems_home
from ems_yolo.utils.files import atomic_write_bytes

SUPPORTED_ULTRALYTICS = (">=8.4.135", "<9")  # tested at both ends by tools/compat.sh; setup.cfg states the same


def _install_fonts(config_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans under the names Ultralytics would otherwise download (`check_font`)."""
    targets = [config_dir / "Arial.ttf", config_dir / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for target in targets:
        if not target.exists():
            atomic_write_bytes(target, source.read_bytes())


def _configure_environment() -> None:
    """Offline defaults for Ultralytics (read at its import) and its font, provided locally."""
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ems_home() / "ultralytics"))
    _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]).expanduser() / "Ultralytics")


class _NoUltralyticsSettingsBanner(logging.Filter):
    """Hook 11 (settings). Ultralytics logs, when it creates or migrates its settings file at import, to view and
    change it with `yolo settings`: another program and another file than ems-yolo's (`ems-yolo settings`). ems-yolo
    keeps that file in its own home with integrations off, so those lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and "'yolo settings" in record.msg)


_configure_environment()
logging.getLogger("ultralytics").addFilter(_NoUltralyticsSettingsBanner())  # before the import that logs them

import ultralytics.engine.trainer as _ul_trainer  # noqa: E402
import ultralytics.nn.tasks as _ul_tasks  # noqa: E402
from ultralytics.utils import SETTINGS  # noqa: E402

# Telemetry and third-party loggers off in Ultralytics' settings (written only when they differ).
_OFF = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune") if SETTINGS.get(k)}
if _OFF:
    SETTINGS.update(_OFF)

# Hook 1 (parser). Ultralytics' `parse_model` keeps its channel rules in local sets; ems-yolo's parser accepts
# Ultralytics modules in its YAMLs with these copies: modules whose arguments start with (c1, c2), and those that
# also take the repeat count as third argument.
UL_CHANNEL_MODULES = frozenset({"Conv", "DWConv", "GhostConv", "RepConv", "Focus", "SPP", "SPPF", "Bottleneck"})
UL_REPEAT_MODULES = frozenset({"C2f", "C3", "C3k2", "C2PSA"})

# Hook 2 (model). `DetectionModel.__init__` always builds with Ultralytics' parser, which knows none of the
# spiking modules, so `EMSDetectionModel` initialises only `BaseModel` and sets these attributes itself.
DETECTION_MODEL_ATTRIBUTES = ("yaml", "model", "save", "names", "inplace", "stride")

# Hook 3 (head). `Detect.__init__` builds the anchor-free branches; `EMSDetect` initialises only `nn.Module` and
# defines the attributes that the engines read from a head (export flags, stride, nc, ...) itself.


# Hook 6 (model). `BaseModel._predict_once` has no per-layer hook; with activation checkpointing,
# `EMSDetectionModel._predict_once` repeats its routing (inputs from `m.f`, outputs kept for `m.i in save`).


@contextmanager
def offline_amp_check(check):
    """Hook 4 (trainer). Run `BaseTrainer._setup_train` with `check(model) -> bool` in place of Ultralytics'
    `check_amp`, which downloads a reference model (yolo26n.pt) on CUDA devices."""
    real = _ul_trainer.check_amp
    _ul_trainer.check_amp = check
    try:
        yield
    finally:
        _ul_trainer.check_amp = real


class AtomicPath(type(Path())):
    """Hook 5 (checkpoints). A Path whose `write_bytes` goes through a temporary sibling and `os.replace`:
    `BaseTrainer.save_model` writes last.pt, best.pt and epoch<N>.pt with `Path.write_bytes`, so an interrupted
    save never leaves a truncated checkpoint. Children (`wdir / name`) are AtomicPaths too."""

    def write_bytes(self, data) -> int:  # noqa: D102
        view = memoryview(data)
        atomic_write_bytes(Path(self), view)
        return view.nbytes


def atomic_checkpoints(trainer) -> None:
    """Make every checkpoint a trainer saves (last, best, epoch<N> in its weights folder) an atomic write."""
    trainer.wdir = AtomicPath(trainer.wdir)
    trainer.last, trainer.best = trainer.wdir / Path(trainer.last).name, trainer.wdir / Path(trainer.best).name


def route_checkpoint_loading(load) -> None:
    """Hook 7 (checkpoints). `load_checkpoint` (model loading, trainer set-up and resume, AutoBackend) reads files
    through `torch_safe_load`, a plain `torch.load(weights_only=False)` that runs any pickle; `load(path) -> dict`
    takes its place."""
    _ul_tasks.torch_safe_load = lambda weight, *args, **kwargs: (load(weight), str(weight))


# Hook 10 (model). Ultralytics' `parse_model` builds a YAML's `activation:` with `eval` unless its restricted mode
# (`ULTRALYTICS_SAFE_LOAD`, read once at import into `tasks.SAFE_LOAD`) is on; on, it accepts only
# `nn.Name(literal args)`. ems-yolo turns it on for every Ultralytics model it builds.
_ul_tasks.SAFE_LOAD = True


class _OurCommands(logging.Filter):
    """Rewrites the `yolo <mode> task=detect ...` follow-up commands in Ultralytics' log as `ems-yolo <mode> ...`;
    the predict line gets `source=` (ems-yolo's predict requires it), or is dropped when no source is known."""

    def __init__(self, source: str | None = None) -> None:
        super().__init__()
        self.source = source

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "yolo " in record.msg:
            msg = re.sub(r"(?<![\w-])yolo (predict|val) task=detect ", r"ems-yolo \1 ", record.msg)
            if self.source:
                msg = re.sub(r"ems-yolo predict model=\S+", lambda m: f"{m.group(0)} source={self.source}", msg)
            else:
                msg = re.sub(r"\n[^\n]*ems-yolo predict [^\n]*", "", msg)
            record.msg = msg
        return True


@contextmanager
def ems_yolo_hints(source: str | None = None):
    """Hook 8 (exporter). `Exporter.__call__` ends by logging how to predict and validate with the exported file in
    Ultralytics' `yolo` CLI (another program, which makes network look-ups); within this context those lines name
    `ems-yolo` commands, the predict one on `source` (or left out without one)."""
    from ultralytics.utils import LOGGER

    rewrite = _OurCommands(source)
    LOGGER.addFilter(rewrite)
    try:
        yield
    finally:
        LOGGER.removeFilter(rewrite)


@contextmanager
def in_process_tuning(trainer):
    """Hook 12 (tuner). `Tuner.__call__` trains each iteration through `MultiTrainer(None, ...)`, which runs
    Ultralytics' `yolo train` command in a subprocess (another program, which builds no ems-yolo model, so every
    iteration failed); within this context the MultiTrainer it imports trains in this process with `trainer`."""
    real = _ul_trainer.MultiTrainer

    class InProcessMultiTrainer(real):
        def __init__(self, _cli, args, model, _callbacks=None):
            super().__init__(trainer, args, model, _callbacks)

    _ul_trainer.MultiTrainer = InProcessMultiTrainer
    try:
        yield
    finally:
        _ul_trainer.MultiTrainer = real


@contextmanager
def cpu_ddp():
    """Hook 9 (trainer). `BaseTrainer._setup_train` wraps the model as `DistributedDataParallel(model,
    device_ids=[self.device.index])`, which is `[None]` on the CPU and refused by DDP (CPU modules take
    `device_ids=None`); within this context the DDP class it finds in `torch.nn.parallel` passes None instead."""
    import torch

    real = torch.nn.parallel.DistributedDataParallel

    class CPUDistributedDataParallel(real):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            super().__init__(module, None if device_ids == [None] else device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CPUDistributedDataParallel
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = real
