"""Operation counts from layer shapes: MACs of every conv per time step, and the model summary line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.utils import LOGGER

from ems_yolo.utils.checks import image_hw


@dataclass
class ConvOps:
    """One conv's cost for a single sample and a single time step."""

    name: str
    conv: nn.Conv2d
    out_hw: tuple[int, int]
    macs: int
    spike_input: bool


def conv_ops(model: nn.Module, imgsz: int | list | tuple = 640) -> list[ConvOps]:
    """MACs of every conv for one sample and one time step: C_out * C_in/groups * k_h * k_w * H_out * W_out."""
    h, w = image_hw(imgsz)
    ch = int(getattr(model, "yaml", {}).get("channels", 3))
    shapes: dict[nn.Conv2d, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: shapes.__setitem__(mod, tuple(out.shape[-2:])))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        p = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, ch, h, w, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [
        ConvOps(name, m, shapes[m], m.weight.numel() * shapes[m][0] * shapes[m][1], getattr(m, "spike_input", False))
        for name, m in model.named_modules()
        if m in shapes
    ]


def model_summary(model: nn.Module, imgsz: int | list | tuple = 640, detailed: bool = False, verbose: bool = True):
    """Log `<name> summary: L layers, P parameters, G gradients, X GFLOPs per time step, Y GFLOPs total`.

    GFLOPs = 2 x MACs, from layer shapes; 'total' covers all T steps. Returns (layers, params, grads, GFLOPs total)
    like Ultralytics' `model_info`, or None when not verbose.
    """
    if not verbose:
        return None
    leaves = [(n, m) for n, m in model.named_modules() if not m._modules]
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if detailed:
        LOGGER.info(f"{'layer':>5}{'name':>45}{'type':>16}{'parameters':>12}{'shape':>22}")
        for i, (name, m) in enumerate(leaves):
            for pn, p in m.named_parameters():
                LOGGER.info(f"{i:>5}{f'{name}.{pn}':>45}{type(m).__name__:>16}{p.numel():>12,}{str(list(p.shape)):>22}")
    h, w = image_hw(imgsz)
    T = int(getattr(model, "yaml", {}).get("time_steps", 1))
    gflops_step = 2 * sum(op.macs for op in conv_ops(model, (h, w))) / 1e9
    yaml_file = getattr(model, "yaml", {}).get("yaml_file", "")
    name = Path(yaml_file).stem or type(model).__name__
    LOGGER.info(
        f"{name} summary: {len(leaves):,} layers, {n_p:,} parameters, {n_g:,} gradients, "
        f"{gflops_step:.1f} GFLOPs per time step, {gflops_step * T:.1f} GFLOPs total (T={T}, {h}x{w})"
    )
    return len(leaves), n_p, n_g, gflops_step * T
