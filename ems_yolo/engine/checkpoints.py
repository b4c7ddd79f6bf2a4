"""ems-yolo checkpoint files: read safely, written atomically, and original EMS-YOLO files converted into them.

Reading: a checkpoint is a pickle, and a plain `torch.load` runs whatever a file from the internet names (torch's
`weights_only` unpickler still calls the classes it allows). `load_checkpoint_file` lists the globals a file needs
first, allows only classes of ems-yolo, Ultralytics and `torch.nn` (modules and autograd functions), and rebuilds
them without running any of their code (`rebuild_load`: allocation plus pickled state, no constructor); anything
else is refused unless the file was trusted (`trust=True`, a plain `torch.load`). Every Ultralytics code path that
reads a checkpoint (model loading, trainer set-up, resume, AutoBackend) goes through it (ultralytics_compat hook 7).

Checkpoints of other projects' code (the original EMS-YOLO code, SpikeYOLO's) are converted when read. A converted
checkpoint is an ordinary ems-yolo checkpoint (the model pickled as `EMSDetectionModel`, FP16 like Ultralytics' own,
`epoch: -1` as a finished run) with a `converted_from` record of where it came from.
"""

from __future__ import annotations

import importlib
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import torch

from ems_yolo import ultralytics_compat as compat  # first: offline environment before Ultralytics loads
from ultralytics import __version__ as ultralytics_version
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn.inert_pickle import RefusedPickle, rebuild_load
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.original import ORIGINAL_MODEL, ORIGINAL_TIME_STEPS, OriginalCheckpoint, load_original
from ems_yolo.nn.spikeyolo_checkpoint import SpikeYOLOCheckpoint, is_spikeyolo_globals, load_spikeyolo
from ems_yolo.utils.files import atomic_write, refuse_overwriting_inputs

ORIGINAL_FORMAT = "EMS-YOLO original (BICLab/EMS-YOLO train.py, pickled models.yolo.Model)"
SPIKEYOLO_FORMAT = ("SpikeYOLO (BICLab/SpikeYOLO trainer, pickled ultralytics.nn.tasks.DetectionModel of its "
                    "yolo_spikformer modules)")
ALLOWED_MODULES = ("ems_yolo.", "ultralytics.", "torch.nn.")  # where the classes a checkpoint may need live
ALLOWED_DATA_CLASSES = ("ultralytics.utils.IterableSimpleNamespace",)  # plain attribute bags (training args)
EXPECTED = "expected a PyTorch checkpoint (.pt) written by ems-yolo train or convert, or by Ultralytics"
_TRUSTED: set[Path] = set()


def trust_file(path: str | Path) -> None:
    """Let `load_checkpoint_file` unpickle `path` without the allow-list (the user vouches for the file)."""
    _TRUSTED.add(Path(path).resolve())


