"""Checkpoints of the original EMS-YOLO code (BICLab/EMS-YOLO, a YOLOv3/v5-era fork) as ems-yolo models.

The original `train.py` pickles whole `models.yolo.Model` objects (`{'epoch', 'best_fitness', 'model', 'ema', ...}`;
released files went through `strip_optimizer`: `model` = the EMA model in FP16, `ema` = None). Such a file is read
with `inert_load` (nothing of the original code is imported or run), its pickled YAML rows are translated row for
row into an ems-yolo model YAML, and every tensor is mapped one-to-one onto that model, shapes checked. Anchors,
names and strides come from the checkpoint (AutoAnchor may have changed the anchors during training). T is not in
the file: the original keeps it in a global (`time_window`, 5).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ems_yolo.nn.foreign import ForeignCheckpoint, fail, foreign_fields, load_strict, pickled_rows, read_pickled_model
from ems_yolo.nn.model import EMSDetectionModel

ORIGINAL_TIME_STEPS = 5  # the original code's global `time_window`
ORIGINAL_MODEL = "models.yolo.Model"

_RESIDUAL = {  # residual_function = (LIF, conv, BN, LIF, conv, BN) -> residual = (LCB, LCB)
    "residual_function.1.": "residual.0.conv.",
    "residual_function.2.bn.": "residual.0.bn.",
    "residual_function.4.": "residual.1.conv.",
    "residual_function.5.bn.": "residual.1.bn.",
}
_CONV_BN = {"conv.": "conv.", "bn.bn.": "bn."}
# shortcut layouts: MaxPool, LIF, conv, BN (BasicBlock_1/_2); LIF, conv, BN before the pool (concat blocks);
# MaxPool, conv, BN (BasicBlock_ms)
_FULL_SPIKE_SHORTCUT = {"shortcut.2.": "shortcut.1.conv.", "shortcut.3.bn.": "shortcut.1.bn."}
_CONCAT_SHORTCUT = {"shortcut.1.": "new.conv.", "shortcut.2.bn.": "new.bn."}
_MS_SHORTCUT = {"shortcut.1.": "shortcut.1.", "shortcut.2.bn.": "shortcut.2."}


@dataclass(frozen=True)
class OriginalModule:
    """How one module of the original code becomes an ems-yolo row: our module name, the original arguments it
    accepts (after c2), fixed arguments appended to ours, and the key prefixes of its state."""

    ours: str
    max_args: int
    extra: tuple = ()
    keys: dict = field(default_factory=dict)


ORIGINAL_MODULES: dict[str, OriginalModule] = {
    "Conv_1": OriginalModule("EncodingConv", 3, keys=_CONV_BN),
    "Conv_2": OriginalModule("EncodingConv", 3, keys=_CONV_BN),
    "Conv": OriginalModule("SiLUConv", 3, keys=_CONV_BN),
    "ConcatBlock_ms": OriginalModule("EMSBlock2", 3, (0.5,), {**_RESIDUAL, **_CONCAT_SHORTCUT}),
    "Concat_res2": OriginalModule("EMSBlock2", 3, (1.0,), {**_RESIDUAL, **_CONCAT_SHORTCUT}),  # its e is unused
    "BasicBlock_2": OriginalModule("EMSBlock1", 3, keys={**_RESIDUAL, **_FULL_SPIKE_SHORTCUT}),
    "BasicBlock_1": OriginalModule("WideBlock", 2, keys={**_RESIDUAL, **_FULL_SPIKE_SHORTCUT}),  # (c2, stride)
    "BasicBlock_ms": OriginalModule("MSBlock", 3, keys={**_RESIDUAL, **_MS_SHORTCUT}),
    "Sample": OriginalModule("nn.Upsample", 3),
    "Concat": OriginalModule("Concat", 1),
    "Detect": OriginalModule("EMSDetect", 2, keys={"anchors": "anchor_grid", "m.": "m."}),
}


class OriginalCheckpoint(ForeignCheckpoint):
    """What an original checkpoint holds, read as data (`ForeignCheckpoint`)."""


def is_original_checkpoint(path: str | Path) -> bool:
    """Whether a file is a zip-format `torch.save` file that pickles the original code's `models.yolo.Model`
    (decided from the globals its pickle names; nothing is unpickled)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy, truncated, or not a torch file): not ours to decide
        return False
    return ORIGINAL_MODEL in names


