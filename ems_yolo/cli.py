"""`ems-yolo` command line: Typer commands taking Ultralytics-style `key=value` arguments."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import typer

import ems_yolo  # noqa: F401  (offline environment before ultralytics is imported)

app = typer.Typer(
    name="ems-yolo",
    help="Directly-trained spiking neural networks for object detection (EMS-YOLO). Arguments are key=value pairs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
KEY_VALUE = {"allow_extra_args": True, "ignore_unknown_options": True}

INFO_KEYS = {
    "model": "model YAML path or built-in name (default ems-res10.yaml)",
    "nc": "number of classes (overrides the YAML)",
    "imgsz": "input size for the GFLOPs count, int or [h, w] (default 640)",
    "time_steps": "simulation time steps T (overrides the YAML)",
    "input": "frames or events (overrides the YAML)",
    "channels": "input channels (events: T x channels per bin)",
    "detailed": "also list every parameter tensor (default False)",
}


@app.callback()
def _root() -> None:
    """Keep `ems-yolo` a group of commands (Typer collapses a lone command into the root)."""


def parse_key_values(tokens: list[str], allowed: dict[str, str], command: str) -> dict[str, Any]:
    """Parse `key=value` tokens with Ultralytics' rules; an unknown key is an error naming the closest valid one."""
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair

    out = {}
    for token in merge_equals_args(tokens):
        if "=" not in token:
            raise typer.BadParameter(f"'{token}' is not a key=value pair (see 'ems-yolo {command} --help')")
        try:
            key, value = parse_key_value_pair(token)
        except AssertionError as e:
            raise typer.BadParameter(str(e)) from None
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            known = f"Valid keys: {', '.join(allowed)}" if len(allowed) <= 12 else f"See 'ems-yolo {command} --help'."
            raise typer.BadParameter(f"'{key}' is not a valid key for '{command}'.{hint} {known}")
        out[key] = value
    return out


def _keys_help(keys: dict[str, str]) -> str:
    return "\n\n".join(f"{k}: {v}" for k, v in keys.items())


@app.command(context_settings=KEY_VALUE, help="Print a model's layer table and summary.\n\n" + _keys_help(INFO_KEYS))
def info(ctx: typer.Context) -> None:
    """Build a model from its YAML and log the layer table and the parameter / GFLOPs summary."""
    from ems_yolo.nn import EMSDetectionModel

    kv = parse_key_values(ctx.args, INFO_KEYS, "info")
    model = EMSDetectionModel(
        kv.get("model", "ems-res10.yaml"),
        ch=kv.get("channels"),
        nc=kv.get("nc"),
        verbose=False,
        time_steps=kv.get("time_steps"),
        input_kind=kv.get("input"),
    )
    model.log_layers()
    model.info(detailed=bool(kv.get("detailed", False)), imgsz=kv.get("imgsz", 640))


ENGINE_KEYS = {
    "model": "model YAML (built-in name or path) or weights (.pt, .onnx, .torchscript); default ems-res10.yaml",
    "time_steps": "simulation time steps T; overrides the model YAML or checkpoint (PyTorch models only)",
    "ann": "build the ANN twin of the model YAML: LIF replaced by ReLU, T=1 (default False)",
    "checkpoint": "train: activation checkpointing, recompute each layer in backward to save memory (default False)",
    "events": "predict: simulate events from a video source first, then detect on them (default False)",
    "energy": "val: also measure firing rates and the energy estimate on the validation data (default False)",
    "stride_ms": "predict on events: step of the sliding window along a .dat recording (default 50)",
}
EVENT_SUFFIXES = (".dat", ".h5", ".hdf5")
MODE_HELP = {
    "train": "Train a spiking detector. data= defaults to the built-in shapes dataset (also data=shapes).",
    "val": "Validate a model (mAP50, mAP50-95; save_json=True adds pycocotools mAP).",
    "predict": "Run detection on images, folders, globs, videos, webcams (source=0) or streams; source= is required.",
    "export": "Export to format=onnx or format=torchscript (T unrolled into the graph).",
}


