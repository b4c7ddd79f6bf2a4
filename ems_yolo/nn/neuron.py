"""Multi-step neurons on time-folded tensors.

Every stateless layer runs on `[T*B, C, H, W]` (time-major: row t*B + b). A neuron views that tensor as
`[T, B, ...]`, runs its recurrence over T inside `forward` and folds the result back. No membrane state outlives
a call, so deep copies (EMA, validator, export) need no reset hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ems_yolo.nn.ops import lif as lif_ops
from ems_yolo.nn.ops import runtime
from ems_yolo.nn.surrogate import DEFAULT_ALPHA, Rectangle, get_surrogate


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# (key, check, what is expected) of the `neuron:` values that are not names
_NEURON_VALUES = (
    ("kind", lambda x: isinstance(x, str), "a name"),
    ("tau", lambda x: _number(x) and 0 <= x <= 1, "a decay factor in [0, 1]"),
    ("vth", lambda x: _number(x) and x > 0, "a positive threshold"),
    ("surrogate", lambda x: isinstance(x, str), "a surrogate name"),
    ("alpha", lambda x: x is None or (_number(x) and x > 0), "a positive surrogate width or null"),
    ("detach_reset", lambda x: isinstance(x, bool), "true or false"),
    ("backend", lambda x: isinstance(x, str), "'auto', 'torch' or 'triton'"),
    ("levels", lambda x: isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 255, "an integer in 1..255"),
    ("charge", lambda x: x in ("leak", "gen1"), "'leak' or 'gen1'"),
)


@dataclass(frozen=True)
class NeuronConfig:
    """Neuron settings shared by every spiking layer of a model (the `neuron:` section of a model YAML).

    kind: "lif" (the paper's neuron), "ilif" (SpikeYOLO's integer LIF, spikes 0..`levels`, decay `tau`) or "relu"
    (the ANN twin, used with time_steps=1).
    backend: "auto" (the default: the Triton kernels of the training recurrence on CUDA tensors they support, the
    torch path elsewhere), "torch", or "triton" (the kernels wherever they run; a missing triton package is an
    error). Only the rectangular surrogate has kernels; the backends give bit-identical spikes.
    charge (I-LIF only): "leak", SpikeYOLO's COCO neuron, or "gen1", the SpikingJelly neuron of its Gen1 code
    (tau 0.5 unless given; `ems_yolo.nn.ilif`).
    """

    kind: str = "lif"
    tau: float = 0.25
    vth: float = 0.5
    surrogate: str = "rectangle"
    alpha: float | None = None
    detach_reset: bool = True
    backend: str = "auto"
    levels: int = 4
    charge: str = "leak"

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "neuron") -> NeuronConfig:
        """Build from a YAML mapping, rejecting unknown keys with the list of valid ones."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}, expected some of {sorted(known)}")
        for key, ok, expected in _NEURON_VALUES:
            if key in d and not ok(d[key]):
                raise ValueError(f"{where}.{key}: expected {expected}, got {d[key]!r}")
        if d.get("charge") == "gen1":
            if d.get("kind") != "ilif":
                kind = d.get("kind", "lif")
                raise ValueError(f"{where}.charge: 'gen1' is a charge of kind 'ilif', got kind {kind!r}")
            d.setdefault("tau", 0.5)  # SpikingJelly's tau = 2
        cfg = cls(**d)
        if cfg.kind not in ("lif", "ilif", "relu"):
            raise ValueError(f"{where}.kind: expected 'lif', 'ilif' or 'relu', got {cfg.kind!r}")
        get_surrogate(cfg.surrogate)  # validates the name
        check_backend(cfg.backend, f"{where}.backend")
        return cfg


