"""ems-yolo's configuration (`ems_yolo.cfg`): the shipped model and dataset YAMLs, where they are found, the
ems-yolo keys of every command and the training defaults of the EMS-YOLO recipe.

This folder is the top-level `cfg/` of a source checkout and the package `ems_yolo.cfg` of an installed wheel
(setup.cfg maps one onto the other), so the YAMLs beside this file are found the same way in both.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from ems_yolo.utils.settings import ems_home, runs_dir  # noqa: F401  (ems_home: re-exported)

CFG_DIR = Path(__file__).resolve().parent
MODELS_DIR = CFG_DIR / "models"
DATASETS_DIR = CFG_DIR / "datasets"

BUILTIN_DATA = "shapes"  # generated frame dataset, the default of `train`
SYNTHETIC_GEN1 = "gen1-synthetic"  # generated Gen1-shaped event dataset
SYNTHETIC_GEN4 = "gen4-synthetic"  # generated 1 Mpx-shaped event dataset
EVENT_SUFFIXES = (".dat", ".raw", ".h5", ".hdf5")  # prediction sources read as events
EVENT_CACHE_SUFFIXES = (".h5", ".hdf5")  # dataset splits that are event sample caches
DEFAULT_MODEL = "ems-res10.yaml"
# The export formats ems-yolo supports and tests (format=). Not OpenVINO: its CPU runtime computes in bfloat16 by
# default on CPUs that have it, which flips spikes (outputs off by pixels where float32 agrees to 1e-4).
EXPORT_FORMATS = ("onnx", "torchscript")
# the packages each export format needs beyond torch, and the extra of ems-yolo that installs them
EXPORT_PACKAGES = {"onnx": (("onnx", "onnxruntime", "onnxslim"), "export")}
BENCHMARK_FORMATS = ("pytorch", *EXPORT_FORMATS)  # what `benchmark` measures (format=, default all)
ONNX_OPSETS = (11, 22)  # the ONNX opsets ems-yolo's export is tested with, lowest and highest (opset=)

# Validation (and prediction) defaults that differ from Ultralytics': the original code's NMS IoU (its val.py;
# Ultralytics uses 0.7), so predict shows the boxes val scores.
# The original scores its final COCO result with iou=0.65 (README: the reproduction command).
EMS_VAL_DEFAULTS: dict[str, Any] = {"iou": 0.6}
# Training defaults that differ from Ultralytics' to follow the EMS-YOLO recipe (model-spec §9); `iou` is that of
# the validation after every epoch.
EMS_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "SGD", "lrf": 0.1, "cos_lr": True, "close_mosaic": 0,
                                      **EMS_VAL_DEFAULTS}
# First runs that finish: the generated datasets train at their own image size (shapes: 160 px images; the Gen1
# sensor is 304x240, so 320; the 1 Mpx caches are 640x360, so 640) for an epoch count that ends in minutes on a
# 2-core CPU (EMS-ResNet10: about 5 minutes each). An imgsz= or epochs= the user sets always wins.
BUILTIN_TRAIN_DEFAULTS: dict[str, dict[str, int]] = {
    BUILTIN_DATA: {"imgsz": 160, "epochs": 10},
    SYNTHETIC_GEN1: {"imgsz": 320, "epochs": 8},
    SYNTHETIC_GEN4: {"imgsz": 640, "epochs": 10},
}
# A training run estimated longer than this on the CPU logs a WARNING with a command that ends within QUICK_RUN_MIN.
LONG_RUN_MIN = 15.0
QUICK_RUN_MIN = 10.0


def builtin_train_defaults(data: Any, user_keys: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
    """The imgsz/epochs defaults of a generated dataset (`data` None, a name of BUILTIN_TRAIN_DEFAULTS, with or
    without .yaml), without the keys in `user_keys`; {} for any other data."""
    name = BUILTIN_DATA if data is None else str(data).removesuffix(".yaml")
    return {k: v for k, v in BUILTIN_TRAIN_DEFAULTS.get(name, {}).items() if k not in user_keys}


def default_project() -> str:
    """Run folders go to <runs_dir>/detect: ./runs/detect, as Ultralytics users expect, unless ems-yolo's own
    settings (`ems-yolo settings runs_dir=...`) name another folder."""
    return str(runs_dir() / "detect")


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
    "cuda_graph": "predict: replay the model from a CUDA graph once an input shape repeats (batch-1 latency of "
    "videos, streams and event recordings; default on with a CUDA device, True elsewhere is an error)",
    "spike_driven": "export: the spike-driven form of an I-LIF model, integer spikes 0..D at T steps as 0/1 spikes at "
    "T x D sub-steps, so spike-fed convs only add (default False)",
}
# keys that choose the model, not mode settings
MODEL_KEYS = ("model", "time_steps", "ann", "checkpoint", "sync_bn", "trust")
# the one mode each key applies to (the others' help does not list it, their command lines refuse it)
MODE_ONLY_KEYS = {"events": "predict", "stride_ms": "predict", "cuda_graph": "predict", "energy": "val",
                  "checkpoint": "train", "sync_bn": "train", "spike_driven": "export"}
MODE_HELP = {
    "train": "Train a spiking detector. data= defaults to the built-in shapes dataset (also data=shapes). The "
    "generated datasets (shapes, gen1-synthetic, gen4-synthetic) train at their own size for a few CPU minutes "
    "unless imgsz= or epochs= is given; a long CPU run is a WARNING naming a command that ends in minutes.",
    "val": "Validate a model (mAP50, mAP50-95; save_json=True adds pycocotools mAP).",
    "predict": "Run detection on images, folders, globs, videos, webcams (source=0), streams or event recordings "
    "(.dat, .raw, .h5); source= is required.",
    "track": "Track objects across the frames of a video or stream with Ultralytics' trackers (tracker=botsort.yaml, "
    "the default, or tracker=bytetrack.yaml; needs lap: pip install 'ems-yolo[track]'); source= is required.",
    "export": f"Export to format={' or format='.join(EXPORT_FORMATS)} (T unrolled into the graph; onnx: opset "
    f"{ONNX_OPSETS[0]} to {ONNX_OPSETS[1]}).",
}
ENERGY_KEYS = {
    "model": "model YAML or .pt (default ems-res10.yaml)",
    "data": "dataset whose validation images drive the firing rates (default: the checkpoint's, else shapes)",
    "imgsz": "input size (default: the training size of a .pt, else 640)",
    "time_steps": "override T",
    "trust": "load a .pt that needs classes outside ems-yolo, Ultralytics and torch.nn (it can run code)",
    "ann": "report the ANN twin itself (ReLU, T=1): every conv is a MAC layer",
    "spike_driven": "report the spike-driven form of an I-LIF model (0/1 spikes at T x D sub-steps; default False)",
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
BENCHMARK_KEYS = {
    "model": "model YAML or .pt (default ems-res10.yaml); a YAML is built for the data's classes, untrained",
    "data": "dataset to validate each format on (default: the checkpoint's, else shapes); never downloaded",
    "imgsz": "input size (default: the training size of a .pt, else 640)",
    "format": f"one of {', '.join(BENCHMARK_FORMATS)} (default: all of them)",
    "time_steps": "override T",
    "trust": "load a .pt that needs classes outside ems-yolo, Ultralytics and torch.nn (it can run code)",
    "device": "cpu or a CUDA device",
    "project": "output folder parent (default runs/detect)",
    "name": "run folder name (default benchmark)",
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
    "source": "checkpoint written by the original EMS-YOLO code (best.pt / last.pt of its train.py) or by SpikeYOLO's "
    "code (BICLab/SpikeYOLO: its released weights, best.pt / last.pt of its trainer)",
    "out": "ems-yolo checkpoint to write (default <source stem>-ems.pt beside the source)",
    "model": "ems-yolo model YAML the checkpoint must match row for row (its neuron, loss and input settings are "
    "used; default: derived from the checkpoint's own YAML)",
    "time_steps": "simulation time steps T (default: EMS-YOLO 5, the original code's, as T is not stored in its "
    "checkpoints; SpikeYOLO the file's own)",
}
EVENTS_KEYS = {
    "source": "input video (any format OpenCV reads), or an event file to convert or describe (.dat, .raw, .npy)",
    "out": "output .dat or .raw (EVT 2.0) file; for a video the default is runs/events/<video stem>_td.dat (under "
    "the runs_dir setting)",
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
_POSITIVE_INT = ("time_steps", "channels", "nc", "epochs", "max_batches", "bins", "height", "width", "max_frames",
                 "cutoff", "iterations")
_COUNTS = ("workers",)  # integers >= 0
_POSITIVE = ("stride_ms", "window_ms", "bin_ms", "spacing_ms", "c_on", "c_off", "e_ac", "e_mac", "depth_multiple",
             "width_multiple")
_NON_NEGATIVE = ("sigma", "refractory_us", "noise_hz")
_BOOLS = ("ann", "checkpoint", "sync_bn", "events", "energy", "detailed", "trust", "info", "closed", "cuda_graph",
          "spike_driven")
_CHOICES = {"input": ("frames", "events"), "preset": ("fp32", "fp16", "int8"), "split": ("train", "val", "test"),
            "representation": ("ems_frames", "histogram", "voxel"), "format": EXPORT_FORMATS}
# Smallest values with a meaning: event times are whole microseconds, so a step or window under 1 us is zero.
_MINIMUM = {"stride_ms": 0.001, "window_ms": 0.001, "bin_ms": 0.001, "spacing_ms": 0.001}
# Upper bounds: an absurd size is one line before anything allocates (plain limits; model memory is estimated when
# a model is built, sensor sizes when an event file is opened).
_MAXIMUM = {"time_steps": 1024, "bins": 1024, "imgsz": 8192, "height": 8192, "width": 8192, "channels": 4096,
            "nc": 100_000, "batch": 4096, "workers": 256, "cutoff": 65_535, "depth_multiple": 16, "width_multiple": 16,
            "stride_ms": 86_400_000, "window_ms": 86_400_000, "bin_ms": 86_400_000,
            "spacing_ms": 86_400_000}  # a day in ms
AUTOBATCH_MODES = ("train",)  # where Ultralytics' batch=-1 or a fraction in (0, 1) sizes the batch to the GPU


def _integer(value: Any) -> int | None:
    """`value` as an int when it is one, an integral float (10.0) or the text of either; else None."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and value == int(value) else None


