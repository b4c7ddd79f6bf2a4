"""Firing rates, synaptic operations and energy estimates of a spiking model (energy-spec.md).

`SpikeMonitor` counts, with removable hooks, the spikes entering every spike-fed conv (the AC layers) and leaving
every LIF. `energy_report` combines those firing rates with per-step MAC counts from layer shapes into the paper's
Eq. (6) in per-layer form,

    E_SNN = sum_{AC layers} E_AC * MACs_l * sum_t fr_l,t  +  sum_{MAC layers} E_MAC * MACs_l * T,

and compares it with the ANN twin of the same architecture (E_ANN = E_MAC * sum of all conv MACs, one pass).
All figures are per input sample; energies are in mJ, constants in pJ.
"""

from __future__ import annotations

import csv
import io
import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ems_yolo.nn.blocks import EMSBlock2
from ems_yolo.nn.neuron import LIF
from ems_yolo.utils.files import atomic_write_bytes
from ems_yolo.nn.flops import conv_ops
from ems_yolo.utils.checks import image_hw

PJ_TO_MJ = 1e-9
ENERGY_PRESETS: dict[str, tuple[float, float]] = {"fp32": (4.6, 0.9), "fp16": (1.5, 0.4), "int8": (0.23, 0.03)}
"""(E_MAC, E_AC) in pJ per operation, Horowitz (ISSCC 2014, 45 nm); fp32 is the convention of SNN papers."""

CAVEATS = (
    "These estimates ignore memory access, neuron-state updates and addressing. A spike count alone is not an "
    "energy figure: each spike fans out to many synapses (SOPs = fr * MACs accounts for that only on average). "
    "Richer models exist, e.g. SpikingJelly's memory-access and hardware-specific estimators."
)


def energy_constants(preset: str) -> tuple[float, float]:
    """(E_MAC, E_AC) in pJ of a named precision preset: 'fp32' (default of the papers), 'fp16' or 'int8'."""
    try:
        return ENERGY_PRESETS[preset.lower()]
    except KeyError:
        raise ValueError(f"unknown energy preset {preset!r}, expected one of {sorted(ENERGY_PRESETS)}") from None


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


@dataclass
class LayerEnergy:
    """One conv's row of the energy table (per sample). AC rows read spikes, MAC rows real values."""

    name: str
    kind: str
    out_hw: tuple[int, int]
    macs: int  # per time step
    firing_rate: float | None  # input firing rate (AC only)
    step_rates: list[float] | None  # per-step input firing rates (AC only)
    sops: float  # sum_t fr_t * MACs (AC only, else 0)
    energy_mj: float
    source: str | None = None  # LIF feeding an AC conv


