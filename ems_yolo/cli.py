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
            raise typer.BadParameter(f"'{key}' is not a valid key for '{command}'.{hint} Valid keys: {', '.join(allowed)}")
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


def main() -> None:
    """Console-script entry point: user errors (bad paths, values, configs) print one line, not a traceback."""
    try:
        app()
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"ems-yolo: error: {e}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