def _allowed_class(name: str):
    """The class named `module.Class` if a checkpoint may rebuild it (an nn.Module or autograd Function of
    ems-yolo, Ultralytics or torch.nn, or one of `ALLOWED_DATA_CLASSES`), else None; only modules of those packages
    are imported to find it."""
    module, _, attr = name.rpartition(".")
    if not module.startswith(ALLOWED_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    ok = isinstance(obj, type) and (issubclass(obj, (torch.nn.Module, torch.autograd.Function))
                                    or name in ALLOWED_DATA_CLASSES)
    return obj if ok else None


def load_checkpoint_file(path: str | Path) -> dict:
    """Load an ems-yolo or Ultralytics checkpoint dict safely; errors are one line naming the file.

    An original EMS-YOLO checkpoint is converted (T = 5). Other files are rebuilt without running anything they
    name (`rebuild_load`); a file needing any class outside the allow-list, or asking for a call, is refused unless
    it was trusted (`trust_file`, `trust=True`), then loaded with a plain `torch.load`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (ems-yolo does not download weights)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, {EXPECTED}")
    if path.resolve() in _TRUSTED:
        return _read(path, lambda: torch.load(path, map_location="cpu", weights_only=False))
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive, truncated, or not a torch file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format), "
                         f"{EXPECTED}") from None
    if ORIGINAL_MODEL in needed or is_spikeyolo_globals(needed):
        return load_converted(path)[1]
    classes = {name: _allowed_class(name) for name in needed}
    refused = sorted(name for name, cls in classes.items() if cls is None)
    if refused:
        raise ValueError(f"{path}: needs {refused[0]} to load, which is not an ems-yolo, Ultralytics or torch.nn "
                         "class; a checkpoint is a pickle that can run code, so it is refused. If you trust this "
                         "file, pass trust=True")
    return _read(path, lambda: rebuild_load(path, _allowed_class))


def _read(path: Path, load) -> dict:
    try:
        ckpt = load()
    except RefusedPickle as e:
        raise ValueError(f"{path}: {e} to load; a checkpoint is a pickle that can run code, and loading it must "
                         "not, so it is refused. If you trust this file, pass trust=True") from None
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot be loaded ({why}), {EXPECTED}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), torch.nn.Module):
        raise ValueError(f"{path}: holds no model ('model' or 'ema' entry), {EXPECTED}")
    return ckpt


compat.route_checkpoint_loading(load_checkpoint_file)


def write_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write a checkpoint dict atomically, its model as an FP16 copy (the in-memory model is left as it is)."""
    ckpt = dict(ckpt)
    if isinstance(ckpt.get("model"), torch.nn.Module):
        ckpt["model"] = deepcopy(ckpt["model"]).half()
    ckpt.update(date=datetime.now().astimezone().isoformat(), version=ultralytics_version)
    return atomic_write(path, lambda f: torch.save(ckpt, f))


def foreign_format(path: str | Path) -> str | None:
    """ORIGINAL_FORMAT or SPIKEYOLO_FORMAT for a checkpoint of that code (decided from the globals its pickle names;
    nothing is unpickled), else None."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy, truncated, or not a torch file): not ours to decide
        return None
    if ORIGINAL_MODEL in needed:
        return ORIGINAL_FORMAT
    return SPIKEYOLO_FORMAT if is_spikeyolo_globals(needed) else None


def converted_checkpoint(model: EMSDetectionModel, orig: OriginalCheckpoint | SpikeYOLOCheckpoint) -> dict:
    """The ems-yolo checkpoint dict of a converted model (a finished run: nothing to resume)."""
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
            "format": SPIKEYOLO_FORMAT if isinstance(orig, SpikeYOLOCheckpoint) else ORIGINAL_FORMAT,
            "weights": orig.source,
            "epoch": orig.epoch,
            "date": orig.date,
            "time_steps": model.time_steps,
        },
    }


def load_converted(
    path: str | Path, time_steps: int | None = None, model_yaml: str | Path | None = None
) -> tuple[EMSDetectionModel, dict]:
    """An original EMS-YOLO or a SpikeYOLO checkpoint as Ultralytics' `load_checkpoint` returns a native one: (model
    in eval mode with `args`, `pt_path` and `task` attached, checkpoint dict). T: `time_steps`, else the file's
    (SpikeYOLO) or the original code's default (EMS-YOLO, whose files do not store it)."""
    base = load_model_yaml(model_yaml) if model_yaml else None
    if foreign_format(path) == SPIKEYOLO_FORMAT:
        model, orig = load_spikeyolo(path, time_steps, base)
        summary = spikeyolo_summary(model, orig, time_steps)
    else:
        model, orig = load_original(path, int(time_steps or ORIGINAL_TIME_STEPS), base)
        summary = conversion_summary(model, orig, time_steps)
    model.args = {**DEFAULT_CFG_DICT, "task": "detect"}
    model.pt_path, model.task = str(path), "detect"
    LOGGER.info(summary)
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


def spikeyolo_summary(model: EMSDetectionModel, sy: SpikeYOLOCheckpoint, time_steps: int | None) -> str:
    """What was converted from a SpikeYOLO checkpoint: classes, T and D, parameters, source epoch and date."""
    params = sum(p.numel() for p in model.parameters())
    t_note = ("given" if time_steps else "the released Gen1 checkpoint's T; set time_steps= for another"
              if sy.charge == "gen1" else "from its MS_GetT layer")
    rep = model.yaml.get("events")
    return (
        f"{sy.path}: SpikeYOLO checkpoint ('{sy.source}' weights of epoch {sy.epoch}, saved "
        f"{sy.date or 'on an unknown date'}), {len(sy.tensors)} tensors mapped one-to-one\n"
        f"  model {Path(model.yaml['yaml_file']).name}: {model.yaml['nc']} classes, T={model.time_steps} ({t_note}), "
        f"I-LIF D={sy.levels}, {params:,} parameters"
        + (f"\n  input {rep['name']}: {rep['bins']} bins of the {rep['window_us'] / 1000:g} ms before each window end "
           f"at {rep['width']}x{rep['height']} (as their pre_gen1.py makes it)" if rep else "")
    )


def convert_original(
    source: str | Path,
    out: str | Path | None = None,
    model: str | Path | None = None,
    time_steps: int | None = None,
) -> Path:
    """Convert an original EMS-YOLO or a SpikeYOLO checkpoint into an ems-yolo one (default `<source stem>-ems.pt`
    beside it); `model` names the ems-yolo YAML whose rows it must match (its settings are used)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint '{source}' not found")
    out = out or source.with_name(f"{source.stem}-ems.pt")
    refuse_overwriting_inputs(out, source=source, model=model)
    _, ckpt = load_converted(source, time_steps, model)
    return write_checkpoint(ckpt, out)
