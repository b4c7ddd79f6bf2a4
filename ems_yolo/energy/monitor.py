"""SpikeMonitor: per-layer, per-time-step spike counts of a spiking model, with removable hooks.

It counts the spikes entering every spike-fed conv (the AC layers of the energy estimate) and leaving every neuron
(LIF, or I-LIF with integer spikes 0..D); attached only for a measurement, so training is untouched. An integer
spike of value k counts as k spikes (k additions downstream), and the elements at each level 0..D are kept.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.neuron import LIF
from ems_yolo.nn.spike_driven import ThermometerILIF

NEURONS = (LIF, ILIF, ThermometerILIF)  # a ThermometerILIF emits binary spikes at T x D sub-steps


@dataclass
class SpikeCount:
    """Accumulated activity of one site (a spike-fed conv's input or a neuron's output), integer-exact.

    spikes: sum of the spike values per time step over all samples seen (= spike count for binary tensors; an
    integer spike k counts k).
    elements: neurons per time step summed over all samples (the same for every step).
    source: for a conv input, the neuron whose output it reads (None if it reads anything else).
    levels: elements at each spike value 1..D over all steps and samples (D = 1 for binary spikes).
    """

    name: str
    spikes: list[int]
    elements: int
    source: str | None = None
    levels: list[int] | None = None

    @property
    def rate(self) -> float:
        """Firing rate over everything seen: total spikes / (neurons x T x samples), a ratio of sums (for integer
        spikes the mean spike value, which can exceed 1)."""
        return sum(self.spikes) / (self.elements * len(self.spikes))

    @property
    def level_rates(self) -> list[float]:
        """Fraction of neuron-steps at each spike value 0..D (sums to 1)."""
        total = self.elements * len(self.spikes)
        counts = self.levels or [sum(self.spikes)]
        return [(total - sum(counts)) / total, *(c / total for c in counts)]

    @property
    def step_rates(self) -> list[float]:
        """Firing rate of each time step."""
        return [s / self.elements for s in self.spikes]


def _time_steps(model: nn.Module) -> int:
    """T shared by the model's neurons (1 for a model without spiking neurons)."""
    steps = {m.time_steps for m in model.modules() if isinstance(m, NEURONS)}
    if len(steps) > 1:
        raise ValueError(f"neurons disagree on time_steps: {sorted(steps)}; pass time_steps explicitly")
    return steps.pop() if steps else 1


def spike_levels(model: nn.Module) -> int:
    """The largest spike value D of the model's neurons: 1 for LIFs (binary), `levels` for I-LIFs."""
    return max((getattr(m, "levels", 1) for m in model.modules() if isinstance(m, NEURONS)), default=1)


class SpikeMonitor:
    """Count spikes entering every spike-fed conv (tagged `spike_input`, or reading a neuron's output) and leaving
    every neuron, per time step.

    Attached on construction; `remove()` (or leaving a `with` block) detaches every hook, after which the model is
    exactly as before and the counts stay readable. Inputs are time-folded `[T*B, ...]` (row t*B + b), so per-step
    counts view them as `[T, B*...]`. Counts accumulate on the tensors' device without host syncs; the binary check
    syncs once per model forward. SiLU pseudo-neurons are real-valued and never monitored. Spike values are
    counted per level 1..D (D = `spike_levels(model)`: 1 for LIF models, `levels` for I-LIF models).

    strict: a spike-fed conv that reads anything but spikes 0..D (an ANN twin, a mis-tagged conv) raises
    ValueError; with strict=False it is recorded in `nonbinary` and its counts are not spike counts.
    """

    def __init__(self, model: nn.Module, time_steps: int | None = None, strict: bool = True):
        self.model = model
        self.time_steps = int(time_steps or _time_steps(model))
        self.strict = strict
        self.levels = spike_levels(model)
        self.nonbinary: set[str] = set()
        self._convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        self._tagged = {n for n, m in model.named_modules() if getattr(m, "spike_input", False)}
        self._lifs = [n for n, m in model.named_modules() if isinstance(m, NEURONS)]
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
        self._spikes: dict[str, torch.Tensor] = {}  # [T, D]: elements at each level 1..D per step
        self._elements: dict[str, int] = {}
        self._bad: dict[str, torch.Tensor] = {}
        self._sources: dict[str, str] = {}
        self._produced: dict[int, tuple[weakref.ref, str]] = {}  # id(neuron output) -> (weakref, neuron name)
        self.nonbinary = set()

    def _count(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Add the per-step, per-level counts of `x` to `name`'s totals; return the counts `[T, D]`."""
        if x.shape[0] % self.time_steps:
            raise ValueError(f"{name}: leading dim {x.shape[0]} is not a multiple of T={self.time_steps}")
        flat = x.detach().reshape(self.time_steps, -1)
        if self.levels == 1:
            n = torch.count_nonzero(flat, dim=1).unsqueeze(1)
        else:
            n = torch.stack([torch.count_nonzero(flat == k, dim=1) for k in range(1, self.levels + 1)], 1)
        self._spikes[name] = self._spikes[name] + n if name in self._spikes else n
        self._elements[name] = self._elements.get(name, 0) + flat.shape[1]
        return n if self.levels > 1 else torch.count_nonzero(flat == 1, dim=1).unsqueeze(1)

    def _conv_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            ref, lif = self._produced.get(id(x), (None, None))
            fed = ref is not None and ref() is x
            if not (fed or name in self._tagged):  # reads real values (a MAC layer)
                return
            n = self._count(name, x)
            bad = torch.count_nonzero(x.detach()) - n.sum()  # elements that are neither 0 nor a level 1..D
            self._bad[name] = self._bad[name] + bad if name in self._bad else bad
            if fed:
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
        kind = "binary" if self.levels == 1 else f"spike (integers 0..{self.levels})"
        self.nonbinary.update(bad)
        if bad and self.strict:
            raise ValueError(
                f"spike-fed conv(s) received non-{kind} input: {', '.join(bad)} (an ANN twin or a non-spiking "
                "neuron feeds them, or the spike_input tag is wrong)"
            )

    def _counts(self, names: list[str]) -> dict[str, SpikeCount]:
        self._check()
        values = torch.arange(1, self.levels + 1)
        counts = {}
        for n in names:
            if n in self._spikes:
                per_level = self._spikes[n].cpu()
                spikes = (per_level * values).sum(1).tolist()
                levels = per_level.sum(0).tolist() if self.levels > 1 else None
                counts[n] = SpikeCount(n, spikes, self._elements[n], self._sources.get(n), levels)
        return counts

    @property
    def conv_counts(self) -> dict[str, SpikeCount]:
        """Input activity of every spike-fed conv that ran, in model order: those tagged `spike_input`, and those
        that read a neuron's output tensor directly (found while running, so any block is classified right)."""
        return self._counts(self._convs)

    @property
    def neuron_counts(self) -> dict[str, SpikeCount]:
        """Output activity of every neuron that ran, in model order."""
        return self._counts(self._lifs)
