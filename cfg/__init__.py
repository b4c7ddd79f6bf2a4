"""ems-yolo's configuration (`ems_yolo.cfg`): the shipped model and dataset YAMLs, where they are found, the
ems-yolo keys of every command and the training defaults of the EMS-YOLO recipe.

This folder is the top-level `cfg/` of a source checkout and the package `ems_yolo.cfg` of an installed wheel
(setup.cfg maps one onto the other), so the YAMLs beside this file are found the same way in both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CFG_DIR = Path(__file__).resolve().parent
MODELS_DIR = CFG_DIR / "models"
DATASETS_DIR = CFG_DIR / "datasets"

BUILTIN_DATA = "shapes"  # generated frame dataset, the default of `train`
SYNTHETIC_GEN1 = "gen1-synthetic"  # generated Gen1-shaped event dataset
SYNTHETIC_GEN4 = "gen4-synthetic"  # generated 1 Mpx-shaped event dataset
EVENT_SUFFIXES = (".dat", ".raw", ".h5", ".hdf5")  # prediction sources read as events
EVENT_CACHE_SUFFIXES = (".h5", ".hdf5")  # dataset splits that are event sample caches
DEFAULT_MODEL = "ems-res10.yaml"

# Validation defaults that differ from Ultralytics': the original code's NMS IoU (its val.py; Ultralytics uses 0.7).
# The original scores its final COCO result with iou=0.65 (README: the reproduction command).
EMS_VAL_DEFAULTS: dict[str, Any] = {"iou": 0.6}
# Training defaults that differ from Ultralytics' to follow the EMS-YOLO recipe (model-spec §9); `iou` is that of
# the validation after every epoch.
EMS_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "SGD", "lrf": 0.1, "cos_lr": True, "close_mosaic": 0,
                                      **EMS_VAL_DEFAULTS}


def ems_home() -> Path:
    """Root of ems-yolo's caches (settings, fonts, generated datasets): $EMS_YOLO_HOME or ~/.cache/ems-yolo."""
    return Path(os.environ.get("EMS_YOLO_HOME", Path.home() / ".cache" / "ems-yolo")).expanduser()


def default_project() -> str:
    """Run folders go to ./runs/detect, as Ultralytics users expect (not to a folder frozen in its settings)."""
    return str(Path.cwd() / "runs" / "detect")


def available_models() -> list[str]:
    """Names of the shipped model YAMLs."""
    return sorted(p.name for p in MODELS_DIR.glob("*.yaml"))


def available_datasets() -> list[str]:
    """The generated dataset names plus the shipped dataset YAMLs."""
    return [BUILTIN_DATA, SYNTHETIC_GEN1, SYNTHETIC_GEN4, *sorted(p.name for p in DATASETS_DIR.glob("*.yaml"))]


