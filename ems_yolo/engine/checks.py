"""`ems-yolo checks`: what ems-yolo runs with (versions, devices, kernels, offline settings) and where its data and
runs go, as plain lines a bug report can quote."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from ems_yolo import ultralytics_compat as compat  # first: offline environment before Ultralytics loads
from ems_yolo.cfg import default_project, ems_home
from ems_yolo.utils.settings import settings_file

# optional packages and the extra that installs each
OPTIONAL = {"onnx": "export", "onnxruntime": "export", "onnxslim": "export", "lap": "track", "triton": ""}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> list[str]:
    """The lines of `ems-yolo checks`."""
    from ems_yolo import __version__

    cuda = (f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "not available (device=cpu)")
    lines = [
        f"ems-yolo {__version__}",
        f"Python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}); CUDA {cuda}",
        f"torchvision {_version('torchvision')}",
        f"ultralytics {_version('ultralytics')} (supported {','.join(compat.SUPPORTED_ULTRALYTICS)})",
    ]
    for package, extra in OPTIONAL.items():
        found = _version(package)
        hint = f" (pip install 'ems-yolo[{extra}]')" if extra else ""
        lines.append(f"{package} {found}" if found else f"{package}: not installed{hint}")
    triton_use = "the LIF kernel (neuron: {backend: triton}) runs on CUDA" if torch.cuda.is_available() and \
        _version("triton") else "the LIF kernel needs CUDA and triton: the torch path runs"
    lines += [
        f"Triton: {triton_use}",
        "offline: " + ", ".join(f"{k}={os.environ.get(k)}" for k in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL")) +
        " (no downloads of weights, fonts or datasets; telemetry and integrations off)",
        f"Ultralytics settings: {os.environ.get('YOLO_CONFIG_DIR')} (kept by ems-yolo, not 'yolo settings')",
        f"ems-yolo home ($EMS_YOLO_HOME): {ems_home()} (generated datasets: {ems_home() / 'datasets'})",
        f"ems-yolo settings: {settings_file()} ('ems-yolo settings' shows and changes them)",
        f"runs: {default_project()}",
    ]
    return lines
