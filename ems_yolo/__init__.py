"""ems-yolo: directly-trained spiking neural networks for object detection (EMS-YOLO) on the Ultralytics engine.

The public classes load on first access, so `import ems_yolo` imports neither torch nor Ultralytics and changes
no environment variable (ems_yolo.ultralytics_compat does that when Ultralytics is first used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"EMSYOLO": "ems_yolo.engine.model", "EMSDetectionModel": "ems_yolo.nn.model", "LIF": "ems_yolo.nn.neuron"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ems_yolo' has no attribute {name!r}")
