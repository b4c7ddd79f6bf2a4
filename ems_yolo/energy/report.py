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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ems_yolo.energy.monitor import SpikeCount, SpikeMonitor
from ems_yolo.nn.blocks import EMSBlock2
from ems_yolo.nn.flops import conv_ops
from ems_yolo.nn.spike_driven import ThermometerILIF
from ems_yolo.utils.checks import image_hw
from ems_yolo.utils.files import atomic_write_bytes

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
    levels: int = 1  # largest spike value D: 1 for binary spikes (LIF), `levels` for integer spikes (I-LIF)
    untrained: bool = False  # measured on initial (random) weights: the rates and the ratio mean nothing yet

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
        lines += ["", "Firing rate per neuron (output spikes / neurons):", f"{'neuron':<40}{'fr':>8}  fr per step"]
        lines += [f"{n.name:<40}{n.rate:>8.4f}  {'/'.join(f'{v:.3f}' for v in n.step_rates)}" for n in self.neurons]
        if self.levels > 1:
            lines += ["", f"Spike values per neuron (fraction of neuron-steps at 0..{self.levels}):"]
            lines += [f"{n.name:<40}  {' '.join(f'{v:.4f}' for v in n.level_rates)}" for n in self.neurons]
        lines += [
            "",
            "Totals (per sample):",
            f"  OP_AC  (spike-fed conv MACs per step)  {self.op_ac / 1e9:.5g} G",
            f"  OP_MAC (real-input conv MACs per step) {self.op_mac / 1e9:.5g} G",
            f"  SOPs   (all steps)                     {self.sops / 1e9:.5g} G",
            f"  mean input firing rate (MAC-weighted)  {self.mean_firing_rate:.4f}",
            f"  E_SNN                                  {self.e_snn_mj:.5g} mJ",
            f"  E_ANN  (ANN twin, T=1, {self.ann_macs / 1e9:.5g} G MACs)  {self.e_ann_mj:.5g} mJ",
            f"  E_ANN / E_SNN                          {self.ratio:.3g}x"
            + (" (UNTRAINED weights: rates and ratio describe the random initialisation, not a trained model)"
               if self.untrained else ""),
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
        ax.set_ylim(0, max([1.0, *(r.firing_rate for r in rows)]))
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


def _sub_steps(model: nn.Module) -> int:
    """D of a spike-driven model (binary sub-steps per step of its integer model), 1 for any other model."""
    return max((m.sub_steps for m in model.modules() if isinstance(m, ThermometerILIF)), default=1)


def _conventions(model: nn.Module, T: int, imgsz: tuple[int, int], levels: int) -> list[str]:
    """The energy-spec §3.2 conventions behind the numbers, as sentences."""
    orders = sorted({m.pool_order for m in model.modules() if isinstance(m, EMSBlock2)})
    D = _sub_steps(model)
    integer = [
        f"integer spikes (I-LIF, values 0..{levels}): a spike of value k is k additions, so fr is the mean spike value "
        "per neuron and step (it can exceed 1) and SOPs = sum_t fr_t * MACs counts additions"
    ] if levels > 1 else []
    driven = [
        f"spike-driven model: T x D = {T} binary sub-steps (D = {D}); spike-fed convs read 0/1 spikes, additions "
        f"only; real-input convs run at the integer model's T = {T // D} steps"
    ] if D > 1 else []
    return [*integer, *driven,
        "E_SNN = sum_AC E_AC * MACs * sum_t fr_t + sum_MAC E_MAC * MACs * T (paper Eq. 6, per layer and per step)",
        f"real-input (MAC) convs, encoding and detection convs included, are counted T={T // D} times",
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
    mac_steps = T // _sub_steps(model)  # a spike-driven model's real-input convs run at its integer model's steps
    layers = []
    for op in ops:
        if op.spike_input or op.name in counts:
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
                LayerEnergy(op.name, "MAC", op.out_hw, op.macs, None, None, 0.0,
                            e_mac * op.macs * mac_steps * PJ_TO_MJ)
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
        conventions=_conventions(model, T, hw, monitor.levels),
        levels=monitor.levels,
    )