@dataclass
class EnergyReport:
    """Energy estimate of a spiking model over an evaluation set, with the numbers it is made of."""

    layers: list[LayerEnergy]
    neurons: list[SpikeCount]
    time_steps: int
    imgsz: tuple[int, int]
    samples: int
    e_mac: float
    e_ac: float
    op_ac: int  # MACs per step of the spike-fed convs
    op_mac: int  # MACs per step of the real-input convs
    sops: float
    e_snn_mj: float
    ann_macs: int
    e_ann_mj: float
    conventions: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """E_ANN / E_SNN ('times less energy')."""
        return self.e_ann_mj / self.e_snn_mj

    @property
    def mean_firing_rate(self) -> float:
        """MAC-weighted network-average input firing rate: the single fr that gives the same SOPs in Eq. (6)."""
        return self.sops / (self.time_steps * self.op_ac) if self.op_ac else 0.0

    @property
    def preset(self) -> str:
        """Name of the constant preset in use, or 'custom'."""
        return next((k for k, v in ENERGY_PRESETS.items() if v == (self.e_mac, self.e_ac)), "custom")

    def to_dict(self) -> dict:
        """Everything as plain JSON-ready values, derived totals included."""
        return {
            **asdict(self),
            "ratio": self.ratio,
            "mean_firing_rate": self.mean_firing_rate,
            "preset": self.preset,
            "caveats": CAVEATS,
        }

    def table(self) -> str:
        """Per-layer table, per-LIF firing rates, totals, conventions and caveats as printable text."""
        h, w = self.imgsz
        sw = max(12, 6 * self.time_steps + 1)  # width of the per-step rates column
        header = f"{'layer':<32}{'kind':<5}{'out':>9}{'MACs/step':>13}{'fr':>8}  {'fr per step':<{sw}}{'SOPs':>13}"
        lines = [
            (
                f"Energy per sample: T={self.time_steps}, {h}x{w}, {self.samples} samples, "
                f"E_MAC={self.e_mac} pJ, E_AC={self.e_ac} pJ ({self.preset})"
            ),
            f"{header}{'E (mJ)':>11}",
        ]
        for r in self.layers:
            fr = f"{r.firing_rate:.4f}" if r.firing_rate is not None else "-"
            steps = "/".join(f"{v:.3f}" for v in r.step_rates) if r.step_rates is not None else "-"
            sops = f"{r.sops:.4g}" if r.kind == "AC" else "-"
            lines.append(
                f"{r.name:<32}{r.kind:<5}{f'{r.out_hw[0]}x{r.out_hw[1]}':>9}{r.macs:>13,}{fr:>8}  {steps:<{sw}}"
                f"{sops:>13}{r.energy_mj:>11.4g}"
            )
        lines += ["", "Firing rate per LIF (output spikes / neurons):", f"{'LIF':<40}{'fr':>8}  fr per step"]
        lines += [f"{n.name:<40}{n.rate:>8.4f}  {'/'.join(f'{v:.3f}' for v in n.step_rates)}" for n in self.neurons]
        lines += [
            "",
            "Totals (per sample):",
            f"  OP_AC  (spike-fed conv MACs per step)  {self.op_ac / 1e9:.5g} G",
            f"  OP_MAC (real-input conv MACs per step) {self.op_mac / 1e9:.5g} G",
            f"  SOPs   (all steps)                     {self.sops / 1e9:.5g} G",
            f"  mean input firing rate (MAC-weighted)  {self.mean_firing_rate:.4f}",
            f"  E_SNN                                  {self.e_snn_mj:.5g} mJ",
            f"  E_ANN  (ANN twin, T=1, {self.ann_macs / 1e9:.5g} G MACs)  {self.e_ann_mj:.5g} mJ",
            f"  E_ANN / E_SNN                          {self.ratio:.3g}x",
            "",
            "Conventions:",
            *(f"  - {c}" for c in self.conventions),
            "",
            f"Caveats: {CAVEATS}",
        ]
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-layer rows (one per conv, per-step rates as fr_t0..) as CSV, atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        steps = [f"fr_t{t}" for t in range(self.time_steps)]
        writer.writerow(
            ["name", "kind", "source", "out_h", "out_w", "macs", "firing_rate", *steps, "sops", "energy_mj"]
        )
        for r in self.layers:
            rates = r.step_rates if r.step_rates is not None else [""] * self.time_steps
            fr = "" if r.firing_rate is None else r.firing_rate
            writer.writerow([r.name, r.kind, r.source or "", *r.out_hw, r.macs, fr, *rates, r.sops, r.energy_mj])
        return atomic_write_bytes(path, buf.getvalue().encode())

    def to_json(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON, atomically."""
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

    def plot_firing_rates(self, path: str | Path) -> Path:
        """Bar chart (PNG) of the input firing rate of every spike-fed conv, atomically (Agg canvas, no pyplot)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = [r for r in self.layers if r.kind == "AC"]
        fig = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.bar(range(len(rows)), [r.firing_rate for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_ylabel("input firing rate")
        ax.set_title(
            f"Firing rate per spike-fed layer (T={self.time_steps}, {self.samples} samples, "
            f"mean {self.mean_firing_rate:.3f})"
        )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        return atomic_write_bytes(path, buf.getvalue())


def _images(batch) -> torch.Tensor:
    """Model input of a batch: a tensor, an Ultralytics batch dict (`img`) or a (images, ...) sequence.

    Integer images (uint8 as Ultralytics loads them) are scaled to [0, 1]; float images are used as they are.
    """
    x = batch["img"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (list, tuple)) else batch
    if not torch.is_tensor(x):
        raise TypeError(f"expected an image tensor, a batch dict with 'img' or a sequence, got {type(batch).__name__}")
    return x if x.is_floating_point() else x.float() / 255


def _conventions(model: nn.Module, T: int, imgsz: tuple[int, int]) -> list[str]:
    """The energy-spec §3.2 conventions behind the numbers, as sentences."""
    orders = sorted({m.pool_order for m in model.modules() if isinstance(m, EMSBlock2)})
    return [
        "E_SNN = sum_AC E_AC * MACs * sum_t fr_t + sum_MAC E_MAC * MACs * T (paper Eq. 6, per layer and per step)",
        f"real-input (MAC) convs, encoding and detection convs included, are counted T={T} times",
        "fr = spikes / (neurons x T x samples), a ratio of sums over the evaluation set, per layer and per step",
        "SOPs = sum_t fr_t * MACs (paper-style average fan-out, not the boundary-exact spike x fan-out count)",
        (
            f"MACs per step from layer shapes at {imgsz[0]}x{imgsz[1]}; BN, additions, concat, pooling, upsampling "
            "and neuron updates are not counted"
        ),
        *(
            [f"EMS-Block2 pooling order: {', '.join(orders)} ('last' = code order, shortcut conv at input resolution)"]
            if orders
            else []
        ),
        "E_ANN = E_MAC * all conv MACs of the same architecture with ReLU, one pass (T=1)",
    ]


def energy_report(
    model: nn.Module,
    batches: Iterable,
    imgsz: int | tuple[int, int] | None = None,
    e_ac: float = 0.9,
    e_mac: float = 4.6,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    preset: str | None = None,
) -> EnergyReport:
    """Measure firing rates on `batches` and estimate the energy per sample (energy-spec §3-5).

    batches: tensors `[B, C, H, W]` (floats in [0, 1]), Ultralytics batch dicts (uint8 `img`) or a DataLoader of
    either. The model runs in eval mode under no_grad (its mode is restored); with `device` it is moved there first.
    MACs are counted at `imgsz` (default: the first batch's size). `preset` ('fp32', 'fp16', 'int8') overrides
    e_mac/e_ac (pJ). E_ANN counts the convs of the ANN twin (`ann_macs`; for frame input they are the model's own).
    """
    if preset is not None:
        e_mac, e_ac = energy_constants(preset)
    if device is not None:
        model.to(device)
    p = next(model.parameters())
    was_training = model.training
    samples, size = 0, imgsz
    model.eval()
    try:
        with SpikeMonitor(model) as monitor, torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = _images(batch).to(device=p.device, dtype=p.dtype)
                size = size or tuple(x.shape[-2:])
                model(x)
                samples += x.shape[0]
        if not samples:
            raise ValueError("energy_report: no batches to measure firing rates on")
        hw = image_hw(size)
        ops = conv_ops(model, hw)
    finally:
        model.train(was_training)

    T, counts = monitor.time_steps, monitor.conv_counts
    layers = []
    for op in ops:
        if op.spike_input:
            if op.name not in counts:
                raise RuntimeError(f"spike-fed conv {op.name} did not run on the evaluation batches")
            c = counts[op.name]
            sops = op.macs * sum(c.step_rates)
            layers.append(
                LayerEnergy(
                    op.name, "AC", op.out_hw, op.macs, c.rate, c.step_rates, sops, e_ac * sops * PJ_TO_MJ, c.source
                )
            )
        else:
            layers.append(
                LayerEnergy(op.name, "MAC", op.out_hw, op.macs, None, None, 0.0, e_mac * op.macs * T * PJ_TO_MJ)
            )
    twin_macs = sum(op.macs for op in ops)  # the ANN twin runs the same convs once
    return EnergyReport(
        layers=layers,
        neurons=list(monitor.neuron_counts.values()),
        time_steps=T,
        imgsz=hw,
        samples=samples,
        e_mac=e_mac,
        e_ac=e_ac,
        op_ac=sum(r.macs for r in layers if r.kind == "AC"),
        op_mac=sum(r.macs for r in layers if r.kind == "MAC"),
        sops=sum(r.sops for r in layers),
        e_snn_mj=sum(r.energy_mj for r in layers),
        ann_macs=twin_macs,
        e_ann_mj=e_mac * twin_macs * PJ_TO_MJ,
        conventions=_conventions(model, T, hw),
    )
