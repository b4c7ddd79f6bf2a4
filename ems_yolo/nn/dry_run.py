"""A model definition built and run on torch's meta device: sizes and failing rows known before any allocation.

A YAML (or a checkpoint's pickled YAML) decides how much memory its model takes: `width_multiple: 1e5` asks for
hundreds of terabytes of parameters, `time_steps: 1e9` or a huge image for as much activation memory, and a row
with stride 0 or an absurd upsampling fails only inside a forward pass. On the meta device tensors have shapes but
no storage, so the model's parameters and the outputs of every row for one time step are counted, and a row that
cannot run is named, at no cost; `check_model_size` then refuses a model that could not fit in this machine's
memory, saying the estimate and the key to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ems_yolo.nn.parser import parse_model

BYTES_PER_VALUE = 4  # float32 parameters and activations


@dataclass(frozen=True)
class DrySizes:
    """Parameters of a model and the values its rows output for one sample, one time step, at `hw`."""

    params: int
    step_activations: int
    hw: tuple[int, int]


def memory_limit() -> int:
    """This machine's physical memory in bytes (what a single model step can never exceed)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _numel(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_numel(o) for o in out) if isinstance(out, (list, tuple)) else 0


def dry_run(cfg: dict, ch: int, hw: tuple[int, int]) -> DrySizes:
    """Build `cfg` on the meta device and run one time step of one `hw` sample through it (T = 1, so a huge T
    costs nothing here; event input reads its per-step channels). Errors name the row that cannot be built or run.
    """
    T = int(cfg.get("time_steps", 1))
    step_ch = max(ch // T, 1) if cfg.get("input") == "events" else ch
    with torch.device("meta"):
        layers, save = parse_model({**cfg, "time_steps": 1}, ch=step_ch)
    layers.eval()
    layers[-1].training = True  # the head's raw level outputs, as the stride probe reads them
    x, outputs, total = torch.empty(1, step_ch, *hw, device="meta"), [], 0
    with torch.no_grad():
        for m in layers:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            try:
                x = m(x)
            except Exception as e:  # any failure of a row's own code on a well-formed input
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"model row {m.i} ({m.type}{tuple(m.args)}): cannot run on a "
                                 f"{hw[0]}x{hw[1]} input ({type(e).__name__}: {why}); expected arguments it can "
                                 "run with (positive kernel sizes and strides, sizes that fit in memory)") from None
            total += _numel(x)
            outputs.append(x if m.i in save else None)
    return DrySizes(sum(p.numel() for p in layers.parameters()), total, hw)


def check_model_size(cfg: dict, ch: int, hw: tuple[int, int], batch: int = 1, size_key: str = "time_steps") -> None:
    """Refuse a model whose parameters plus the activations of one `batch` x `hw` step over all T time steps need
    more than this machine's memory; the message gives the estimate and the key to lower."""
    sizes = dry_run(cfg, ch, hw)
    T = int(cfg.get("time_steps", 1))
    params = sizes.params * BYTES_PER_VALUE
    activations = T * batch * sizes.step_activations * BYTES_PER_VALUE
    limit = memory_limit()
    if params + activations <= limit:
        return
    key = "width_multiple, depth_multiple or the rows' channels" if params > limit else size_key
    raise ValueError(
        f"{key}: the model needs about {(params + activations) / 1e9:,.1f} GB ({sizes.params:,} parameters, "
        f"T={T} x {batch} x {sizes.step_activations:,} activation values at {hw[0]}x{hw[1]}), more than this "
        f"machine's {limit / 1e9:,.1f} GB of memory; expected a model that fits"
    )
