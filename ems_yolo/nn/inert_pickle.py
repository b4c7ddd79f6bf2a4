"""Read a pickled PyTorch file without executing any of the code it names.

A pickle names the classes and functions that rebuild it; a plain `torch.load(weights_only=False)` imports and calls
them, and torch's `weights_only` unpickler still calls every allowed class (REDUCE), so a file from the internet can
run anything an allowed constructor does. Two readers here call nothing but torch's tensor-rebuild functions and
plain containers:

- `inert_load`: every other class or function becomes an `InertObject` subclass that merely records the arguments and
  state it was given, so the module tree of a foreign checkpoint can be walked as data and its tensors collected.
- `rebuild_load`: classes that `allowed` accepts are rebuilt as a reconstruction does without running their code,
  `cls.__new__(cls)` (plain `object.__new__` only) plus their pickled `__dict__` (through a vetted `__setstate__`
  only); a call of anything else, or state set on anything else, is refused with `RefusedPickle`.
"""

from __future__ import annotations

import collections
import codecs
import pickle
import types
from collections.abc import Callable
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


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked `rebuild_load` to run code (a call, a constructor, a foreign `__setstate__`)."""


def _tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, *metadata):
    """torch's `_rebuild_tensor_v2` without backward hooks (callables the file would have autograd call)."""
    if backward_hooks:
        raise RefusedPickle("attaches backward hooks to a tensor")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, *metadata)


