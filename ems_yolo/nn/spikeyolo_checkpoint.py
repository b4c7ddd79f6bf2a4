"""Checkpoints of SpikeYOLO's code (BICLab/SpikeYOLO, a fork of Ultralytics 8.0.197) as ems-yolo models.

Its trainer pickles whole `ultralytics.nn.tasks.DetectionModel` objects built from the fork's
`ultralytics.nn.modules.yolo_spikformer` classes (`{'epoch', 'model', 'ema', ...}`; released files went through
`strip_optimizer`: `model` = the EMA model in FP16, `ema` = None). Such a file is read with `inert_load` (nothing of
that code is imported or run). Its pickled YAML rows are translated into ems-yolo rows with the fork's channel and
depth rules (channels written out, so any scale builds exactly), T comes from its `MS_GetT` layer and D from its
neurons' quantiser (`MultiSpike<D>`).

Its Gen1 code (`SpikeYOLO_for_Gen1/`, the same fork with the same module classes and `parse_model`) replaces every
`mem_update` by SpikingJelly's `MultiStepLIFNode(detach_reset=True, v_reset=None)` (tau 2, soft reset by the
spike) from the SpikingJelly 0.0.0.0.12 copy it ships, whose `surrogate.Sigmoid` fires `round(clip(v, 0, 4))`: an
I-LIF with `charge: gen1`, D=4. Its input is T event frames per sample (`[B, T, 3, H, W]`, the 0/127/255 frames of
its pre_gen1.py, ems-yolo's `ems_frames`), so the model reads `input: events` with 3*T channels; T is not in the file
(its `MS_GetT` keeps the YAML's 1): the released Gen1 checkpoint's T=2 unless given. pre_gen1.py makes each sample
of the 250 ms before a label, in T equal bins at the sensor's 240x304 (its arrays are stored x-major and turned
back by its loader): the representation the converted model records, so it predicts on recordings as trained.

Every module of the pickled tree must be one this mapping knows, at the same path and of the mapped class in the
ems-yolo model (ems_yolo/nn/spikeyolo.py keeps the original layout), so the tensors map one-to-one under their own
names; shapes are checked and the first offending key is named.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.nn.modules import DFL, Concat

from ems_yolo.events.representations import EventRepresentation
from ems_yolo.nn.foreign import ForeignCheckpoint, fail, foreign_fields, load_strict, pickled_rows, read_pickled_model
from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.inert_pickle import InertObject
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.parser import make_divisible
from ems_yolo.nn.spikeyolo import (
    BNAndPad,
    RepConv,
    SepRepConv,
    SpikeAllConvBlock,
    SpikeConv,
    SpikeConvBlock,
    SpikeConvNoBN,
    SpikeDetect,
    SpikeDownsample,
    SpikeSepConv,
    SpikeSPPF,
    TimeRepeat,
)

SPIKEYOLO_MODEL = "ultralytics.nn.tasks.DetectionModel"
SPIKEYOLO_PACKAGE = "ultralytics.nn.modules.yolo_spikformer."
SPIKEYOLO_CODE = "SpikeYOLO's trainer (BICLab/SpikeYOLO)"
SPIKEYOLO_TAU = 0.25  # the fork's module-level `decay`, not stored in checkpoints
GEN1_NEURON = "spikingjelly.clock_driven.neuron.MultiStepLIFNode"
GEN1_SURROGATE = "spikingjelly.clock_driven.surrogate.Sigmoid"  # the shipped copy's: fires round(clip(v, 0, 4))
GEN1_LEVELS = 4
GEN1_TIME_STEPS = 2  # the released Gen1 checkpoint's T (their README: 23M, T=2, D=4); not stored in the file
GEN1_WINDOW_US = 250_000  # pre_gen1.py's sample_size: the events before each label that make one sample
# the SpikingJelly settings of the Gen1 neuron this mapping reads as `charge: gen1` (the state or memory entry)
GEN1_SETTINGS = {"tau": 2.0, "decay_input": True, "v_reset": None, "v_threshold": 1.0}

# the fork's YAML module names -> ems-yolo's
ROW_MODULES = {
    "MS_GetT": "TimeRepeat",
    "MS_DownSampling": "SpikeDownsample",
    "MS_AllConvBlock": "SpikeAllConvBlock",
    "MS_ConvBlock": "SpikeConvBlock",
    "SpikeSPPF": "SpikeSPPF",
    "MS_StandardConv": "SpikeConv",
    "SpikeConv": "SpikeConv",
    "nn.Upsample": "nn.Upsample",
    "Concat": "Concat",
    "SpikeDetect": "SpikeDetect",
}

# every class of a pickled module tree -> the ems-yolo class at the same path
_TORCH = "torch.nn.modules."
MODULE_CLASSES: dict[str, type] = {
    **{SPIKEYOLO_PACKAGE + k: v for k, v in {
        "MS_GetT": TimeRepeat, "MS_DownSampling": SpikeDownsample, "MS_AllConvBlock": SpikeAllConvBlock,
        "MS_ConvBlock": SpikeConvBlock, "SpikeSPPF": SpikeSPPF, "MS_StandardConv": SpikeConv, "SpikeConv": SpikeConv,
        "SpikeConvWithoutBN": SpikeConvNoBN, "SpikeDetect": SpikeDetect, "SepConv": SpikeSepConv,
        "SepRepConv": SepRepConv, "RepConv": RepConv, "BNAndPadLayer": BNAndPad, "mem_update": ILIF,
    }.items()},
    GEN1_NEURON: ILIF,  # the Gen1 code's neuron: ILIF with charge gen1
    SPIKEYOLO_PACKAGE + "SpikeDFL": DFL,  # Ultralytics' DFL; SpikeDFL's neuron, never called, is dropped
    "ultralytics.nn.modules.conv.Concat": Concat,
    _TORCH + "batchnorm.BatchNorm2d": nn.BatchNorm2d,
    _TORCH + "conv.Conv2d": nn.Conv2d,
    _TORCH + "container.Sequential": nn.Sequential,
    _TORCH + "container.ModuleList": nn.ModuleList,
    _TORCH + "pooling.MaxPool2d": nn.MaxPool2d,
    _TORCH + "upsampling.Upsample": nn.Upsample,
}
QUANTISERS = {f"{SPIKEYOLO_PACKAGE}MultiSpike{d}": d for d in (1, 2, 4, 8)}  # mem_update.qtrick -> D


@dataclass
class SpikeYOLOCheckpoint(ForeignCheckpoint):
    """A SpikeYOLO checkpoint read as data (`ForeignCheckpoint`), with T, D and the neuron's charge ("leak": the
    COCO code's `mem_update`; "gen1": the Gen1 code's SpikingJelly node)."""

    time_steps: int
    levels: int
    charge: str


def is_spikeyolo_globals(names: set[str] | list[str]) -> bool:
    """Whether the globals a pickle names (torch.serialization.get_unsafe_globals_in_checkpoint) are SpikeYOLO's."""
    return SPIKEYOLO_MODEL in names and any(n.startswith(SPIKEYOLO_PACKAGE) for n in names)


