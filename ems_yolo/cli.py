"""`ems-yolo` command line: Typer commands taking Ultralytics-style `key=value` arguments."""

from __future__ import annotations

import difflib
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
}
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
    model = EMSYOLO(ours.get("model", "ems-res10.yaml"), time_steps=ours.get("time_steps"))
    if mode == "predict":
        kv.setdefault("save", True)
        results = model.predict(stream=True, **kv)  # Ultralytics consumes the stream itself for CLI callers
        for _ in results or ():  # bounded memory for long videos either way
            pass
        return None
    return getattr(model, mode)(**kv)


def _mode_help(mode: str) -> str:
    return (
        f"{MODE_HELP[mode]}\n\nems-yolo keys:\n\n{_keys_help(ENGINE_KEYS)}\n\n"
        "Every other key is an Ultralytics setting (epochs, imgsz, batch, device, project, name, conf, ...), "
        "checked by Ultralytics' config validation; cfg=file.yaml loads several at once."
    )


@app.command(context_settings=KEY_VALUE, help=_mode_help("train"))
def train(ctx: typer.Context) -> None:
    """Train through EMSTrainer (Ultralytics' loop, EMA, augmentation, checkpoints; resume=True resumes)."""
    run_mode("train", ctx.args)


@app.command(context_settings=KEY_VALUE, help=_mode_help("val"))
def val(ctx: typer.Context) -> None:
    """Validate through EMSValidator."""
    run_mode("val", ctx.args)


@app.command(context_settings=KEY_VALUE, help=_mode_help("predict"))
def predict(ctx: typer.Context) -> None:
    """Predict through Ultralytics' DetectionPredictor, streaming results."""
    run_mode("predict", ctx.args)


@app.command(context_settings=KEY_VALUE, help=_mode_help("export"))
def export(ctx: typer.Context) -> None:
    """Export through Ultralytics' Exporter."""
    run_mode("export", ctx.args)


def main() -> None:
    """Console-script entry point: user errors (bad paths, values, configs) print one line, not a traceback."""
    try:
        app()
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"ems-yolo: error: {e}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