def _parameter(data, requires_grad, backward_hooks, state=None):
    """torch's `_rebuild_parameter(_with_state)` without backward hooks or special (`__x__`) attributes."""
    if backward_hooks:
        raise RefusedPickle("attaches backward hooks to a parameter")
    if state is None:
        return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)
    parts = state if isinstance(state, tuple) else (state,)  # its __dict__, or (__dict__, slots)
    if not all(p is None or (type(p) is dict and all(type(k) is str and not k.startswith("__") for k in p))
               for p in parts):
        raise RefusedPickle("sets special attributes of a parameter")
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol 2 writes bytes (latin1 only: other codec names import codec modules)."""
    if encoding != "latin1" or not isinstance(text, str):
        raise RefusedPickle(f"encodes with codec {encoding!r}")
    return codecs.encode(text, encoding)


# What `rebuild_load` may call: torch's rebuild functions (hooks refused) and plain containers.
REBUILD_CALLS: dict[tuple[str, str], Callable] = {
    **RESOLVED_GLOBALS,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("_codecs", "encode"): _latin1,
}
_PLAIN_KEYS = (str, int, float, bool, type(None), bytes)
_PLAIN_NEW = (object.__new__, types.SimpleNamespace.__new__)  # allocate only (SimpleNamespace: an empty dict)
# `__setstate__` methods that only store the state and fill defaults: torch.nn's (not DistributedDataParallel's,
# which joins a process group), the wrapper of nn.Module's that torch._dynamo installs once it is used (it tags the
# module), ems-yolo's and Ultralytics' AAttn's.
_VETTED_SETSTATE_MODULES = ("torch.nn.modules.", "ems_yolo.")
_VETTED_SETSTATE = {
    "torch._dynamo.mutation_guard.install_generation_tagging_init.<locals>.patched_setstate",
    "ultralytics.nn.modules.block.AAttn.__setstate__",
}


class _Global:
    """A class named by the pickle, usable only as the target of an allocation (never called, not a value)."""

    def __init__(self, name: str, cls: type):
        self.name, self.cls = name, cls

    def __repr__(self) -> str:
        return f"<class {self.name}, not rebuilt>"


def _vetted_setstate(cls: type):
    """`cls.__setstate__` if it is vetted, None if the class has none; RefusedPickle otherwise."""
    fn = getattr(cls, "__setstate__", None)
    if fn is None:
        return None
    where = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
    if where.startswith(_VETTED_SETSTATE_MODULES) or where in _VETTED_SETSTATE:
        return fn
    raise RefusedPickle(f"needs {where} to restore a {cls.__module__}.{cls.__qualname__}")


def _plain_key(key) -> bool:
    return isinstance(key, _PLAIN_KEYS) or (type(key) is tuple and all(isinstance(k, _PLAIN_KEYS) for k in key))


class RebuildingUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (the C one's opcodes cannot be replaced) whose calling opcodes only allocate allowed
    classes and call `REBUILD_CALLS`.

    `allowed(name)` returns the class a `module.qualname` may rebuild, or None. An allowed `torch.autograd.Function`
    is returned as the class itself (models keep such classes as attributes; they are used through `.apply`).
    """

    allowed: Callable[[str], type | None] = staticmethod(lambda name: None)
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unbuilt: dict[int, str] = {}  # objects allocated here whose state is still to be set: id -> class

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module
        call = REBUILD_CALLS.get((module, name))
        if call is not None:
            return call
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        cls = type(self).allowed(f"{module}.{name}")
        if cls is None:
            raise RefusedPickle(f"needs {module}.{name}, which is not an allowed class")
        return cls if issubclass(cls, torch.autograd.Function) else _Global(f"{module}.{name}", cls)

    def _allocate(self, target, args, kwargs=None):
        """`cls.__new__(cls)` for an allowed class named without arguments; RefusedPickle for anything else."""
        if not isinstance(target, _Global):
            raise RefusedPickle(f"allocates {getattr(target, '__qualname__', type(target).__name__)}")
        if args or kwargs or target.cls.__new__ not in _PLAIN_NEW:
            raise RefusedPickle(f"calls {target.name}(...) (a constructor, with {len(args) + len(kwargs or {})} "
                                "argument(s) from the file)")
        _vetted_setstate(target.cls)
        obj = target.cls.__new__(target.cls)
        self._unbuilt[id(obj)] = target.name
        return obj

    def load(self) -> Any:
        """Unpickle; every object allocated must also have had its state set."""
        result = super().load()
        if self._unbuilt:
            raise RefusedPickle(f"leaves a {next(iter(self._unbuilt.values()))} without its state")
        return result

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, _Global):
            self.stack[-1] = self._allocate(func, args)
        elif any(func is f for f in REBUILD_CALLS.values()) and type(args) is tuple:
            if func in (set, frozenset) and not all(_plain_key(k) for k in (args[0] if args else ())):
                raise RefusedPickle("builds a set of non-plain items")
            if func is collections.OrderedDict and args:
                raise RefusedPickle("builds an OrderedDict from arguments")
            self.stack[-1] = func(*args)
        else:
            raise RefusedPickle(f"calls {getattr(func, '__qualname__', type(func).__name__)}")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._allocate(self.stack[-1], args)

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._allocate(self.stack[-1], args, kwargs)

    def load_instantiate(self) -> None:
        raise RefusedPickle("instantiates a class with protocol 0/1 INST/OBJ (calls its constructor)")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if id(inst) not in self._unbuilt:  # a container, tensor, class or an object whose state is already set
            raise RefusedPickle(f"sets the state of a {cls.__module__}.{cls.__qualname__}")
        name = self._unbuilt.pop(id(inst))
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not (type(state) is dict and all(type(k) is str for k in state)):
            raise RefusedPickle(f"sets a {cls.__qualname__} from a {type(state).__name__}, expected its __dict__")
        setstate = _vetted_setstate(cls)
        if setstate is None:
            inst.__dict__.update(state)
        else:
            setstate(inst, state)
        if isinstance(inst, torch.nn.Module) and not all(
                type(state.get(k)) in (dict, collections.OrderedDict) for k in ("_parameters", "_buffers", "_modules")):
            raise RefusedPickle(f"restores a {name} without its parameters, buffers and submodules")

    def _container(self, kinds: tuple[type, ...]):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise RefusedPickle(f"adds items to a {type(target).__qualname__}")
        return target

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container((list,)).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container((list,)).extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems([key, value])

    def load_setitems(self) -> None:
        self._setitems(self.pop_mark())

    def _setitems(self, items: list) -> None:
        target = self._container((dict, collections.OrderedDict))
        for key, value in zip(items[::2], items[1::2]):
            if not _plain_key(key):
                raise RefusedPickle(f"uses a {type(key).__qualname__} as a dict key")
            target[key] = value

    def load_additems(self) -> None:
        items = self.pop_mark()
        if not all(_plain_key(k) for k in items):
            raise RefusedPickle("adds non-plain items to a set")
        self._container((set,)).update(items)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.INST[0]] = load_instantiate
    dispatch[pickle.OBJ[0]] = load_instantiate
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems


def rebuild_load(path: str | Path, allowed: Callable[[str], type | None]) -> Any:
    """Load a `torch.save` file (tensors on CPU) rebuilding only classes that `allowed` accepts, without calling
    them or any function the file names; RefusedPickle says what the file asked for otherwise."""
    unpickler = type("Unpickler", (RebuildingUnpickler,), {"allowed": staticmethod(allowed)})
    module = types.ModuleType("ems_yolo_rebuilding_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    loaded = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    _no_loose_classes(loaded)
    return loaded


def _no_loose_classes(root: Any) -> None:
    """Refuse a class from the file kept as a value (a hook or attribute that later code would call)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (torch.Tensor, *_PLAIN_KEYS)):
            continue
        seen.add(id(obj))
        if isinstance(obj, _Global):
            raise RefusedPickle(f"keeps {obj.name} as a value (later code would call it)")
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