def _row_name(modules: dict[str, InertObject], path: str) -> str:
    """'model row i (Class)' for a module path inside row i."""
    parts = path.split(".")
    if len(parts) < 2:
        return f"module '{path}'"
    layer = modules.get(".".join(parts[:2]))
    return f"model row {parts[1]} ({getattr(layer, 'global_name', '?').rsplit('.', 1)[-1]})"


def _dropped(modules: dict[str, InertObject], name: str) -> bool:
    """Modules with no ems-yolo counterpart and no tensors: a neuron's quantiser or surrogate (its D is read) and
    SpikeDFL's neuron, which its forward never calls (with everything below them)."""
    while "." in name:
        parent = modules.get(name.rsplit(".", 1)[0])
        leaf = name.rsplit(".", 1)[1]
        if parent is not None and ((parent.global_name.endswith(".mem_update") and leaf == "qtrick")
                                   or (parent.global_name == GEN1_NEURON and leaf == "surrogate_function")
                                   or (parent.global_name.endswith(".SpikeDFL") and leaf == "lif")):
            return True
        name = name.rsplit(".", 1)[0]
    return False


def read_spikeyolo(path: str | Path) -> SpikeYOLOCheckpoint:
    """Read a SpikeYOLO checkpoint without executing it; errors name the file and what is wrong."""
    path = Path(path)
    ckpt, source, model = read_pickled_model(path, SPIKEYOLO_MODEL, SPIKEYOLO_CODE,
                                             f"SpikeYOLO's {SPIKEYOLO_MODEL}")
    cfg = model.attr("yaml")
    if not (isinstance(cfg, dict) and all(k in cfg for k in ("nc", "backbone", "head"))):
        raise fail(path, "the pickled model has no YAML dict with nc, backbone and head")
    nc = cfg["nc"]
    if not (isinstance(nc, int) and not isinstance(nc, bool) and nc >= 1):
        raise fail(path, f"the pickled YAML's nc is {nc!r}, expected a positive integer")
    fields = foreign_fields(path, ckpt, source, model, cfg, cfg.get("yaml_file"))
    modules = fields["modules"]
    for name, m in modules.items():
        if name and not _dropped(modules, name) and m.global_name not in MODULE_CLASSES:
            raise fail(path, f"{_row_name(modules, name)}: module class {m.global_name} (at '{name}') has no ems-yolo "
                             "counterpart")
    settings = {_neuron_setting(path, modules, name) for name, m in modules.items()
                if m.global_name.endswith((".mem_update", GEN1_NEURON)) and not _dropped(modules, name)}
    if len(settings) != 1:
        raise fail(path, f"the neurons are {sorted(settings) or 'none'} ((charge, D) pairs), expected one kind")
    charge, levels = settings.pop()
    getter = modules.get("model.0")
    T = getter.attr("T") if getter is not None and getter.global_name.endswith(".MS_GetT") else None
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 1):
        raise fail(path, f"model row 0 is {getattr(getter, 'global_name', 'missing')} with T={T!r}, expected "
                         "MS_GetT with a positive integer T")
    return SpikeYOLOCheckpoint(**fields, time_steps=GEN1_TIME_STEPS if charge == "gen1" else T, levels=levels,
                               charge=charge)


