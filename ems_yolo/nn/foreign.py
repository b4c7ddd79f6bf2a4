"""Steps shared by the readers of other projects' checkpoints (the original EMS-YOLO code, SpikeYOLO's code).

Such a file pickles whole model objects of code ems-yolo does not run. It is read with `inert_load` (nothing is
imported or executed), and its tensors are loaded into the ems-yolo model built for it under a strict one-to-one
mapping: every foreign tensor used once, every ems-yolo tensor filled, shapes equal; the first offending key is
named otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ems_yolo.nn.inert_pickle import InertObject, inert_load, module_tensors, module_tree


@dataclass
class ForeignCheckpoint:
    """What a foreign checkpoint holds, read as data: the pickled model YAML, its state dict (as `state_dict()`
    would name it), every module (inert) by path, and the training metadata."""

    path: Path
    yaml: dict
    yaml_file: str | None  # the model YAML's file name, as the pickle records it
    tensors: dict[str, torch.Tensor]
    modules: dict[str, InertObject]
    names: dict[int, str]
    stride: list[float]
    epoch: int | None
    date: str | None
    source: str  # "ema" or "model"


def fail(path: Path, what: str) -> ValueError:
    """The one-line error about `path`."""
    return ValueError(f"{path}: {what}")


def read_pickled_model(path: Path, model_class: str, code: str, what: str) -> tuple[dict, str, InertObject]:
    """Read a trainer's checkpoint dict as data: (the dict, "ema" or "model", the inert model of class
    `model_class`). For the errors, `code` names what writes such files and `what` the model it pickles."""
    try:
        ckpt = inert_load(path)
    except Exception as e:  # truncated zip, bad pickle: torch and pickle raise many types
        why = (str(e).strip().splitlines() or [""])[0]
        raise fail(path, f"cannot be read as a PyTorch checkpoint ({type(e).__name__}: {why}); expected a file "
                         f"saved by {code}") from None
    if not isinstance(ckpt, dict):
        raise fail(path, f"holds a {type(ckpt).__name__}, expected the dict with 'model'/'ema' that {code} saves")
    source = "ema" if ckpt.get("ema") is not None else "model"
    model = ckpt.get(source)
    if not (isinstance(model, InertObject) and model.global_name == model_class):
        raise fail(path, f"'{source}' is {getattr(model, 'global_name', type(model).__name__)}, expected {what}")
    return ckpt, source, model


def foreign_fields(path: Path, ckpt: dict, source: str, model: InertObject, cfg: dict,
                   yaml_file) -> dict:
    """The `ForeignCheckpoint` fields of a checkpoint dict and its inert model (YAML `cfg` with a checked nc)."""
    nc = cfg["nc"]
    stride, date, epoch = model.attr("stride"), ckpt.get("date"), ckpt.get("epoch")
    return dict(
        path=path,
        yaml=cfg,
        yaml_file=yaml_file if isinstance(yaml_file, str) else None,
        tensors=module_tensors(model),
        modules=module_tree(model),
        names=class_names(path, model.attr("names") or [str(i) for i in range(nc)], nc),
        stride=[float(s) for s in stride] if isinstance(stride, torch.Tensor) else [],
        epoch=epoch if isinstance(epoch, int) else None,
        date=date if isinstance(date, str) else None,
        source=source,
    )


def pickled_rows(path: Path, cfg: dict) -> list[tuple[int, list]]:
    """(index, [from, n, module, args]) of every backbone and head row of a pickled model YAML, checked for that
    shape and a positive integer repeat count."""
    rows = []
    for i, row in enumerate(list(cfg["backbone"]) + list(cfg["head"])):
        if not (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[3], list)):
            raise fail(path, f"model row {i} of the pickled YAML is {row!r}, expected [from, n, module, args]")
        n = row[1]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise fail(path, f"model row {i} of the pickled YAML is {row!r}, expected a positive integer repeat "
                             f"count n, got {n!r}")
        rows.append((i, list(row)))
    return rows


def class_names(path: Path, names, nc: int) -> dict[int, str]:
    """The pickled class names (a list, or a dict keyed 0..nc-1) as {index: name}; errors name what is wrong."""
    if isinstance(names, dict):
        if not all(type(k) is int for k in names) or set(names) != set(range(len(names))):
            raise fail(path, f"the pickled model's names have keys {list(names)}, expected the integers 0..{nc - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, (list, tuple)) or len(names) != nc:
        raise fail(path, f"the pickled model's names are {names!r:.80}, expected {nc} class names (nc: {nc})")
    return dict(enumerate(str(n) for n in names))


def load_strict(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], mapping: dict[str, str],
                modules: dict[str, InertObject]) -> None:
    """Load `tensors` (foreign key -> tensor) into `model` through `mapping` (ems-yolo key -> foreign key), strictly;
    BatchNorm epsilons are taken from the foreign modules (they are attributes, not tensors)."""
    state = model.state_dict()
    unused = [k for k in tensors if k not in set(mapping.values())]
    if unused:
        raise fail(path, f"tensor '{unused[0]}' has no ems-yolo counterpart")
    extra = [k for k in mapping if k not in state]
    if extra:
        raise fail(path, f"tensor '{mapping[extra[0]]}' maps to '{extra[0]}', which the ems-yolo model lacks")
    missing = [k for k in state if k not in mapping]
    if missing:
        raise fail(path, f"the checkpoint has no tensor for ems-yolo's '{missing[0]}'")
    for ours, key in mapping.items():
        if tensors[key].shape != state[ours].shape:
            raise fail(path, f"tensor '{key}' has shape {list(tensors[key].shape)}, ems-yolo's '{ours}' needs "
                             f"{list(state[ours].shape)}")
    model.load_state_dict({ours: tensors[key] for ours, key in mapping.items()})
    for ours, key in mapping.items():
        if key.endswith(".running_var"):
            bn = modules.get(key.rsplit(".", 1)[0])
            eps = bn.attr("eps") if bn is not None else None
            if isinstance(eps, float):
                model.get_submodule(ours.rsplit(".", 1)[0]).eps = eps
