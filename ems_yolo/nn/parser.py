"""Model YAML parser in the Ultralytics row format `[from, repeats, module, args]`.

Names resolve to ems-yolo's spiking modules first, then to Ultralytics' modules, then to torch's (`nn.X`). Each
module has a channel rule saying how its input/output widths are derived; spiking modules also receive the
model's time steps and neuron settings. Errors name the offending row and list what is known.
"""

from __future__ import annotations

import ast
import inspect
from copy import deepcopy

from torch import nn

from ems_yolo.ultralytics_compat import UL_CHANNEL_MODULES, UL_REPEAT_MODULES  # first: offline environment
import ultralytics.nn.modules as ul_modules  # noqa: I001

from ems_yolo.nn.blocks import EMSBlock1, EMSBlock2, MSBlock, SiLUConv, WideBlock
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import EncodingConv
from ems_yolo.nn.neuron import NeuronConfig
from ems_yolo.nn.spikeyolo import (
    SpikeAllConvBlock,
    SpikeConv,
    SpikeConvBlock,
    SpikeDetect,
    SpikeDownsample,
    SpikeSPPF,
    TimeRepeat,
)

# ems-yolo modules: name -> class. They take (c1, c2, *args), or (c1, *args) when the class says its output width
# (`out_channels(c1, ...)`); heads (Detect subclasses) take (*args, input widths).
EMS_MODULES: dict[str, type[nn.Module]] = {
    m.__name__: m
    for m in (
        EncodingConv, EMSBlock1, EMSBlock2, MSBlock, WideBlock, SiLUConv, EMSDetect,  # EMS-YOLO
        TimeRepeat, SpikeDownsample, SpikeAllConvBlock, SpikeConvBlock, SpikeSPPF, SpikeConv, SpikeDetect,  # SpikeYOLO
    )
}
_TORCH_CHANNEL_MODULES = {"Conv2d", "ConvTranspose2d"}
ULTRALYTICS_HEADS = (
    "Ultralytics' anchor-free heads (Detect and its subclasses), which ems-yolo's spiking models do not take: they "
    "end with an EMSDetect row ([[P4, P5], 1, EMSDetect, [nc, anchors]]) or a SpikeDetect row ([[P3, P4, P5], 1, "
    "SpikeDetect, [nc]]). Ultralytics checkpoints work with val, "
    "predict and export; to fine-tune, train an ems-yolo model (model=ems-res10.yaml or an ems-yolo .pt)"
)
INPUT_KINDS = ("frames", "events")


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round a scaled width up to a multiple of `divisor`."""
    return max(divisor, int(-(-x // divisor) * divisor))


def resolve_module(name: str) -> type[nn.Module]:
    """Find a module class by YAML name: ems-yolo, then Ultralytics, then `nn.X` / `torch.nn.X`."""
    if name in EMS_MODULES:
        return EMS_MODULES[name]
    if name.startswith(("nn.", "torch.nn.")):
        cls = getattr(nn, name.rsplit(".", 1)[1], None)
    else:
        cls = getattr(ul_modules, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)) or cls.forward is nn.Module.forward:
        raise KeyError(name)  # not a module, or a container without a forward of its own (nn.Module, ModuleList)
    if issubclass(cls, ul_modules.Detect):
        raise ValueError(f"'{name}' is one of {ULTRALYTICS_HEADS}")
    return cls


def _kwargs_for(fn, **available) -> dict:
    """The subset of `available` keyword arguments that function `fn` (a class: its `__init__`) accepts."""
    params = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters
    return {k: v for k, v in available.items() if k in params}


def _check_row(i: int, row) -> tuple:
    """Validate one `[from, repeats, module, args]` row and return it as a tuple."""
    where = f"model row {i} {row!r}"
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise ValueError(f"{where}: expected [from, repeats, module, args]")
    f, n, m, args = row
    sources = f if isinstance(f, list) else [f]
    if not sources or not all(isinstance(x, int) and (x == -1 or -i <= x < i) for x in sources):
        raise ValueError(f"{where}: 'from' must be -1 or indices of earlier rows (0..{i - 1})")
    if i == 0 and sources != [-1]:
        raise ValueError(f"{where}: the first row must read the model input (from = -1)")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{where}: repeats must be a positive integer, got {n!r}")
    if not isinstance(m, str):
        raise ValueError(f"{where}: module must be a name, got {m!r}")
    if not isinstance(args, list):
        raise ValueError(f"{where}: args must be a list, got {args!r}")
    return f, n, m, args


def _resolve_arg(a, d: dict):
    """String args name YAML keys (nc, anchors) or Python literals (None); anything else stays a string."""
    if not isinstance(a, str):
        return a
    if a in d:
        return d[a]
    try:
        return ast.literal_eval(a)
    except (ValueError, SyntaxError):
        return a


def parse_model(d: dict, ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layers described by model dict `d` for `ch` input channels.

    Returns the `nn.Sequential` of layers (each tagged with `.i`, `.f`, `.type`, `.np` as Ultralytics'
    `_predict_once` expects, plus `.n` and `.args` for the layer table) and the sorted indices of layers whose
    outputs are reused later.
    """
    d = deepcopy(d)
    time_steps = int(d.get("time_steps", 1))
    if time_steps < 1:
        raise ValueError(f"time_steps must be >= 1, got {time_steps}")
    input_kind = d.get("input", "frames")
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"model 'input' must be one of {INPUT_KINDS}, got {input_kind!r}")
    neuron = NeuronConfig.from_dict(d.get("neuron"))
    gd, gw = float(d.get("depth_multiple", 1.0)), float(d.get("width_multiple", 1.0))
    rows = list(d.get("backbone") or []) + list(d.get("head") or [])
    if not rows:
        raise ValueError("model YAML has no 'backbone'/'head' rows")

    chs, layers, save = [ch], [], []
    for i, row in enumerate(rows):
        f, n, name, args = _check_row(i, row)
        try:
            cls = resolve_module(name)
        except ValueError as e:
            raise ValueError(f"model row {i} {row!r}: {e}") from None
        except KeyError:
            raise ValueError(
                f"model row {i} {row!r}: unknown module '{name}'. ems-yolo modules: {sorted(EMS_MODULES)}; "
                f"also accepted: Ultralytics modules (e.g. Conv, C2f, Concat) and torch modules as 'nn.Name'"
            ) from None
        args = [_resolve_arg(a, d) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        c_in = chs[f] if isinstance(f, int) else None
        extra = _kwargs_for(cls, time_steps=time_steps, neuron=neuron, input_kind=input_kind)

        if issubclass(cls, ul_modules.Detect):
            args = [*args, [chs[x] for x in f]]
            c2 = None
        elif hasattr(cls, "out_channels"):
            args = [c_in, *args]
            c2 = cls.out_channels(c_in, **_kwargs_for(cls.out_channels, time_steps=time_steps, input_kind=input_kind))
        elif cls.__name__ == "Concat":
            c2 = sum(chs[x] for x in f)
        elif name in EMS_MODULES or cls.__name__ in UL_CHANNEL_MODULES | UL_REPEAT_MODULES | _TORCH_CHANNEL_MODULES:
            if not args or not isinstance(args[0], int):
                raise ValueError(f"model row {i} {row!r}: first argument must be the output channels")
            c2 = make_divisible(args[0] * gw) if gw != 1.0 else args[0]
            args = [c_in, c2, *args[1:]]
            if cls.__name__ in UL_REPEAT_MODULES:
                args.insert(2, n)
                n = 1
        elif cls.__name__ == "BatchNorm2d":
            args, c2 = [c_in], c_in
        else:
            c2 = c_in

        try:
            if n == 1:
                module = cls(*args, **extra)
            else:  # repeated blocks: the first maps c1 -> c2, the others c2 -> c2
                module = nn.Sequential(cls(*args, **extra), *(cls(c2, *args[1:], **extra) for _ in range(n - 1)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model row {i} {row!r}: cannot build {name}{tuple(args)}: {e}") from e

        module.i, module.f, module.type, module.n, module.args = i, f, name, n, args
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        if i == 0:
            chs = []
        chs.append(c2)
    return nn.Sequential(*layers), sorted(set(save))