def _neuron_setting(path: Path, modules: dict[str, InertObject], name: str) -> tuple[str, int]:
    """(charge, D) of a pickled neuron: `mem_update` with its `MultiSpike<D>` quantiser, or the Gen1 code's
    SpikingJelly node with the settings and surrogate its code builds."""
    m = modules[name]
    children = m.attr("_modules") or {}
    if m.global_name == GEN1_NEURON:
        memories = m.attr("_memories") or {}
        for key, expected in GEN1_SETTINGS.items():
            value = memories.get(key, m.attr(key)) if key in ("v_reset", "v_threshold") else m.attr(key)
            if value != expected or type(value) is not type(expected):
                raise fail(path, f"{_row_name(modules, name)}: neuron '{name}' ({GEN1_NEURON}) has {key}={value!r}, "
                                 f"expected {expected!r} as SpikeYOLO's Gen1 code builds it")
        surrogate = children.get("surrogate_function")
        if getattr(surrogate, "global_name", "") != GEN1_SURROGATE or surrogate.attr("spiking") is not True:
            raise fail(path, f"{_row_name(modules, name)}: neuron '{name}' fires through "
                             f"{getattr(surrogate, 'global_name', surrogate)!r}, expected {GEN1_SURROGATE} (spiking)")
        return "gen1", GEN1_LEVELS
    q = children.get("qtrick")
    d = QUANTISERS.get(getattr(q, "global_name", ""))
    if d is None:
        raise fail(path, f"{_row_name(modules, name)}: neuron '{name}' quantises with "
                         f"{getattr(q, 'global_name', q)!r}, expected one of {sorted(QUANTISERS)}")
    return "leak", d