def engine_overrides(tokens: list[str], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split key=value tokens into ems-yolo keys and Ultralytics overrides validated by Ultralytics' own checks."""
    from ultralytics.cfg import check_dict_alignment, get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT, YAML

    allowed = {**ENGINE_KEYS, **{k: "" for k in DEFAULT_CFG_DICT}}
    kv = parse_key_values(tokens, allowed, mode)
    if "cfg" in kv:  # a YAML of overrides, as `yolo cfg=...`; explicit keys win
        kv = {**YAML.load(kv.pop("cfg")), **kv}
    ours = {k: kv.pop(k) for k in list(kv) if k in ENGINE_KEYS}
    try:
        check_dict_alignment(DEFAULT_CFG_DICT, kv)
        get_cfg(DEFAULT_CFG_DICT, {**kv, "mode": mode})  # type and range checks
    except (SyntaxError, TypeError, ValueError) as e:
        raise typer.BadParameter(str(e).strip()) from None
    return ours, kv


def run_mode(mode: str, tokens: list[str]):
    """Build the model and run one engine mode with the validated overrides."""
    from ems_yolo.engine.model import EMSYOLO

    ours, kv = engine_overrides(tokens, mode)
    if mode == "predict" and kv.get("source") is None:
        raise typer.BadParameter("predict needs source=<image, folder, glob, video, URL or webcam index>")
    if mode == "predict" and (ours.get("events") or str(kv["source"]).endswith(EVENT_SUFFIXES)):
        return predict_on_events(ours, kv)
    model = EMSYOLO(
        ours.get("model", "ems-res10.yaml"),
        time_steps=ours.get("time_steps"),
        ann=bool(ours.get("ann")),
        checkpoint=bool(ours.get("checkpoint")),
    )
    if mode == "val" and ours.get("energy"):
        model.add_callback("on_val_end", _energy_after_val(model))
    if mode == "predict":
        kv.setdefault("save", True)
        results = model.predict(stream=True, **kv)  # Ultralytics consumes the stream itself for CLI callers
        for _ in results or ():  # bounded memory for long videos either way
            pass
        return None
    return getattr(model, mode)(**kv)


def _energy_after_val(model):
    """Callback: energy report on the validator's own data loader, saved into the validation run folder."""

    def callback(validator) -> None:
        from ems_yolo.engine.energy import run_energy
        from ems_yolo.utils.flops import image_hw

        run_energy(model.model, validator.dataloader, max(image_hw(validator.args.imgsz)), validator.save_dir)

    return callback


def predict_on_events(ours: dict[str, Any], kv: dict[str, Any]) -> None:
    """Event sources (.dat recordings, .h5 caches, or videos with events=True): sliding-window detection."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.files import increment_path

    from ems_yolo.engine.model import default_project
    from ems_yolo.events.predict import predict_events
    from ems_yolo.events.simulator import video_to_events

    args = get_cfg(DEFAULT_CFG_DICT, {**kv, "mode": "predict"})
    project = Path(args.project or default_project())
    out_dir = increment_path(project / (args.name or "predict"), exist_ok=args.exist_ok)
    source = Path(str(args.source))
    if ours.get("events") and not str(source).endswith(EVENT_SUFFIXES):
        out_dir.mkdir(parents=True, exist_ok=True)
        dat = out_dir / f"{source.stem}_td.dat"
        n = len(video_to_events(source, dat, progress=True))
        typer.echo(f"simulated {n:,} events from {source} -> {dat}")
        source = dat
    out = predict_events(
        ours.get("model", "ems-res10.yaml"), source, out_dir, stride_ms=float(ours.get("stride_ms", 50)),
        conf=args.conf if args.conf is not None else 0.25, iou=args.iou, max_det=args.max_det,
        imgsz=kv.get("imgsz"), save_video=args.save is not False,
    )
    typer.echo(f"detections -> {out}\nannotated video -> {out.parent}")


def _mode_help(mode: str) -> str:
    return (
        f"{MODE_HELP[mode]}\n\nems-yolo keys:\n\n{_keys_help(ENGINE_KEYS)}\n\n"
        "Every other key is an Ultralytics setting (epochs, imgsz, batch, device, project, name, conf, ...), "
        "checked by Ultralytics' config validation; cfg=file.yaml loads several at once."
    )


def _engine_command(mode: str) -> None:
    """Register `ems-yolo <mode>`: Ultralytics' engine for that mode (trainer, validator, predictor, exporter)."""

    def command(ctx: typer.Context) -> None:
        run_mode(mode, ctx.args)

    app.command(name=mode, context_settings=KEY_VALUE, help=_mode_help(mode))(command)


for _mode in MODE_HELP:
    _engine_command(_mode)


ENERGY_KEYS = {
    "model": "model YAML or .pt (default ems-res10.yaml)",
    "data": "dataset whose validation images drive the firing rates (default: the checkpoint's, else shapes)",
    "imgsz": "input size (default: the training size of a .pt, else 640)",
    "time_steps": "override T",
    "ann": "report the ANN twin itself (ReLU, T=1): every conv is a MAC layer",
    "batch": "images per batch (default 8)",
    "max_batches": "stop after this many batches (default: the whole split)",
    "split": "dataset split (default val)",
    "e_ac": "energy of one accumulate in pJ (default 0.9, 45 nm FP32)",
    "e_mac": "energy of one multiply-accumulate in pJ (default 4.6)",
    "preset": "fp32, fp16 or int8 constants (Horowitz 2014) instead of e_ac/e_mac",
    "project": "output folder parent (default runs/detect)",
    "name": "run folder name (default energy)",
    "device": "cpu or a CUDA device",
}
GEN1_KEYS = {
    "src": "Gen1 root folder holding train/ val/ test/ with <name>_td.dat + <name>_bbox.npy",
    "dst": "output HDF5 cache file (resumed when it exists)",
    "representation": "ems_frames (default, the paper's), histogram or voxel",
    "bins": "time bins per sample = model time steps T (default 5)",
    "window_ms": "window before each label (default 250)",
    "height": "sensor height (default 240)",
    "width": "sensor width (default 304)",
    "cutoff": "histogram count clip / voxel scale (default 10)",
    "splits": "splits to process (default [train, val, test])",
}
EVENTS_KEYS = {
    "source": "input video (any format OpenCV reads)",
    "out": "output Prophesee .dat file (default <video stem>_td.dat beside the video)",
    "width": "sensor width to resize to (default 304)",
    "height": "sensor height to resize to (default 240)",
    "c_on": "ON contrast threshold in log intensity (default 0.2)",
    "c_off": "OFF contrast threshold (default 0.2)",
    "sigma": "per-pixel threshold spread (default 0)",
    "refractory_us": "refractory period in microseconds (default 0)",
    "noise_hz": "shot-noise events per pixel per second (default 0)",
    "seed": "random seed (default 0)",
    "max_frames": "stop after this many frames",
}


@app.command(context_settings=KEY_VALUE, help="Per-layer firing rates, synaptic operations and energy vs the ANN "
             "twin (E = T x (SOPs x E_AC + MACs x E_MAC)); writes energy.csv, energy.json and firing_rates.png.\n\n"
             + _keys_help(ENERGY_KEYS))
def energy(ctx: typer.Context) -> None:
    """Energy report of a spiking model on real data."""
    from ems_yolo.engine.model import EMSYOLO

    kv = parse_key_values(ctx.args, ENERGY_KEYS, "energy")
    model = EMSYOLO(kv.pop("model", "ems-res10.yaml"), time_steps=kv.pop("time_steps", None), ann=bool(kv.pop("ann", False)))
    model.energy(**kv)


@app.command(context_settings=KEY_VALUE, help="Gen1 tools. 'ems-yolo gen1 preprocess src=... dst=...' builds the "
             "HDF5 sample cache used for training (resumable).\n\n" + _keys_help(GEN1_KEYS))
def gen1(ctx: typer.Context, action: str = typer.Argument(..., help="preprocess")) -> None:
    """Build a Gen1 sample cache from the raw recordings."""
    from ems_yolo.events.gen1 import SPLITS, preprocess_gen1
    from ems_yolo.events.representations import EventRepresentation

    if action != "preprocess":
        raise typer.BadParameter(f"unknown gen1 action '{action}', expected 'preprocess'")
    kv = parse_key_values(ctx.args, GEN1_KEYS, "gen1 preprocess")
    for key in ("src", "dst"):
        if key not in kv:
            raise typer.BadParameter(f"gen1 preprocess needs {key}=")
    rep_keys = {"name": kv.get("representation", "ems_frames")}
    rep_keys.update({k: kv[k] for k in ("bins", "height", "width", "cutoff") if k in kv})
    if "window_ms" in kv:
        rep_keys["window_us"] = int(float(kv["window_ms"]) * 1000)
    splits = kv.get("splits", SPLITS)
    if isinstance(splits, str):  # splits=[train,val] or splits=train,val arrive as text
        splits = [x.strip(" '\"") for x in splits.strip("[]()").split(",") if x.strip()]
    out = preprocess_gen1(str(kv["src"]), str(kv["dst"]), EventRepresentation.from_dict(rep_keys), tuple(splits))
    typer.echo(f"cache written: {out}")


@app.command(context_settings=KEY_VALUE, help="Simulate an event camera from a video and write a Prophesee .dat "
             "file.\n\n" + _keys_help(EVENTS_KEYS))
def events(ctx: typer.Context) -> None:
    """Video to events (ESIM-style simulator)."""
    from ems_yolo.events.simulator import SimulatorConfig, video_to_events

    kv = parse_key_values(ctx.args, EVENTS_KEYS, "events")
    if "source" not in kv:
        raise typer.BadParameter("events needs source=<video>")
    source = Path(str(kv["source"]))
    out = Path(str(kv.get("out", source.with_name(f"{source.stem}_td.dat"))))
    sim = {k: kv[k] for k in ("c_on", "c_off", "sigma", "refractory_us", "noise_hz", "seed") if k in kv}
    ev = video_to_events(source, out, width=int(kv.get("width", 304)), height=int(kv.get("height", 240)),
                         config=SimulatorConfig(**sim), max_frames=kv.get("max_frames"), progress=True)
    typer.echo(f"{len(ev):,} events -> {out}")


def main() -> None:
    """Console-script entry point: user errors (bad paths, values, configs) print one line, not a traceback."""
    try:
        app()
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"ems-yolo: error: {e}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