def read_original(path: str | Path) -> OriginalCheckpoint:
    """Read an original EMS-YOLO checkpoint without executing it; errors name the file and what is missing."""
    path = Path(path)
    ckpt, source, model = read_pickled_model(path, ORIGINAL_MODEL, "the original EMS-YOLO train.py",
                                            f"the original code's {ORIGINAL_MODEL}")
    cfg = model.attr("yaml")
    if not (isinstance(cfg, dict) and all(k in cfg for k in ("nc", "anchors", "backbone", "head"))):
        raise fail(path, "the pickled model has no YAML dict with nc, anchors, backbone and head")
    for key in ("nc", "ch"):
        value = cfg.get(key, 3)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise fail(path, f"the pickled YAML's {key} is {value!r}, expected a positive integer")
    for key in ("depth_multiple", "width_multiple"):
        value = cfg.get(key, 1.0)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
            raise fail(path, f"the pickled YAML's {key} is {value!r}, expected a positive number")
    return OriginalCheckpoint(**foreign_fields(path, ckpt, source, model, cfg, model.attr("yaml_file")))


def _none(a):
    return None if a == "None" else a


def translate_rows(orig: OriginalCheckpoint) -> list[list]:
    """The pickled YAML rows as ems-yolo rows (module names, argument lists, channel axis of Concat)."""
    rows = []
    for i, row in pickled_rows(orig.path, orig.yaml):
        f, n, name, args = row
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (f if isinstance(f, list) else [f])):
            raise fail(orig.path, f"model row {i} of the pickled YAML is {row!r}, expected 'from' as layer "
                                   f"indices, got {f!r}")
        spec = ORIGINAL_MODULES.get(name if isinstance(name, str) else "")
        if spec is None:
            raise fail(orig.path, f"model row {i} uses the original module '{name}', which has no ems-yolo "
                                   f"counterpart (known: {sorted(ORIGINAL_MODULES)})")
        layer = orig.modules.get(f"model.{i}")
        kind = "Sequential" if n > 1 else name
        if layer is None or layer.global_name.rsplit(".", 1)[-1] != kind:
            raise fail(orig.path, f"model row {i} names {name}, but the pickled layer {i} is "
                                   f"{getattr(layer, 'global_name', 'missing')}")
        if len(args) > spec.max_args:
            raise fail(orig.path, f"model row {i} {name}{args}: only the first {spec.max_args} argument(s) are "
                                   "supported")
        if name == "Concat":
            args = [1]  # the original concatenates [T, B, C, H, W] tensors on dim 2; ours are [T*B, C, H, W]
        elif name == "Sample":
            args = [_none(a) for a in args]
        elif name == "BasicBlock_1":
            args = [args[0], 3, *args[1:]]  # its kernel is fixed at 3
        elif name != "Detect":  # (c2, k=3, s=1) as the original constructors default them, then fixed arguments
            args = [*args, *[3, 1][len(args) - 1:], *spec.extra]
        rows.append([f, n, spec.ours, list(args)])
    return rows


def ems_model_yaml(orig: OriginalCheckpoint, time_steps: int = ORIGINAL_TIME_STEPS, base: dict | None = None) -> dict:
    """An ems-yolo model YAML for the checkpoint: its translated rows, classes and trained anchors (in pixels),
    T = `time_steps`; other settings (neuron, loss, input) from `base` (an ems-yolo YAML whose rows must be the same)
    or ems-yolo's defaults."""
    rows = translate_rows(orig)
    nb = len(orig.yaml["backbone"])
    if base is not None:
        mine = list(base.get("backbone") or []) + list(base.get("head") or [])
        where = Path(base.get("yaml_file", "the model YAML")).name
        for i, (a, b) in enumerate(zip(rows, mine)):
            if not _same_row(i, a, b):
                raise fail(orig.path, f"model row {i}: the checkpoint has {a}, but {where} has {b}")
        if len(mine) != len(rows):
            raise fail(orig.path, f"the checkpoint's model has {len(rows)} rows, {where} has {len(mine)}")
    cfg = {k: v for k, v in deepcopy(base or {}).items() if k not in ("backbone", "head")}
    step_channels = int(orig.yaml.get("ch", 3))
    input_kind = cfg.get("input", "frames")
    cfg.update(
        nc=int(orig.yaml["nc"]),
        time_steps=int(time_steps),
        channels=step_channels * int(time_steps) if input_kind == "events" else step_channels,
        input=input_kind,
        depth_multiple=float(orig.yaml.get("depth_multiple", 1.0)),
        width_multiple=float(orig.yaml.get("width_multiple", 1.0)),
        anchors=_trained_anchors(orig),
        backbone=rows[:nb],
        head=rows[nb:],
    )
    cfg.setdefault("yaml_file", f"original-{Path(orig.yaml_file or orig.path.name).stem}.yaml")
    return cfg