def _scaling(sy: SpikeYOLOCheckpoint) -> tuple[float, float, float]:
    """(depth, width, max_channels) as the fork's parse_model takes them: the YAML's scale, else its multiples."""
    cfg = sy.yaml
    depth, width, max_c = cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float("inf")
    scales = cfg.get("scales")
    if scales:
        scale = cfg.get("scale") or next(iter(scales))
        if not (isinstance(scales, dict) and scale in scales and len(scales[scale]) == 3):
            raise fail(sy.path, f"the pickled YAML's scale {scale!r} is not one of its scales {scales!r:.80}")
        depth, width, max_c = scales[scale]
    for key, v in (("depth", depth), ("width", width), ("max_channels", max_c)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise fail(sy.path, f"the pickled YAML's {key} is {v!r}, expected a positive number")
    return depth, width, max_c


def translate_rows(sy: SpikeYOLOCheckpoint) -> list[list]:
    """The pickled YAML rows as ems-yolo rows with the fork's channel rules applied (widths written out)."""
    depth, width, max_c = _scaling(sy)
    rows = []
    for i, row in pickled_rows(sy.path, sy.yaml):
        f, n, name, args = row
        ours = ROW_MODULES.get(name if isinstance(name, str) else "")
        if ours is None:
            raise fail(sy.path, f"model row {i} uses SpikeYOLO's module '{name}', which has no ems-yolo counterpart "
                                f"(known: {sorted(ROW_MODULES)})")
        n = max(round(n * depth), 1) if n > 1 else n
        layer = sy.modules.get(f"model.{i}")
        kind = "Sequential" if n > 1 else name.rsplit(".", 1)[-1]
        if layer is None or layer.global_name.rsplit(".", 1)[-1] != kind:
            raise fail(sy.path, f"model row {i} names {name} x{n}, but the pickled layer {i} is "
                                f"{getattr(layer, 'global_name', 'missing')}")
        try:
            args = _translate_args(name, list(args), width, max_c, sy.yaml["nc"])
        except (ValueError, TypeError, IndexError, SyntaxError):
            raise fail(sy.path, f"model row {i} {name}{row[3]}: arguments ems-yolo does not support") from None
        rows.append([f, n, ours, args])
    return rows


def _translate_args(name: str, args: list, width: float, max_c: float, nc: int) -> list:
    """One row's arguments in ems-yolo's form (output channels first where the row has them)."""
    if name == "MS_GetT":
        return []
    if name == "MS_DownSampling":
        return [int(args[0] * width), *args[1:5]]
    if name in ("MS_AllConvBlock", "MS_ConvBlock"):
        if len(args) > 2:
            raise ValueError(name)
        return list(args)
    if name == "MS_StandardConv":
        if len(args) > 3:
            raise ValueError(name)
        return [min(int(args[0] * width), int(max_c * width)), *args[1:]]
    if name in ("SpikeSPPF", "SpikeConv"):
        c2 = args[0] if args[0] == nc else make_divisible(min(args[0], max_c) * width, 8)
        return [c2, *args[1:]]
    if name == "nn.Upsample":
        size, scale, mode = (args + [None, None, "nearest"][len(args):])[:3]
        scale = ast.literal_eval(scale) if isinstance(scale, str) else scale
        if size not in (None, "None") or not (isinstance(scale, (list, tuple)) and len(scale) == 3 and scale[0] == 1
                                              and scale[1] == scale[2]):
            raise ValueError(name)
        return [None, scale[1], mode]
    if name == "Concat":
        if args != [2]:
            raise ValueError(name)
        return [1]  # the fork concatenates [T, B, C, H, W] on dim 2; ems-yolo's [T*B, C, H, W] on dim 1
    return args  # SpikeDetect [nc]: 'nc' stays a name, so that training on other data changes it


def ems_model_yaml(sy: SpikeYOLOCheckpoint, time_steps: int | None = None, base: dict | None = None) -> dict:
    """An ems-yolo model YAML for the checkpoint: `base` (an ems-yolo YAML; its rows are then checked through the
    strict tensor mapping) or the translated rows; classes, T and D from the checkpoint unless `time_steps` is given."""
    if base is not None:
        cfg = {k: v for k, v in base.items()}
    else:
        rows = translate_rows(sy)
        nb = len(sy.yaml["backbone"])
        stem = Path(sy.yaml_file or sy.path.name).stem
        cfg = {"depth_multiple": 1.0, "width_multiple": 1.0, "backbone": rows[:nb], "head": rows[nb:],
               "yaml_file": f"spikeyolo-{stem}.yaml", "input": "frames"}
    neuron = {k: v for k, v in (cfg.get("neuron") or {}).items() if k not in ("tau", "charge")}
    neuron.update({"kind": "ilif", "levels": sy.levels},
                  **({"charge": "gen1"} if sy.charge == "gen1" else {"tau": SPIKEYOLO_TAU}))
    ch = sy.yaml.get("ch", 3)
    ch = ch if isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1 else 3
    T = int(time_steps or sy.time_steps)
    gen1 = sy.charge == "gen1"  # T event frames of `ch` channels each, time-major (their [B, T, C, H, W])
    cfg.update(nc=int(sy.yaml["nc"]), time_steps=T, neuron=neuron, channels=ch * T if gen1 else ch,
               input="events" if gen1 else cfg.get("input", "frames"))
    if gen1:
        cfg["events"] = EventRepresentation(bins=T, window_us=GEN1_WINDOW_US).to_dict()  # Gen1 sensor: 240x304
    return cfg


def check_module_tree(sy: SpikeYOLOCheckpoint, model: nn.Module) -> None:
    """Every pickled module is found at the same path in `model` as the class it maps to (BNAndPad: with the same
    border); errors name the row and the class."""
    ours = dict(model.named_modules())
    for name, m in sy.modules.items():
        if not name or _dropped(sy.modules, name):
            continue
        cls = MODULE_CLASSES[m.global_name]  # known: read_spikeyolo checked every class
        row = _row_name(sy.modules, name)
        mine = ours.get(name)
        if mine is None or not isinstance(mine, cls):
            raise fail(sy.path, f"{row}: '{name}' is a {m.global_name}, the ems-yolo model has "
                                f"{type(mine).__name__ if mine is not None else 'nothing'} there")
        if isinstance(mine, BNAndPad) and m.attr("pad_pixels") != mine.pad:
            raise fail(sy.path, f"{row}: '{name}' pads {m.attr('pad_pixels')!r} pixels, ems-yolo's {mine.pad}")


def model_from_spikeyolo(sy: SpikeYOLOCheckpoint, time_steps: int | None = None,
                         base: dict | None = None) -> EMSDetectionModel:
    """The ems-yolo model of a SpikeYOLO checkpoint with every tensor loaded (float32, eval mode)."""
    cfg = ems_model_yaml(sy, time_steps, base)
    try:
        model = EMSDetectionModel(cfg, verbose=False)
    except ValueError as e:
        raise fail(sy.path, f"its model cannot be built in ems-yolo: {e}") from None
    load_into(sy, model)
    return model.float().eval()


def load_into(sy: SpikeYOLOCheckpoint, model: EMSDetectionModel) -> None:
    """Check the module tree and the strides, load every tensor under its own name (strictly) and the class names."""
    check_module_tree(sy, model)
    ours = model.state_dict()
    load_strict(sy.path, model, sy.tensors, {k: k for k in sy.tensors if k in ours}, sy.modules)
    if sy.stride and [float(s) for s in model.stride] != sy.stride:
        raise fail(sy.path, f"strides {sy.stride} differ from the ems-yolo model's {model.stride.tolist()}")
    model.names = dict(sy.names)


def load_spikeyolo(path: str | Path, time_steps: int | None = None,
                   base: dict | None = None) -> tuple[EMSDetectionModel, SpikeYOLOCheckpoint]:
    """Read a SpikeYOLO checkpoint and build its ems-yolo model."""
    sy = read_spikeyolo(path)
    return model_from_spikeyolo(sy, time_steps, base), sy
