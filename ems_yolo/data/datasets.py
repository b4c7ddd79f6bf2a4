"""Resolve the `data=` argument to a dataset YAML that exists on disk, never downloading anything.

`None`/`shapes` is the built-in generated dataset, `gen1-synthetic` / `gen4-synthetic` generated Gen1- / 1 Mpx-
shaped event datasets; a
bare name is looked up in the shipped cfg/datasets; any other value is a path to an Ultralytics detection YAML.
The YAML's `path:` and splits are checked here: when images are missing the error says where to put them and how
to get them, instead of letting Ultralytics run its `download:` hook. The resolved copy (absolute `path:`, no
`download:` key) is what the engines read. Event datasets are ordinary data YAMLs whose splits are HDF5 sample
caches (one per split); their copy also carries `channels` (T*C) and `events` (the representation) read from the
caches, so Ultralytics' own dataset checks accept them as they are.
"""

from __future__ import annotations

import fcntl
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

from ems_yolo.cfg import BUILTIN_DATA, CFG_DIR, SYNTHETIC_GEN1, SYNTHETIC_GEN4, check_value, ems_home, find_dataset_yaml
from ems_yolo.data.events import is_event_split, split_representation
from ems_yolo.events.automotive import preprocess_dataset, write_event_data_yaml
from ems_yolo.events.representations import EventRepresentation
from ems_yolo.utils.files import build_folder_once, content_addressed, read_yaml_mapping


def _dataset_root(d: dict, yaml_path: Path) -> Path:
    """Root folder of a dataset: absolute `path:`, else relative to the cwd, the YAML's folder or the folder holding
    cfg/ (the root of a source checkout)."""
    raw = d.get("path")
    if raw is None:
        return yaml_path.parent.resolve()
    p = Path(str(raw)).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), yaml_path.parent, CFG_DIR.parent):
        if (base / p).exists():
            return (base / p).resolve()
    return (Path.cwd() / p).resolve()


def _shipped_copy(root: Path) -> Path:
    """Data shipped inside the package (coco8) is read from a copy in $EMS_YOLO_HOME/datasets, made once: Ultralytics
    writes its label caches beside the labels, and an installed package (or a source checkout) is no place for them.
    Other roots are returned as they are."""
    if not root.is_relative_to(CFG_DIR):
        return root
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix != ".cache"]

    def complete(folder: Path) -> bool:
        return all((folder / f).is_file() and (folder / f).stat().st_size == (root / f).stat().st_size for f in files)

    def copy(folder: Path) -> None:
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / f, folder / f)

    final = ems_home() / "datasets" / root.name
    if not complete(final):
        build_folder_once(final, complete, copy)
    return final


def _split_paths(root: Path, value) -> list[Path]:
    values = value if isinstance(value, list) else [value]
    return [p if p.is_absolute() else root / p for p in (Path(str(v)) for v in values)]


def resolve_data(data: str | Path | None) -> str:
    """Return the path of a dataset YAML whose images (or event caches) exist, generating built-in data when asked."""
    if data is None or str(data) in (BUILTIN_DATA, f"{BUILTIN_DATA}.yaml"):
        from ems_yolo.data.shapes import make_shapes_dataset

        return str(make_shapes_dataset())
    for name, protocol in ((SYNTHETIC_GEN1, "gen1"), (SYNTHETIC_GEN4, "gen4")):
        if str(data) in (name, f"{name}.yaml"):
            return resolve_data(make_synthetic_data(protocol))
    src = find_dataset_yaml(str(data))
    resolved_dir = ems_home() / "data"
    d = read_yaml_mapping(src, ("train", "val", "names"))
    check_class_names(src, d)
    root = _shipped_copy(_dataset_root(d, src))
    splits = {k: _split_paths(root, d[k]) for k in ("train", "val", "test") if d.get(k)}
    missing = [p for key in ("train", "val") for p in splits[key] if not p.exists()]
    if missing:
        raise FileNotFoundError(_missing_message(src, d, root, missing))
    if any(is_event_split(p) for paths in splits.values() for p in paths):
        d.update(_event_fields(src, d, splits))
    d.pop("download", None)
    d["path"] = str(root)
    if src.parent.resolve() == resolved_dir.resolve():  # already a resolved copy (e.g. from a checkpoint)
        return str(src)
    copy = content_addressed(resolved_dir, src.stem, yaml.safe_dump(d, sort_keys=False))
    _ultralytics_check(copy, src)
    return str(copy)


def check_class_names(src: Path, d: dict) -> None:
    """A dataset's classes: `names` a list or a {0: name, 1: name, ...} mapping and `nc`, when given, their number;
    checked on the user's file (Ultralytics' errors would name the resolved copy)."""
    names = d["names"]
    if isinstance(names, dict):
        keys = list(names)
        indices = [int(k) if isinstance(k, str) and k.isdigit() else k for k in keys]  # '0': as Ultralytics reads it
        if set(indices) != set(range(len(keys))) or any(isinstance(k, bool) for k in keys):
            raise ValueError(f"{src}: 'names' keys {keys[:8]}{' ...' if len(keys) > 8 else ''}, expected the class "
                             f"indices 0..{len(keys) - 1}, each once")
    elif not isinstance(names, list) or not names:
        raise ValueError(f"{src}: 'names: {names!r}', expected a list of class names or a mapping "
                         "{0: name, 1: name, ...}")
    if d.get("nc") is not None:
        try:
            nc = check_value("nc", d["nc"])
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        if nc != len(names):
            raise ValueError(f"{src}: 'nc: {nc}' but 'names' has {len(names)} classes, expected nc equal to the "
                             "number of names (or no nc)")


