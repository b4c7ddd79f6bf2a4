"""CUDA-graph replay of the eval model for repeated prediction at one input shape (live event cameras, videos).

At batch 1 a forward pass of EMS-YOLO is launch-bound: hundreds of small kernels whose launches cost more than
their work (12.9 ms per 640 px T=4 frame of EMS-ResNet34 on an H200, 3.4 ms as a replayed graph). `GraphedCall`
runs a function of one tensor eagerly until the same input signature (shape, dtype, device, inference mode) comes
twice in a row, then captures it once and replays it for every later call with that signature; another shape runs
eagerly until it repeats and gets a graph of its own (a few at most). The capture and replay machinery is a small
interface (`GraphRunner`), so that this logic is tested on the CPU with a stand-in for CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import select_device

Signature = tuple[tuple[int, ...], torch.dtype, torch.device, bool]


class GraphRunner(Protocol):
    """Records a function once and replays it: what `GraphedCall` needs of CUDA graphs."""

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Record `fn` (which reads fixed input tensors); return (replay, the outputs that each replay rewrites)."""


class CUDAGraphRunner:
    """`torch.cuda.CUDAGraph` capture after `warmup` eager calls on a side stream (as torch's documentation asks:
    lazy initialisation, cuDNN and Triton autotuning happen outside the capture)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:  # noqa: D102
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out


def clone_outputs(out: Any) -> Any:
    """A copy of every tensor in a nest of lists, tuples and dicts (a replay rewrites the captured outputs)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(clone_outputs(o) for o in out)
    if isinstance(out, dict):
        return {k: clone_outputs(v) for k, v in out.items()}
    return out


class GraphedCall:
    """`fn(x)` replayed from a captured graph once an input signature repeats; eager otherwise.

    Eager are: calls with gradients enabled, the first call of a new signature, every signature beyond
    `max_graphs`, and all calls after a capture failed (one warning names the cause).
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], runner: GraphRunner, max_graphs: int = 4,
                 capture_after: int = 2):
        self.fn, self.runner, self.max_graphs, self.capture_after = fn, runner, max_graphs, capture_after
        self.graphs: dict[Signature, tuple[torch.Tensor, Callable[[], None], Any]] = {}
        self.enabled = True
        self.last: Signature | None = None
        self.repeats = 0

    def __call__(self, x: torch.Tensor) -> Any:
        """`fn(x)`, from a graph when one is captured (or now captured) for the signature of `x`."""
        if not self.enabled or torch.is_grad_enabled():
            return self.fn(x)
        key = (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
        self.repeats = self.repeats + 1 if key == self.last else 1
        self.last = key
        if key not in self.graphs:
            if self.repeats < self.capture_after or len(self.graphs) >= self.max_graphs:
                return self.fn(x)
            static = x.clone()
            try:
                replay, out = self.runner.capture(lambda: self.fn(static))
            except Exception as e:  # an op that cannot be captured: predict on without graphs, say why once
                self.enabled = False
                cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
                LOGGER.warning(f"cuda_graph: capture failed ({cause}); predicting without a CUDA graph")
                return self.fn(x)
            self.graphs[key] = static, replay, out
        static, replay, out = self.graphs[key]
        static.copy_(x)
        replay()
        return clone_outputs(out)


def use_cuda_graph(setting: bool | None, device: Any, pytorch_model: bool) -> bool:
    """Whether prediction replays CUDA graphs: `cuda_graph=None` (the default) means on CUDA with a PyTorch model;
    `cuda_graph=True` where that cannot be is a ValueError naming the key."""
    device = device if isinstance(device, torch.device) else select_device(device or "", verbose=False)
    if setting is True and device.type != "cuda":
        raise ValueError(f"cuda_graph=True: CUDA graphs need a CUDA device, got device={device.type} (predict with "
                         "device=0, or leave cuda_graph unset)")
    if setting is True and not pytorch_model:
        raise ValueError("cuda_graph=True: CUDA graphs replay a PyTorch model, got an exported one (predict with "
                         "the .pt, or leave cuda_graph unset)")
    return setting is not False and device.type == "cuda" and pytorch_model