def _same_row(i: int, a: list, b: list) -> bool:
    """Rows equal up to how a YAML writes them: relative or absolute sources, 'None' or None."""
    def norm(row):
        f, n, m, args = row
        sources = [x if x >= 0 else i + x for x in (f if isinstance(f, list) else [f])]
        return sources, n, m, [_none(x) for x in args]

    return norm(a) == norm(b)


def _trained_anchors(orig: OriginalCheckpoint) -> list[list[float]]:
    """The Detect anchors as trained, in pixels (the checkpoint keeps them in grid units, one level per stride)."""
    key = next((k for k in orig.tensors if k.endswith(".anchors")
                and getattr(orig.modules.get(k[:-8]), "global_name", "").endswith(".Detect")), None)
    if key is None or len(orig.stride) != orig.tensors[key].shape[0]:
        raise fail(orig.path, "no Detect anchors and strides in the pickled model")
    px = orig.tensors[key].double() * torch.tensor(orig.stride, dtype=torch.float64).view(-1, 1, 1)
    return [level.flatten().tolist() for level in px]


def map_state(orig: OriginalCheckpoint) -> dict[str, str]:
    """ems-yolo state-dict key -> original key, one-to-one: every original tensor used once."""
    rows = list(orig.yaml["backbone"]) + list(orig.yaml["head"])
    mapping: dict[str, str] = {}
    for key in orig.tensors:
        parts = key.split(".")
        if parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) >= len(rows):
            raise fail(orig.path, f"tensor '{key}' belongs to no model row")
        i, name = int(parts[1]), rows[int(parts[1])][2]
        prefix, rest = f"model.{i}.", ".".join(parts[2:])
        if rows[i][1] > 1:  # repeated blocks: model.i.j.<block key>
            prefix, rest = f"{prefix}{parts[2]}.", ".".join(parts[3:])
        table = ORIGINAL_MODULES[name].keys
        src = next((p for p in sorted(table, key=len, reverse=True) if rest.startswith(p) or rest == p.rstrip(".")),
                   None)
        if src is None:
            raise fail(orig.path, f"tensor '{key}' of row {i} ({name}) has no ems-yolo counterpart")
        ours = prefix + table[src] + rest[len(src):] if src.endswith(".") else prefix + table[src]
        if ours in mapping:
            raise fail(orig.path, f"tensors '{mapping[ours]}' and '{key}' both map to '{ours}'")
        mapping[ours] = key
    return mapping


def load_original(
    path: str | Path, time_steps: int = ORIGINAL_TIME_STEPS, base: dict | None = None
) -> tuple[EMSDetectionModel, OriginalCheckpoint]:
    """Read an original checkpoint and build its ems-yolo model (`model_from_original`)."""
    orig = read_original(path)
    return model_from_original(orig, time_steps, base), orig


def model_from_original(
    orig: OriginalCheckpoint, time_steps: int = ORIGINAL_TIME_STEPS, base: dict | None = None
) -> EMSDetectionModel:
    """The ems-yolo model of an original checkpoint with every tensor loaded (float32, eval mode).

    Strict: every original tensor is used exactly once, every ems-yolo tensor is filled, shapes match, and the
    model's strides equal the checkpoint's; the first offending key is named otherwise.
    """
    cfg = ems_model_yaml(orig, time_steps, base)
    try:
        model = EMSDetectionModel(cfg, verbose=False)
    except ValueError as e:
        raise fail(orig.path, f"its model cannot be built in ems-yolo: {e}") from None
    load_strict(orig.path, model, orig.tensors, map_state(orig), orig.modules)
    if orig.stride and [float(s) for s in model.stride] != orig.stride:
        raise fail(orig.path, f"strides {orig.stride} differ from the ems-yolo model's {model.stride.tolist()}")
    model.names = dict(orig.names)
    return model.float().eval()
