"""Read a pickled PyTorch file without executing any of the code it names.

A pickle names the classes and functions that rebuild it; a plain `torch.load(weights_only=False)` imports and calls
them, so a file from the internet can run anything. `inert_load` resolves only torch's tensor-rebuild functions and
plain containers; every other class or function becomes an `InertObject` subclass that merely records the arguments
and state it was given, so the module tree of a foreign checkpoint can be walked as data and its tensors collected.
"""

from __future__ import annotations

import collections
import codecs
import pickle
import types
from pathlib import Path
from typing import Any

import torch

# The only globals that are really resolved: tensor and parameter rebuilding and plain containers (torch resolves
# storage types itself, before asking the unpickler).
RESOLVED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class InertObject:
    """Stand-in for an instance of a class (or the result of a call) that was not resolved.

    `global_name` is the `module.qualname` the pickle asked for; `args` the constructor or call arguments; `state`
    what the pickle set on it (a module's `__dict__`); `items` / `entries` what it appended or assigned by key.
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items, obj.entries = args, None, [], {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __setitem__(self, key, value) -> None:
        self.entries[key] = value

    def attr(self, name: str, default=None):
        """An entry of the pickled `__dict__` (the first item of a (dict, slots) state)."""
        state = self.state[0] if isinstance(self.state, tuple) and self.state else self.state
        return state.get(name, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


_INERT_CLASSES: dict[str, type[InertObject]] = {}


def inert_class(global_name: str) -> type[InertObject]:
    """The (cached) InertObject subclass standing for `global_name`; nothing of that name is imported."""
    if global_name not in _INERT_CLASSES:
        _INERT_CLASSES[global_name] = type(global_name.rsplit(".", 1)[-1], (InertObject,), {"global_name": global_name})
    return _INERT_CLASSES[global_name]


class InertUnpickler(pickle.Unpickler):
    """Unpickler that resolves `RESOLVED_GLOBALS` (and torch dtypes) and turns every other global into inert data."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2 names
        found = RESOLVED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return inert_class(f"{module}.{name}")


def _load(file, **kwargs):
    return InertUnpickler(file, **kwargs).load()


# torch.load's `pickle_module`: the unpickler it subclasses (keeping its own storage handling) and `load`.
INERT_PICKLE = types.ModuleType("ems_yolo_inert_pickle")
INERT_PICKLE.Unpickler = InertUnpickler
INERT_PICKLE.load = _load


def inert_load(path: str | Path) -> Any:
    """Load a `torch.save` file with every unknown class inert (tensors on CPU); nothing in the file is executed."""
    return torch.load(path, map_location="cpu", pickle_module=INERT_PICKLE, weights_only=False)


def module_tensors(module: InertObject) -> dict[str, torch.Tensor]:
    """The state dict of an inert `nn.Module` tree: parameters and persistent buffers, named as `state_dict()`
    would name them."""
    out: dict[str, torch.Tensor] = {}
    for path, m in module_tree(module).items():
        prefix = f"{path}." if path else ""
        skip = m.attr("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            for name, t in (m.attr(kind) or {}).items():
                if t is not None and not (kind == "_buffers" and name in skip):
                    out[prefix + name] = t
    return out


def module_tree(module: InertObject, prefix: str = "") -> dict[str, InertObject]:
    """Every module of an inert `nn.Module` tree by its dotted path ("" for the root)."""
    out = {prefix.rstrip("."): module}
    for name, child in (module.attr("_modules") or {}).items():
        if isinstance(child, InertObject):
            out.update(module_tree(child, f"{prefix}{name}."))
    return out