def _find(name: str | Path, folder: Path) -> Path | None:
    """An existing file `name`, else `<folder>/<name>[.yaml]` for a bare name; None when neither exists."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if len(p.parts) == 1:
        for candidate in (folder / p.name, folder / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    return None


def find_model_yaml(name: str | Path) -> Path:
    """A model YAML given as a path or as the name of a shipped one (with or without `.yaml`)."""
    found = _find(name, MODELS_DIR)
    if found is None:
        raise FileNotFoundError(f"model YAML '{name}' not found; built-in models: {', '.join(available_models())}")
    return found


def find_dataset_yaml(name: str | Path) -> Path:
    """A dataset YAML given as a path or as the name of a shipped one (with or without `.yaml`)."""
    found = _find(name, DATASETS_DIR)
    if found is None:
        raise FileNotFoundError(
            f"dataset '{name}' not found; give a dataset YAML path or one of: {', '.join(available_datasets())}"
        )
    return found


def load_model_yaml(name: str | Path) -> dict:
    """Read a model YAML into a dict, recording its path under `yaml_file`."""
    from ems_yolo.utils.files import read_yaml_mapping

    path = find_model_yaml(name)
    d = read_yaml_mapping(path, ("nc", "backbone", "head"))
    d["yaml_file"] = str(path)
    return d


# ems-yolo's own keys of each command (everything else of train/val/predict/export is an Ultralytics key).
INFO_KEYS = {
    "model": "model YAML path or built-in name (default ems-res10.yaml)",
    "nc": "number of classes (overrides the YAML)",
    "imgsz": "input size for the GFLOPs count, int or [h, w] (default 640)",
    "time_steps": "simulation time steps T (overrides the YAML)",
    "input": "frames or events (overrides the YAML)",
    "channels": "input channels (events: T x channels per bin)",
    "detailed": "also list every parameter tensor (default False)",
}
ENGINE_KEYS = {
    "model": "model YAML (built-in name or path) or weights (.pt, .onnx, .torchscript); default ems-res10.yaml",
    "time_steps": "simulation time steps T; overrides the model YAML or checkpoint (PyTorch models only)",
    "ann": "build the ANN twin of the model YAML: LIF replaced by ReLU, T=1 (default False)",
    "checkpoint": "train: activation checkpointing, recompute each layer in backward to save memory (default False)",
    "sync_bn": "train, distributed: tdBN statistics over the batches of all processes (default False)",
    "trust": "load a .pt that needs classes outside ems-yolo, Ultralytics and torch.nn (a pickle can run code; "
    "default False)",
    "events": "predict: simulate events from a video source first, then detect on them (default False)",
    "energy": "val: also measure firing rates and the energy estimate on the validation data (default False)",
    "stride_ms": "predict on events: step of the sliding window along a .dat recording (default 50)",
}
# keys that choose the model, not mode settings
MODEL_KEYS = ("model", "time_steps", "ann", "checkpoint", "sync_bn", "trust")
MODE_ONLY_KEYS = {"events": "predict", "stride_ms": "predict", "energy": "val"}  # the one mode each key applies to
MODE_HELP = {
    "train": "Train a spiking detector. data= defaults to the built-in shapes dataset (also data=shapes).",
    "val": "Validate a model (mAP50, mAP50-95; save_json=True adds pycocotools mAP).",
    "predict": "Run detection on images, folders, globs, videos, webcams (source=0), streams or event recordings "
    "(.dat, .raw, .h5); source= is required.",
    "export": "Export to format=onnx or format=torchscript (T unrolled into the graph).",
}
ENERGY_KEYS = {
    "model": "model YAML or .pt (default ems-res10.yaml)",
    "data": "dataset whose validation images drive the firing rates (default: the checkpoint's, else shapes)",
    "imgsz": "input size (default: the training size of a .pt, else 640)",
    "time_steps": "override T",
    "trust": "load a .pt that needs classes outside ems-yolo, Ultralytics and torch.nn (it can run code)",
    "ann": "report the ANN twin itself (ReLU, T=1): every conv is a MAC layer",
    "batch": "images per batch (default 8)",
    "max_batches": "stop after this many batches (default: the whole split)",
    "split": "dataset split (default val)",
    "e_ac": "energy of one accumulate in pJ (default 0.9, 45 nm FP32)",
    "e_mac": "energy of one multiply-accumulate in pJ (default 4.6)",
    "preset": "fp32, fp16 or int8 constants (Horowitz 2014) instead of e_ac/e_mac",
    "project": "output folder parent (default runs/detect)",
    "name": "run folder name (default energy)",
    "device": "cpu or a CUDA device",
}
DATASET_KEYS = {
    "src": "dataset root folder holding train/ val/ test/ with <name>_td.dat (or _td.raw, _td.dat.h5, _td.h5) and "
    "<name>_bbox.npy",
    "dst": "output folder: one HDF5 sample cache per split plus data.yaml (resumed when they exist)",
    "representation": "ems_frames (default, the paper's), histogram or voxel",
    "bins": "time bins per sample = model time steps T (default 5)",
    "window_ms": "window before each label (default 250)",
    "height": "sensor height (default 240 for gen1, 720 for gen4)",
    "width": "sensor width (default 304 for gen1, 1280 for gen4)",
    "cutoff": "histogram count clip / voxel scale (default 10)",
    "bin_ms": "histogram only: length of each bin, for bins spaced apart as RVT's (default window_ms / bins)",
    "spacing_ms": "histogram only: distance between bin ends (default bin_ms); window_ms then defaults to "
    "(bins - 1) x spacing_ms + bin_ms. RVT's Gen1 layout: bin_ms=50 spacing_ms=125 closed=True",
    "closed": "histogram only: each bin also counts the events at its end time, end - bin_ms <= t <= end, as RVT "
    "(default False)",
    "splits": "splits to process (default [train, val, test])",
    "workers": "recordings processed in parallel processes (default 1); the caches are the same for any N",
}
CONVERT_KEYS = {
    "source": "checkpoint written by the original EMS-YOLO code (best.pt / last.pt of its train.py)",
    "out": "ems-yolo checkpoint to write (default <source stem>-ems.pt beside the source)",
    "model": "ems-yolo model YAML the checkpoint must match row for row (its neuron, loss and input settings are "
    "used; default: derived from the checkpoint's own YAML)",
    "time_steps": "simulation time steps T (default 5, the original code's; T is not stored in its checkpoints)",
}
EVENTS_KEYS = {
    "source": "input video (any format OpenCV reads), or an event file to convert or describe (.dat, .raw, .npy)",
    "out": "output .dat or .raw (EVT 2.0) file; for a video the default is <video stem>_td.dat beside it",
    "info": "describe an event file: format, sensor size, duration, event count, rate (default False)",
    "width": "sensor width to resize a video to (default 304); for an event file, its width if the file has none",
    "height": "sensor height to resize a video to (default 240); for an event file, likewise",
    "c_on": "ON contrast threshold in log intensity (default 0.2)",
    "c_off": "OFF contrast threshold (default 0.2)",
    "sigma": "per-pixel threshold spread (default 0)",
    "refractory_us": "refractory period in microseconds (default 0)",
    "noise_hz": "shot-noise events per pixel per second (default 0)",
    "seed": "random seed (default 0)",
    "max_frames": "stop after this many frames",
}


# Value rules of the user-facing keys of every command (ems-yolo's own and the Ultralytics sizes that Ultralytics
# would silently clamp): one check, one message naming the key and what was expected.
_POSITIVE_INT = ("time_steps", "channels", "nc", "epochs", "max_batches", "bins", "height", "width", "max_frames")
_COUNTS = ("workers",)  # integers >= 0
_POSITIVE = ("stride_ms", "window_ms", "bin_ms", "spacing_ms", "cutoff", "c_on", "c_off", "e_ac", "e_mac")
_NON_NEGATIVE = ("sigma", "refractory_us", "noise_hz")
_BOOLS = ("ann", "checkpoint", "sync_bn", "events", "energy", "detailed", "trust", "info", "closed")
_CHOICES = {"input": ("frames", "events"), "preset": ("fp32", "fp16", "int8"), "split": ("train", "val", "test"),
            "representation": ("ems_frames", "histogram", "voxel")}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(key: str, value: Any) -> Any:
    """`value` if it suits `key` (ints stay ints; numbers from text are parsed), else a ValueError naming the key."""
    if value is None:
        return value
    shown = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    if key in _POSITIVE_INT or key in _COUNTS:
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            value = int(value)
        low = 1 if key in _POSITIVE_INT else 0
        if not _is_int(value) or value < low:
            raise ValueError(f"{shown}: expected a {'positive' if low else 'non-negative'} integer")
    elif key in _POSITIVE or key in _NON_NEGATIVE:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        low_ok = number is not None and (number > 0 if key in _POSITIVE else number >= 0)
        if not low_ok or number != number or number == float("inf"):
            raise ValueError(f"{shown}: expected a {'positive' if key in _POSITIVE else 'non-negative'} number")
        value = number
    elif key == "imgsz":
        sizes = value if isinstance(value, (list, tuple)) else [value]
        if not (1 <= len(sizes) <= 2 and all(_is_int(s) and s >= 1 for s in sizes)):
            raise ValueError(f"{shown}: expected a positive integer or [height, width] of positive integers")
    elif key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{shown}: expected True or False")
    elif key in _CHOICES and value not in _CHOICES[key]:
        raise ValueError(f"{shown}: expected one of {', '.join(_CHOICES[key])}")
    return value


def check_values(kv: dict[str, Any]) -> dict[str, Any]:
    """Every key of `kv` checked by `check_value` (keys without a rule pass unchanged)."""
    return {k: check_value(k, v) for k, v in kv.items()}
