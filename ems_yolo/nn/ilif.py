"""The integer LIF neuron (I-LIF) of SpikeYOLO (Luo et al., ECCV 2024) on time-folded tensors.

u_1 = I_1;  u_t = (u_{t-1} - sg(s_{t-1})) * tau + I_t;  s_t = round(clip(u_t, 0, D))
with torch's round-half-to-even, D = `levels`, tau = 0.25 in SpikeYOLO's COCO models. Spikes are integers 0..D; the
gradient passes straight through where 0 <= u_t <= D and is zero outside. The soft reset subtracts the detached spike
(the arithmetic order above is SpikeYOLO's `mem_update`, so float32 outputs round the same way).

`charge="gen1"` is the neuron of SpikeYOLO's Gen1 code instead (SpikingJelly's `MultiStepLIFNode(tau=2.,
v_reset=None, detach_reset=True)` with its 4-level quantiser): v = u_{t-1} - s_{t-1} (0 before the first step),
u_t = v + (I_t - v) * (1 - tau) with tau = 0.5 (SpikingJelly's v + (I - v) / 2, the same float arithmetic).
The recurrence is the op `ems_yolo::ilif_forward` (`ops.ilif`): the torch reference, or its Triton kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ems_yolo.nn.neuron import check_backend, tracing, unfold_time
from ems_yolo.nn.ops import ilif as ilif_ops
from ems_yolo.nn.ops import runtime


def ilif_forward(currents: torch.Tensor, ilif: ILIF) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer spikes of `[T, B, ...]` currents and the straight-through window (uint8, 0 <= u <= D) per step;
    differentiable in the currents (one autograd node keeping the window only)."""
    kernel = runtime.use_kernels(ilif.backend, currents)
    return ilif_ops.forward(currents, ilif.levels, ilif.tau, ilif.charge, kernel)


def integer_spikes(currents: torch.Tensor, levels: int, tau: float, charge: str = "leak",
                   backend: str = "auto") -> torch.Tensor:
    """The I-LIF's integer spikes of `[T, B, ...]` currents: the op (differentiable, kernels per `backend`), or
    while tracing or exporting the same recurrence in plain ops."""
    if not tracing():
        kernel = runtime.use_kernels(backend, currents)
        return ilif_ops.forward(currents, levels, tau, charge, kernel)[0]
    spikes, u, s = [], None, None
    for t in range(currents.shape[0]):
        v = u - s if t else torch.zeros_like(currents[0])
        if charge == "gen1":
            u = v + (currents[t] - v) * (1 - tau)
        else:
            u = v * tau + currents[t] if t else currents[t]
        s = torch.round(torch.clamp(u, 0, levels))
        spikes.append(s)
    return torch.stack(spikes)


class ILIF(nn.Module):
    """Integer-valued LIF of SpikeYOLO: spikes 0..`levels` (D), soft reset by the detached spike, decay `tau`.

    charge: "leak" (SpikeYOLO's COCO neuron) or "gen1" (its Gen1 neuron, tau 0.5); backend as for the LIF.
    """

    def __init__(self, time_steps: int = 1, levels: int = 4, tau: float = 0.25, charge: str = "leak",
                 backend: str = "auto"):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels: expected a positive integer, got {levels!r}")
        if charge not in ilif_ops.CHARGES:
            raise ValueError(f"charge: expected one of {list(ilif_ops.CHARGES)}, got {charge!r}")
        check_backend(backend)
        self.time_steps = time_steps
        self.levels = levels
        self.tau = tau
        self.charge = charge
        self.backend = backend

    def __setstate__(self, state: dict) -> None:
        """ILIFs pickled before `charge` and `backend` existed are the COCO neuron on the default backend."""
        super().__setstate__(state)
        self.__dict__.setdefault("charge", "leak")
        self.__dict__.setdefault("backend", "auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map input currents `[T*B, ...]` to integer spikes of the same shape."""
        currents = unfold_time(x, self.time_steps)
        return integer_spikes(currents, self.levels, self.tau, self.charge, self.backend).flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"time_steps={self.time_steps}, levels={self.levels}, tau={self.tau}"
            + (f", charge={self.charge}" if self.charge != "leak" else "")
            + (f", backend={self.backend}" if self.backend != "auto" else "")
        )
