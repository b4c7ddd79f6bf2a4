"""EMSDetectionModel: an Ultralytics `DetectionModel` built by ems-yolo's parser, ending with one of ems-yolo's
heads (EMS-YOLO's anchor head `EMSDetect`, SpikeYOLO's anchor-free `SpikeDetect`); the head decides the loss."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from copy import deepcopy
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.nn.tasks import BaseModel, DetectionModel
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import initialize_weights, intersect_dicts

from ems_yolo.cfg import check_value, load_model_yaml
from ems_yolo.nn.dry_run import check_model_size
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import TDBatchNorm2d
from ems_yolo.nn.parser import parse_model
from ems_yolo.nn.spikeyolo import SpikeDetect
from ems_yolo.utils.checks import image_hw

STRIDE_PROBE = 256  # probe input size; 2x the largest stride
HEADS = (EMSDetect, SpikeDetect)  # each says its loss (`criterion(model)`) and checks the YAML's `loss:` section


@contextmanager
def local_bn_stats(module: torch.nn.Module):
    """tdBN with this process's statistics only (`sync_bn` off), for a pass that only one process makes."""
    bns = [m for m in module.modules() if isinstance(m, TDBatchNorm2d) and m.sync]
    for m in bns:
        m.sync = False
    try:
        yield
    finally:
        for m in bns:
            m.sync = True


