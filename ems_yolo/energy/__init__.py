"""Spike statistics and energy estimates of spiking models (energy-spec.md): `SpikeMonitor` counts spikes with
removable hooks, `energy_report` turns firing rates and layer shapes into the paper's energy estimate."""

from ems_yolo.energy.monitor import SpikeCount, SpikeMonitor
from ems_yolo.energy.report import ENERGY_PRESETS, EnergyReport, energy_report

__all__ = ["ENERGY_PRESETS", "EnergyReport", "SpikeCount", "SpikeMonitor", "energy_report"]