def _ultralytics_check(copy: Path, src: Path) -> None:
    """Ultralytics' own dataset checks of the resolved copy, their error one line naming the user's file."""
    from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
    from ultralytics.data.utils import check_det_dataset

    try:
        check_det_dataset(str(copy))
    except (AssertionError, KeyError, RuntimeError, SyntaxError, TypeError, ValueError) as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        raise ValueError(f"{src}: {message.replace(str(copy), '').strip()}") from None


def check_input_channels(model_yaml: dict, model_name: str, data: dict, data_name: str) -> None:
    """A model validated on data of another input width is one line naming both (its first layer would otherwise
    fail on the first batch with a shape error): an event model reads T bins of a fixed representation."""
    ch, have = int(model_yaml.get("channels", 3)), int(data.get("channels", 3))
    if ch == have:
        return
    rep, T = data.get("events"), int(model_yaml.get("time_steps", 1))
    rep = EventRepresentation(**rep) if rep else None
    held = f"{rep.bins} bins x {rep.channels_per_bin} of {rep.name}" if rep else "images"
    reads = f"T={T} x {ch // T}" if model_yaml.get("input") == "events" and ch % T == 0 else "images"
    raise ValueError(f"{data_name}: {have} input channels ({held}), but the model {model_name} reads {ch} ({reads}); "
                     f"expected data of {ch} channels")


def warn_class_mismatch(model_names: dict | list, data_names: dict | list) -> None:
    """One warning when a model's classes are not the dataset's: metrics compare class indices and are reported
    under the model's names."""
    from ultralytics.utils import LOGGER

    model_list = list(model_names.values() if isinstance(model_names, dict) else model_names)
    data_list = list(data_names.values() if isinstance(data_names, dict) else data_names)
    if model_list != data_list:
        shown = [(f"{len(x)} {x[:10]}" + (" ..." if len(x) > 10 else "")) for x in (model_list, data_list)]
        LOGGER.warning(f"the model's classes ({shown[0]}) are not the dataset's ({shown[1]}): metrics compare class "
                       "indices and are reported under the model's names")


def _event_fields(src: Path, d: dict, splits: dict[str, list[Path]]) -> dict:
    """`channels` and `events` of an event dataset, from its caches (one per split, all of one representation)."""
    reps = {}
    for key, paths in splits.items():
        if len(paths) != 1 or not is_event_split(paths[0]):
            raise ValueError(f"{src}: '{key}' must name one HDF5 event cache (.h5) or one folder of RVT sequences, "
                             f"got {d[key]!r}")
        if paths[0].exists():
            reps[key] = split_representation(paths[0], d.get("rvt"))
    first = next(iter(reps.values()))
    for key, rep in reps.items():
        if rep != first:
            raise ValueError(f"{src}: split '{key}' was cached as {rep}, split 'train' as {first}; expected one "
                             "representation for every split")
    channels = first.bins * first.channels_per_bin
    if d.get("channels", channels) != channels:
        raise ValueError(f"{src}: 'channels: {d['channels']}' does not match the event caches ({first.name}, "
                         f"{first.bins} bins x {first.channels_per_bin}); expected channels: {channels}")
    return {"channels": channels, "events": asdict(first)}


def load_data(data: str | Path | None, split: str = "") -> dict:
    """The dataset dict the engines use (Ultralytics' `check_det_dataset` of the resolved YAML)."""
    from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
    from ultralytics.data.utils import check_det_dataset

    return check_det_dataset(resolve_data(data), split=split)


def make_synthetic_data(protocol: str = "gen1") -> Path:
    """Generate (once) the synthetic Gen1 or 1 Mpx recordings, their split caches and a data YAML; return the YAML."""
    from ems_yolo.events.synthetic import make_synthetic_gen1, make_synthetic_gen4

    root = (make_synthetic_gen1 if protocol == "gen1" else make_synthetic_gen4)()
    with open(root.with_name(f"{root.name}.lock"), "a") as lock:  # the processes of a run (torchrun's ranks)
        fcntl.flock(lock, fcntl.LOCK_EX)  # build the caches once, one after the other: the first one writes them
        preprocess_dataset(root, root / "cache", protocol, progress=False)
        return write_event_data_yaml(root / "cache")


def _missing_message(src: Path, d: dict, root: Path, missing: list[Path]) -> str:
    """Explain which files are missing and how to obtain the dataset (the YAML's `get:` text when it has one)."""
    lines = [
        f"dataset '{src}': images not found (missing {', '.join(str(m) for m in missing[:3])}).",
        f"ems-yolo never downloads data. Put the dataset under {root} or set 'path:' in a copy of {src.name}.",
    ]
    if d.get("get"):
        lines.append(str(d["get"]).strip())
    return "\n".join(lines)