def _number(value: Any) -> float | None:
    """`value` as a finite float (also from text); else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _range(key: str) -> str:
    """The bounds of `key` beyond its sign, as words: ' of at least 0.001', ' up to 1024'."""
    low = f" of at least {_MINIMUM[key]:g}" if key in _MINIMUM else ""
    high = f" up to {_MAXIMUM[key]:,}" if key in _MAXIMUM else ""
    return low + (" and" if low and high else "") + high


def _check_batch(shown: str, value: Any, mode: str) -> int | float:
    """`batch`: a positive integer; in training also Ultralytics' AutoBatch values (-1, a GPU memory fraction)."""
    autobatch = mode in AUTOBATCH_MODES
    if autobatch and (value == -1 or isinstance(value, float) and 0 < value < 1):
        return value
    batch = _integer(value)
    if batch is None or not 1 <= batch <= _MAXIMUM["batch"]:
        extra = ", -1 or a fraction in (0, 1) (Ultralytics' AutoBatch)" if autobatch else ""
        raise ValueError(f"{shown}: expected a positive integer up to {_MAXIMUM['batch']:,}{extra}")
    return batch


def check_value(key: str, value: Any, mode: str = "") -> Any:
    """`value` if it suits `key` (integral numbers become ints, numbers from text are parsed), else a ValueError
    naming the key; `mode` is the command (train accepts Ultralytics' AutoBatch values of `batch`)."""
    if value is None:
        return value
    shown = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    if key in _POSITIVE_INT or key in _COUNTS:
        low = 1 if key in _POSITIVE_INT else 0
        number = _integer(value)
        if number is None or number < low or number > _MAXIMUM.get(key, number):
            raise ValueError(f"{shown}: expected a {'positive' if low else 'non-negative'} integer{_range(key)}")
        value = number
    elif key in _POSITIVE or key in _NON_NEGATIVE:
        number = _number(value)
        low = _MINIMUM.get(key, 0.0)
        strict = key in _POSITIVE and key not in _MINIMUM  # > 0, else >= the minimum
        if number is None or number > _MAXIMUM.get(key, number) or (number <= low if strict else number < low):
            note = " (times are whole microseconds)" if key in _MINIMUM else ""
            raise ValueError(f"{shown}: expected a {'positive' if key in _POSITIVE else 'non-negative'} number"
                             f"{_range(key)}{note}")
        value = number
    elif key == "imgsz":
        sizes = [_integer(s) for s in (value if isinstance(value, (list, tuple)) else [value])]
        if not (1 <= len(sizes) <= 2 and all(s is not None and 1 <= s <= _MAXIMUM["imgsz"] for s in sizes)):
            raise ValueError(f"{shown}: expected a positive integer or [height, width] of positive integers, "
                             f"up to {_MAXIMUM['imgsz']:,}")
        value = sizes if isinstance(value, (list, tuple)) else sizes[0]
    elif key == "batch":
        value = _check_batch(shown, value, mode)
    elif key == "opset":
        opset = _integer(value)
        if opset is None or not ONNX_OPSETS[0] <= opset <= ONNX_OPSETS[1]:
            raise ValueError(f"{shown}: expected an ONNX opset from {ONNX_OPSETS[0]} to {ONNX_OPSETS[1]}")
        value = opset
    elif key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{shown}: expected True or False")
    elif key in _CHOICES:
        choices = BENCHMARK_FORMATS if key == "format" and mode == "benchmark" else _CHOICES[key]
        if str(value).lower() not in choices:
            what = " (the formats ems-yolo exports and tests)" if key == "format" else ""
            raise ValueError(f"{shown}: expected one of {', '.join(choices)}{what}")
        value = str(value).lower()
    elif key == "cfg":
        check_cfg_file(value, mode)
    return value


def check_values(kv: dict[str, Any], mode: str = "") -> dict[str, Any]:
    """Every key of `kv` checked by `check_value` (keys without a rule pass unchanged)."""
    return {k: check_value(k, v, mode) for k, v in kv.items()}


def check_cfg_file(path: str | Path, mode: str = "") -> dict[str, Any]:
    """The settings of a `cfg=` YAML, each checked as the same key on the command line; errors name the file."""
    from ems_yolo.utils.files import read_yaml_mapping

    settings = read_yaml_mapping(Path(path).expanduser())
    try:
        return check_values(settings, mode)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
