"""Resolve the `data=` argument to a dataset YAML that exists on disk, never downloading anything.

`None`/`shapes` is the built-in generated dataset; a bare name is looked up in cfg/datasets; any other value is a
path to an Ultralytics detection YAML. The YAML's `path:` and splits are checked here: when images are missing
the error says where to put them and how to get them, instead of letting Ultralytics run its `download:` hook.
The resolved copy (absolute `path:`, no `download:` key) is what the engines read.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from ems_yolo.utils.files import atomic_write_text, content_addressed, read_yaml_mapping
from ems_yolo.utils.offline import ems_home

DATASETS_DIR = Path(__file__).resolve().parents[2] / "cfg" / "datasets"
REPO_ROOT = DATASETS_DIR.parents[1]
BUILTIN = "shapes"
SYNTHETIC_GEN1 = "gen1-synthetic"
EVENT_SPLIT_SEP = "#"  # event splits are "<cache.h5>#<group>"


def available_datasets() -> list[str]:
    """The built-in dataset name plus the YAMLs shipped in cfg/datasets."""
    return [BUILTIN, SYNTHETIC_GEN1, *sorted(p.name for p in DATASETS_DIR.glob("*.yaml"))]


def _find_yaml(data: str) -> Path:
    p = Path(data).expanduser()
    if p.is_file():
        return p
    if len(p.parts) == 1:
        for candidate in (DATASETS_DIR / p.name, DATASETS_DIR / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"dataset '{data}' not found; give a dataset YAML path or one of: {', '.join(available_datasets())}")


def _dataset_root(d: dict, yaml_path: Path) -> Path:
    """Root folder of a dataset: absolute `path:`, else relative to the cwd, the YAML's folder or the repo root."""
    raw = d.get("path")
    if raw is None:
        return yaml_path.parent.resolve()
    p = Path(str(raw)).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), yaml_path.parent, REPO_ROOT):
        if (base / p).exists():
            return (base / p).resolve()
    return (Path.cwd() / p).resolve()


def _split_paths(root: Path, value) -> list[Path]:
    values = value if isinstance(value, list) else [value]
    return [p if p.is_absolute() else root / p for p in (Path(str(v)) for v in values)]


def resolve_data(data: str | Path | None) -> str:
    """Return the path of a dataset YAML whose images exist, generating the built-in data when asked."""
    if data is None or str(data) in (BUILTIN, f"{BUILTIN}.yaml"):
        from ems_yolo.data.shapes import make_shapes_dataset

        return str(make_shapes_dataset())
    if str(data) in (SYNTHETIC_GEN1, f"{SYNTHETIC_GEN1}.yaml"):
        return str(make_synthetic_gen1_data())
    src = _find_yaml(str(data))
    resolved_dir = ems_home() / "data"
    d = read_yaml_mapping(src, ("train", "val", "names"))
    root = _dataset_root(d, src)
    if "cache" in d:  # event dataset: splits are groups of one HDF5 cache
        cache = _split_paths(root, d["cache"])[0]
        missing = [] if cache.is_file() else [cache]
        d["cache"] = str(cache.resolve())
    else:
        missing = [p for key in ("train", "val") for p in _split_paths(root, d[key]) if not p.exists()]
    if missing:
        raise FileNotFoundError(_missing_message(src, d, root, missing))
    d.pop("download", None)
    d["path"] = str(root)
    if src.parent.resolve() == resolved_dir.resolve():  # already a resolved copy (e.g. from a checkpoint)
        return str(src)
    out = content_addressed(resolved_dir, src.stem, yaml.safe_dump(d, sort_keys=False))
    return str(out)


def is_event_data(data: str | Path) -> bool:
    """True for a (resolved) dataset YAML that describes an event cache."""
    try:
        return "cache" in (yaml.safe_load(Path(data).read_text()) or {})
    except (OSError, yaml.YAMLError):
        return False


def load_data(data: str | Path, split: str = "") -> dict:
    """Dataset dict for the engines: Ultralytics' `check_det_dataset` for images, our own for event caches.

    Event splits become `<cache>#<group>` strings, `channels` is T*C of the cached representation and `events`
    carries the representation settings.
    """
    if not is_event_data(data):
        from ultralytics.data.utils import check_det_dataset

        return check_det_dataset(data, split=split)
    from ems_yolo.events.gen1 import Gen1Cache

    d = yaml.safe_load(Path(data).read_text())
    names = d["names"] if isinstance(d["names"], dict) else dict(enumerate(d["names"]))
    splits = {k: f"{d['cache']}{EVENT_SPLIT_SEP}{d[k]}" for k in ("train", "val", "test") if d.get(k)}
    rep = Gen1Cache(d["cache"], d[split or "val"]).representation
    return {
        **d, **splits, "yaml_file": str(data), "names": names, "nc": len(names),
        "channels": rep.bins * rep.channels_per_bin, "events": asdict(rep),
    }


def split_event_path(img_path: str) -> tuple[str, str] | None:
    """(cache file, group) for an event split string, else None."""
    path, sep, group = str(img_path).rpartition(EVENT_SPLIT_SEP)
    return (path, group) if sep and path.endswith((".h5", ".hdf5")) else None


def make_synthetic_gen1_data() -> Path:
    """Generate (once) the synthetic Gen1 recordings, their HDF5 cache and a data YAML; return the YAML."""
    from ems_yolo.events.gen1 import GEN1_NAMES, preprocess_gen1
    from ems_yolo.events.synthetic import make_synthetic_gen1

    root = make_synthetic_gen1()
    cache = preprocess_gen1(root, root / "cache.h5", progress=False)
    out = root / "data.yaml"
    d = {"path": str(root), "cache": str(cache), "train": "train", "val": "val", "test": "test", "names": GEN1_NAMES}
    text = yaml.safe_dump(d, sort_keys=False)
    if not out.is_file() or out.read_text() != text:
        atomic_write_text(out, text)
    return out


def _missing_message(src: Path, d: dict, root: Path, missing: list[Path]) -> str:
    """Explain which files are missing and how to obtain the dataset (the YAML's `get:` text when it has one)."""
    lines = [
        f"dataset '{src}': images not found (missing {', '.join(str(m) for m in missing[:3])}).",
        f"ems-yolo never downloads data. Put the dataset under {root} or set 'path:' in a copy of {src.name}.",
    ]
    if d.get("get"):
        lines.append(str(d["get"]).strip())
    return "\n".join(lines)
