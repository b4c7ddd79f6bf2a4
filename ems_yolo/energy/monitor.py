"""SpikeMonitor: per-layer, per-time-step spike counts of a spiking model, with removable hooks.

It counts the spikes entering every spike-fed conv (the AC layers of the energy estimate) and leaving every LIF;
attached only for a measurement, so training is untouched.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ems_yolo.nn.neuron import LIF


@dataclass
class SpikeCount:
    """Accumulated activity of one site (a spike-fed conv's input or a LIF's output), integer-exact.

    spikes: non-zero elements per time step, summed over all samples seen (= spike count for binary tensors).
    elements: neurons per time step summed over all samples (the same for every step).
    source: for a conv input, the LIF whose output it reads (None if it reads anything else).
    """

    name: str
    spikes: list[int]
    elements: int
    source: str | None = None

    @property
    def rate(self) -> float:
        """Firing rate over everything seen: total spikes / (neurons x T x samples), a ratio of sums."""
        return sum(self.spikes) / (self.elements * len(self.spikes))

    @property
    def step_rates(self) -> list[float]:
        """Firing rate of each time step."""
        return [s / self.elements for s in self.spikes]


def _time_steps(model: nn.Module) -> int:
    """T shared by the model's LIFs (1 for a model without LIFs)."""
    steps = {m.time_steps for m in model.modules() if isinstance(m, LIF)}
    if len(steps) > 1:
        raise ValueError(f"LIFs disagree on time_steps: {sorted(steps)}; pass time_steps explicitly")
    return steps.pop() if steps else 1


class SpikeMonitor:
    """Count spikes entering every spike-fed conv (`conv.spike_input`) and leaving every LIF, per time step.

    Attached on construction; `remove()` (or leaving a `with` block) detaches every hook, after which the model is
    exactly as before and the counts stay readable. Inputs are time-folded `[T*B, ...]` (row t*B + b), so per-step
    counts view them as `[T, B*...]`. Counts accumulate on the tensors' device without host syncs; the binary check
    syncs once per model forward. SiLU pseudo-neurons are real-valued and never monitored.

    strict: a spike-fed conv that reads non-binary input (an ANN twin, a mis-tagged conv) raises ValueError;
    with strict=False it is recorded in `nonbinary` and its "spikes" are the non-zero elements.
    """

    def __init__(self, model: nn.Module, time_steps: int | None = None, strict: bool = True):
        self.model = model
        self.time_steps = int(time_steps or _time_steps(model))
        self.strict = strict
        self.nonbinary: set[str] = set()
        self._convs = [
            n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and getattr(m, "spike_input", False)
        ]
        self._lifs = [n for n, m in model.named_modules() if isinstance(m, LIF)]
        self.reset()
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_pre_hook(self._conv_hook(n)) for n in self._convs]
        self._handles += [modules[n].register_forward_hook(self._lif_hook(n)) for n in self._lifs]
        self._handles += [
            model.register_forward_pre_hook(lambda *_: self._produced.clear()),
            model.register_forward_hook(lambda *_: self._check()),
        ]

    def __enter__(self) -> SpikeMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach all hooks (idempotent); accumulated counts are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._produced.clear()

    def reset(self) -> None:
        """Forget all counts."""
        self._spikes: dict[str, torch.Tensor] = {}
        self._elements: dict[str, int] = {}
        self._bad: dict[str, torch.Tensor] = {}
        self._sources: dict[str, str] = {}
        self._produced: dict[int, tuple[weakref.ref, str]] = {}  # id(LIF output) -> (weakref, LIF name)
        self.nonbinary = set()

    def _count(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Add the per-step non-zero counts of `x` to `name`'s totals; return `x` viewed as `[T, -1]`."""
        if x.shape[0] % self.time_steps:
            raise ValueError(f"{name}: leading dim {x.shape[0]} is not a multiple of T={self.time_steps}")
        flat = x.detach().reshape(self.time_steps, -1)
        nz = torch.count_nonzero(flat, dim=1)
        self._spikes[name] = self._spikes[name] + nz if name in self._spikes else nz
        self._elements[name] = self._elements.get(name, 0) + flat.shape[1]
        return flat

    def _conv_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            flat = self._count(name, x)
            bad = torch.count_nonzero(flat) - torch.count_nonzero(flat == 1)  # elements that are neither 0 nor 1
            self._bad[name] = self._bad[name] + bad if name in self._bad else bad
            ref, lif = self._produced.get(id(x), (None, None))
            if ref is not None and ref() is x:
                self._sources.setdefault(name, lif)

        return hook

    def _lif_hook(self, name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self._count(name, out)
            self._produced[id(out)] = (weakref.ref(out), name)

        return hook

    def _check(self) -> None:
        """Move convs that saw non-binary input to `nonbinary`; raise if strict."""
        if not self._bad:
            return
        names, counts = list(self._bad), torch.stack(list(self._bad.values())).tolist()
        self._bad = {}
        bad = [n for n, c in zip(names, counts) if c]
        self.nonbinary.update(bad)
        if bad and self.strict:
            raise ValueError(
                f"spike-fed conv(s) received non-binary input: {', '.join(bad)} (an ANN twin or a non-spiking "
                "neuron feeds them, or the spike_input tag is wrong)"
            )

    def _counts(self, names: list[str]) -> dict[str, SpikeCount]:
        self._check()
        return {
            n: SpikeCount(n, self._spikes[n].tolist(), self._elements[n], self._sources.get(n))
            for n in names
            if n in self._spikes
        }

    @property
    def conv_counts(self) -> dict[str, SpikeCount]:
        """Input activity of every spike-fed conv that ran, in model order."""
        return self._counts(self._convs)

    @property
    def neuron_counts(self) -> dict[str, SpikeCount]:
        """Output activity of every LIF that ran, in model order."""
        return self._counts(self._lifs)
