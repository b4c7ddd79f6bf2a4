"""ems-yolo's own settings: a small YAML file in ems-yolo's home, read by every command, never Ultralytics'.

    runs_dir: runs   # where run folders go (relative: against the working folder, as Ultralytics' ./runs)

`ems-yolo settings` shows it, `ems-yolo settings runs_dir=/data/runs` changes it, `ems-yolo settings reset` restores
the defaults. Ultralytics' own settings file (under $EMS_YOLO_HOME/ultralytics) only holds its integration switches,
which ems-yolo keeps off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# key -> (default, what it is)
SETTINGS = {
    "runs_dir": ("runs", "where train, val, predict, export, energy, events, benchmark and tune write their run "
                         "folders (<runs_dir>/detect/<name>); relative paths are against the working folder"),
}


def ems_home() -> Path:
    """Root of ems-yolo's caches (settings, fonts, generated datasets): $EMS_YOLO_HOME or ~/.cache/ems-yolo."""
    return Path(os.environ.get("EMS_YOLO_HOME", Path.home() / ".cache" / "ems-yolo")).expanduser()


def settings_file() -> Path:
    """The settings file, `$EMS_YOLO_HOME/settings.yaml`."""
    return ems_home() / "settings.yaml"


def _checked(key: str, value: Any, where: str) -> str:
    """A setting's value, or a ValueError naming where it came from, the key and what was expected."""
    if key not in SETTINGS:
        raise ValueError(f"{where}: '{key}' is not an ems-yolo setting, expected one of {', '.join(SETTINGS)}")
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{where}: {key}={value!r}, expected a folder path")
    return str(value).strip()


def load_settings() -> dict[str, str]:
    """The settings: the defaults updated with the file's values (a bad file is an error naming it)."""
    from ems_yolo.utils.files import read_yaml_mapping

    path = settings_file()
    stored = {k: _checked(k, v, str(path)) for k, v in (read_yaml_mapping(path) if path.is_file() else {}).items()}
    return {k: stored.get(k, default) for k, (default, _) in SETTINGS.items()}


def update_settings(**values: Any) -> dict[str, str]:
    """Check and store `values` (key=value as on the command line); returns the settings now in force."""
    import yaml

    from ems_yolo.utils.files import atomic_write_text

    new = {**load_settings(), **{k: _checked(k, v, "settings") for k, v in values.items()}}
    atomic_write_text(settings_file(), yaml.safe_dump(new, sort_keys=False))
    return new


def reset_settings() -> dict[str, str]:
    """Restore the defaults (the file is rewritten with them)."""
    settings_file().unlink(missing_ok=True)
    return update_settings()


def runs_dir() -> Path:
    """The folder run folders go under (`runs_dir` setting; a relative one against the working folder)."""
    return Path.cwd() / Path(load_settings()["runs_dir"]).expanduser()