def check_backend(backend: str, where: str = "backend") -> None:
    """Reject unknown LIF backends, and 'triton' where the triton package is missing."""
    if backend not in runtime.BACKENDS:
        raise ValueError(f"{where}: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not runtime.available():
        raise ValueError(f"{where}: 'triton' needs the triton package (pip install triton; CUDA builds of torch "
                         "ship it), or use 'torch'")


def tracing() -> bool:
    """Whether the model is being traced or exported, where the plain-op paths must be used."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def unfold_time(x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """View `[T*B, ...]` as `[T, B, ...]` (batch stays dynamic in traced graphs)."""
    return x.view(time_steps, -1, *x.shape[1:])


def lif_forward(currents: torch.Tensor, lif: LIF) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run `lif`'s recurrence over `[T, B, ...]` currents without autograd.

    Returns the spikes (currents' dtype) and the compact state that `lif_backward` needs. For the rectangular
    surrogate that state is one uint8 code per neuron and step (`ops.lif`: bit 0 = surrogate window, bit 1 =
    spike); other surrogates keep their derivative (float) and the spikes (bool).
    """
    tau, vth, alpha, surrogate = lif.tau, lif.vth, lif.alpha, lif._spike_fn
    if lif.rectangular:
        spikes, code = lif_ops.forward(currents, tau, vth, alpha, runtime.use_kernels(lif.backend, currents))
        return spikes, (code,)
    spikes = torch.empty_like(currents)
    deriv = torch.empty_like(currents)
    for t, x, fired in lif_ops.reference.membrane(currents, tau, vth):
        spikes[t] = fired
        deriv[t] = surrogate.derivative(x, alpha)
    return spikes, (deriv, spikes.to(torch.bool))


def lif_backward(grad_spikes: torch.Tensor, state: tuple[torch.Tensor, ...], lif: LIF) -> torch.Tensor:
    """dL/dI from dL/ds for `lif_forward`'s state, in the forward layout.

    With the reset detached, dL/du_t = dL/ds_t * h(u_t) + dL/du_{t+1} * tau * (1 - s_t), where the rectangle's
    h is the window bit divided by alpha.
    """
    tau = lif.tau
    if lif.rectangular:
        return lif_ops.backward(grad_spikes, state[0], tau, 1 / lif.alpha, runtime.use_kernels(lif.backend, state[0]))
    deriv, fired = state
    grad = torch.empty_like(deriv, dtype=grad_spikes.dtype)
    T = grad_spikes.shape[0]
    for t in reversed(range(T)):
        torch.mul(grad_spikes[t], deriv[t], out=grad[t])
        if t + 1 < T:
            grad[t].addcmul_(grad[t + 1], ~fired[t], value=tau)
    return grad


def spikes_from_state(state: tuple[torch.Tensor, ...], dtype: torch.dtype, lif: LIF) -> torch.Tensor:
    """The spikes `lif_forward` returned, rebuilt from its saved state (to spare a second saved copy)."""
    if len(state) > 1:
        return state[1].to(dtype)
    return lif_ops.decode(state[0], dtype, runtime.use_kernels(lif.backend, state[0]))


class MultiStepLIF(torch.autograd.Function):
    """The LIF recurrence over all T steps as one autograd node, with a hand-written backward.

    Backward needs only the surrogate derivative h(u_t) and the spikes s_t: for the rectangular surrogate both fit
    in one byte per neuron and step (that case is the custom op `ems_yolo::lif_forward`, differentiable itself),
    instead of the several float tensors per step that the step-by-step graph keeps.
    """

    @staticmethod
    def forward(ctx, currents: torch.Tensor, lif: LIF) -> torch.Tensor:
        spikes, state = lif_forward(currents, lif)
        ctx.save_for_backward(*state)
        ctx.lif = lif
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        return lif_backward(grad_spikes, ctx.saved_tensors, ctx.lif), None


class LIF(nn.Module):
    """Leaky integrate-and-fire neuron of EMS-YOLO (model-spec §2).

    u_t = tau * u_{t-1} * (1 - sg(s_{t-1})) + I_t,  s_t = [u_t > V_th].  Hard multiplicative reset through the
    detached previous spike; full BPTT through the membrane. The surrogate gradient is used only in training, the
    eval path is a plain comparison so it can be traced and exported.
    """

    def __init__(
        self,
        time_steps: int = 1,
        tau: float = 0.25,
        vth: float = 0.5,
        surrogate: str = "rectangle",
        alpha: float | None = None,
        detach_reset: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        check_backend(backend)
        self.backend = backend
        self.schema = 2  # LIFs pickled before schema 2 had 'torch' as their default backend: they load as 'auto'
        self._spike_fn = get_surrogate(surrogate)
        self.rectangular = self._spike_fn is Rectangle  # compact 1-byte backward state (a plain bool for tracing)
        self.time_steps = time_steps
        self.tau = tau
        self.vth = vth
        self.surrogate = surrogate
        self.alpha = DEFAULT_ALPHA[surrogate.lower()] if alpha is None else alpha
        self.detach_reset = detach_reset

    def __setstate__(self, state: dict) -> None:
        """Unpickle LIFs saved (inside checkpoints) before `backend`, `rectangular` or `auto` existed: the default
        backend of those ('torch', or none) becomes 'auto' (same spikes, the kernels where they run)."""
        super().__setstate__(state)
        if self.__dict__.setdefault("schema", 1) < 2 and self.__dict__.get("backend", "torch") == "torch":
            self.backend, self.schema = "auto", 2
        self.__dict__.setdefault("rectangular", self._spike_fn is Rectangle)

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        """Spike where the membrane exceeds the threshold (strict `>` in both paths)."""
        if self.training and torch.is_grad_enabled():
            return self._spike_fn.apply(u - self.vth, self.alpha)
        return (u > self.vth).to(u.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map input currents `[T*B, ...]` to binary spikes of the same shape.

        Training with the default detached reset runs the fused `MultiStepLIF`; inference (and the non-detached
        variant) runs the plain per-step loop, which traces and exports.
        """
        currents = unfold_time(x, self.time_steps)
        if self.training and self.detach_reset and torch.is_grad_enabled():
            if self.rectangular:
                kernel = runtime.use_kernels(self.backend, currents)
                return lif_ops.forward(currents, self.tau, self.vth, self.alpha, kernel)[0].flatten(0, 1)
            return MultiStepLIF.apply(currents, self).flatten(0, 1)
        if not (torch.is_grad_enabled() or tracing()):
            return self._infer(currents).flatten(0, 1)
        u = currents[0]
        s = self.fire(u)
        spikes = [s]
        for t in range(1, self.time_steps):
            keep = 1 - (s.detach() if self.detach_reset else s)
            u = self.tau * u * keep + currents[t]
            s = self.fire(u)
            spikes.append(s)
        return torch.stack(spikes).flatten(0, 1)

    def _infer(self, currents: torch.Tensor) -> torch.Tensor:
        """The recurrence without autograd: spikes written in place into one buffer, membrane updated in place
        (same arithmetic as the traceable loop, without its per-step temporaries and final stack)."""
        spikes = torch.empty_like(currents)
        u = currents[0].clone()
        for t in range(self.time_steps):
            if t:
                u.mul_(self.tau).mul_(1 - spikes[t - 1]).add_(currents[t])
            torch.gt(u, self.vth, out=spikes[t])
        return spikes

    def extra_repr(self) -> str:
        return (
            f"time_steps={self.time_steps}, tau={self.tau}, vth={self.vth}, surrogate={self.surrogate}, "
            f"alpha={self.alpha}, detach_reset={self.detach_reset}"
            + (f", backend={self.backend}" if self.backend != "auto" else "")
        )


class SiLUNeuron(nn.Module):
    """Non-spiking pseudo-neuron of the original COCO configs: the LIF recurrence with SiLU in place of the step.

    o_1 = SiLU(I_1), o_t = SiLU(tau * o_{t-1} * (1 - sg(o_{t-1})) + I_t): the membrane carried to the next step is the
    SiLU output, because the original code (`mem_update(act=True)`) ran its SiLU in place on the membrane, and its
    published weights were trained with that recurrence. Written out with `F.silu` and no `inplace` flag, so it
    computes the same function however it was built or loaded (Ultralytics' loader sets every `inplace` flag). Its
    output is real-valued, so it is never counted as a spiking layer (model-spec §2.4).
    """

    def __init__(self, time_steps: int = 1, tau: float = 0.25):
        super().__init__()
        self.time_steps = time_steps
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map currents `[T*B, ...]` to SiLU outputs of the same shape."""
        currents = unfold_time(x, self.time_steps)
        o = F.silu(currents[0])
        outs = [o]
        for t in range(1, self.time_steps):
            o = F.silu(self.tau * o * (1 - o.detach()) + currents[t])
            outs.append(o)
        return torch.stack(outs).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, tau={self.tau}"


class ReLUNeuron(nn.Module):
    """The ANN twin's activation: ReLU, never in place. Ultralytics' checkpoint loader sets `inplace=True` on every
    module that has the flag, and an in-place ReLU would overwrite the tdBN output its backward needs; this module has
    no such flag, so it computes the same function however it was loaded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def make_neuron(cfg: NeuronConfig, time_steps: int) -> nn.Module:
    """Instantiate the neuron a model's config asks for."""
    if cfg.kind == "relu":
        return ReLUNeuron()
    if cfg.kind == "ilif":
        from ems_yolo.nn.ilif import ILIF  # ilif builds on this module's time folding

        return ILIF(time_steps, cfg.levels, cfg.tau, cfg.charge, cfg.backend)
    return LIF(time_steps, cfg.tau, cfg.vth, cfg.surrogate, cfg.alpha, cfg.detach_reset, cfg.backend)
