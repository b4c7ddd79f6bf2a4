"""Offline-first environment for Ultralytics: set before `ultralytics` is first imported.

Ultralytics probes DNS at import, sends telemetry, auto-installs packages and downloads a font for its plots.
ems-yolo never touches the network on its own, so this module pins the switches that turn all of that off and
places a local font where Ultralytics looks first. Users can still override any variable in their environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from ems_yolo.utils.files import atomic_write_bytes


def ems_home() -> Path:
    """Root of ems-yolo's caches (settings, fonts, generated datasets): $EMS_YOLO_HOME or ~/.cache/ems-yolo."""
    return Path(os.environ.get("EMS_YOLO_HOME", Path.home() / ".cache" / "ems-yolo")).expanduser()


def configure_environment() -> None:
    """Set offline defaults for Ultralytics and provide its font locally. Idempotent; safe before any import."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ems_home() / "ultralytics"))
    config_dir = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser() / "Ultralytics"
    _install_fonts(config_dir)


def _install_fonts(config_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans under the names Ultralytics would otherwise download."""
    targets = [config_dir / "Arial.ttf", config_dir / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    config_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if not target.exists():
            atomic_write_bytes(target, source.read_bytes())


def quiet_integrations() -> None:
    """Turn off telemetry and third-party loggers in the Ultralytics settings (written only when they differ)."""
    from ultralytics.utils import SETTINGS

    off = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune") if SETTINGS.get(k)}
    if off:
        SETTINGS.update(off)