@contextmanager
def frozen_bn_stats(module: torch.nn.Module):
    """Keep BatchNorm running statistics unchanged (for the recomputation pass of activation checkpointing)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, n) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(n)


def raw_levels(out) -> list[torch.Tensor]:
    """The per-level raw head outputs of a training-mode forward: EMSDetect returns them as a list, SpikeDetect
    (like Ultralytics' Detect) as the `feats` of a dict."""
    return out["feats"] if isinstance(out, dict) else out


def ann_twin(cfg: dict) -> dict:
    """The same architecture as a conventional ANN: LIF neurons replaced by ReLU, one time step (energy-spec §3.3).

    The SiLU pseudo-neurons of the original COCO configs become plain SiLU; an event model reads all its time
    bins at once as input channels.
    """
    d = deepcopy(cfg)
    d["neuron"] = {**(d.get("neuron") or {}), "kind": "relu"}
    d["time_steps"] = 1
    return d


class EMSDetectionModel(DetectionModel):
    """Spiking detector: 4-D input `[B, C, H, W]`, T inside the model, Ultralytics-compatible outputs.

    `time_steps` and `input_kind` ("frames"/"events") override the YAML; both are stored in `self.yaml` and travel
    with checkpoints.
    """

    def __init__(
        self,
        cfg: str | Path | dict = "ems-res10.yaml",
        ch: int | None = None,
        nc: int | None = None,
        verbose: bool = True,
        time_steps: int | None = None,
        input_kind: str | None = None,
    ):
        BaseModel.__init__(self)  # DetectionModel.__init__ would call the stock parser (ultralytics_compat hook 2)
        self.yaml = deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
        where = self.yaml.get("yaml_file", "model YAML")
        missing = [k for k in ("nc", "backbone", "head") if self.yaml.get(k) is None]
        if missing:
            raise ValueError(f"{where}: missing required key '{missing[0]}'")
        for key in ("nc", "time_steps", "channels", "input", "depth_multiple", "width_multiple"):
            try:
                check_value(key, self.yaml.get(key))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        ch = int(ch or self.yaml.get("channels", 3))
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if time_steps:
            self.yaml["time_steps"] = int(time_steps)
        if input_kind:
            self.yaml["input"] = input_kind
        self.yaml["channels"] = ch
        try:  # every row built and run on the meta device first: no allocation for a model that cannot fit
            check_model_size(self.yaml, ch, (STRIDE_PROBE, STRIDE_PROBE))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self.model, self.save = parse_model(self.yaml, ch=ch)
        self.names = {i: f"{i}" for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)

        head = self.model[-1]
        if not isinstance(head, HEADS):
            raise ValueError(f"the last model row must be one of {[h.__name__ for h in HEADS]}, "
                             f"got {type(head).__name__}")
        try:
            head.check_hyp(self.yaml.get("loss"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        head.set_stride(self._probe_strides(ch))
        self.stride = head.stride
        if "balance" in (self.yaml.get("loss") or {}):  # one weight per head level: checked now, not at train time
            try:
                self.init_criterion()
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        initialize_weights(self)
        for m in self.modules():  # `sync_bn: true`: tdBN statistics over all processes of a distributed run
            if isinstance(m, TDBatchNorm2d):
                m.sync = bool(self.yaml.get("sync_bn", False))
        if verbose:
            self.log_layers()
            self.info()

    @property
    def time_steps(self) -> int:
        """Number of simulation time steps T."""
        return int(self.yaml.get("time_steps", 1))

    def set_time_steps(self, time_steps: int) -> None:
        """Change T in place: the YAML and every layer that holds T (neurons, encoding layer, head). An event
        model's T is the number of time bins of its input, fixed by the data it was built for."""
        if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
            raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
        if self.yaml.get("input") == "events" and time_steps != self.time_steps:
            raise ValueError(f"time_steps of an event model is the number of time bins of its input "
                             f"({self.time_steps}); got {time_steps}")
        for m in self.modules():
            if m is not self and "time_steps" in vars(m):
                m.time_steps = time_steps
        self.yaml["time_steps"] = time_steps

    def _probe_strides(self, ch: int) -> torch.Tensor:
        """Level strides from one dummy forward (4-D input, statistics untouched)."""
        head = self.model[-1]
        self.model.eval()
        head.training = True
        with torch.no_grad():
            raw = self.forward(torch.zeros(1, ch, STRIDE_PROBE, STRIDE_PROBE))
        self.model.train()
        return torch.tensor([STRIDE_PROBE / p.shape[2] for p in raw_levels(raw)])

    def log_layers(self) -> None:
        """Log the Ultralytics-style layer table: index, sources, repeats, parameters, module, arguments."""
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>11}  {'module':<18}arguments")
        for m in self.model:
            LOGGER.info(f"{m.i:>3}{m.f!s:>20}{m.n:>3}{m.np:>11,}  {m.type:<18}{m.args}")

    def _predict_once(self, x, *args, **kwargs):
        """Ultralytics' layer loop (its options, profile/visualize/embed, differ between releases and pass through);
        with `checkpoint: true` in the YAML, training recomputes each layer's activations (all T steps of the folded
        tensor) in backward instead of storing them (ultralytics_compat hook 6)."""
        options = any(a is not None and a is not False for a in (*args, *kwargs.values()))
        if not (self.yaml.get("checkpoint") and self.training and torch.is_grad_enabled()) or options:
            return super()._predict_once(x, *args, **kwargs)
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if isinstance(x, torch.Tensor) and m is not self.model[-1]:
                x = checkpoint(m, x, use_reentrant=False, context_fn=lambda m=m: (nullcontext(), frozen_bn_stats(m)))
            else:
                x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def init_criterion(self):
        """The head's loss: YOLOv5-style for EMSDetect (gains from the YAML's `loss:` section), Ultralytics' v8
        detection loss for SpikeDetect (gains from the train arguments)."""
        return self.model[-1].criterion(self)

    def load(self, weights, verbose: bool = True) -> None:
        """Load matching tensors from a checkpoint dict or model (the stock version assumes the anchor-free head)."""
        model = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
        csd = intersect_dicts(model.float().state_dict(), self.state_dict())
        self.load_state_dict(csd, strict=False)
        if verbose:
            LOGGER.info(f"Transferred {len(csd)}/{len(self.state_dict())} items from pretrained weights")

    def fuse(self, verbose: bool = True, imgsz: int = 640):
        """No-op: conv/tdBN folding is not applied (the stock fuse only knows Ultralytics' Conv layers)."""
        return self

    def is_fused(self) -> bool:  # noqa: D102
        return False

    def info(self, detailed: bool = False, verbose: bool = True, imgsz: int | list = 640):
        """Log and return (layers, parameters, gradients, GFLOPs over all T steps) like Ultralytics' model_info."""
        from ems_yolo.nn.flops import model_summary

        if verbose:  # the summary runs the model once at `imgsz`
            check_model_size(self.yaml, int(self.yaml.get("channels", 3)), image_hw(imgsz), size_key="imgsz")
        return model_summary(self, imgsz=imgsz, detailed=detailed, verbose=verbose)
