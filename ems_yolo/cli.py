"""`ems-yolo` command line: Typer commands taking Ultralytics-style `key=value` arguments."""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import typer

from ems_yolo.cfg import (
    BENCHMARK_KEYS,
    CONVERT_KEYS,
    ENERGY_KEYS,
    ENGINE_KEYS,
    EVENTS_KEYS,
    DATASET_KEYS,
    INFO_KEYS,
    MODE_HELP,
    MODE_ONLY_KEYS,
    MODEL_KEYS,
    check_cfg_file,
    check_values,
    default_project,
)
from ems_yolo.utils.settings import SETTINGS

app = typer.Typer(
    name="ems-yolo",
    help="Directly-trained spiking neural networks for object detection (EMS-YOLO). Arguments are key=value pairs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # help texts are plain: "[h, w]" is text, not markup
    add_completion=False,
    pretty_exceptions_enable=False,
)
KEY_VALUE = {"allow_extra_args": True, "ignore_unknown_options": True}


class UsageError(ValueError):
    """A bad command line: an unknown key, a value of the wrong type or range, a missing required key."""


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", help="Print the version and exit.")
          ) -> None:
    """Keep `ems-yolo` a group of commands (Typer collapses a lone command into the root); alone, it prints this
    help and exits 0, as `yolo` does."""
    if version:
        _version()
    elif ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
    else:
        return
    raise typer.Exit()


def _version() -> None:
    from ems_yolo import __version__

    typer.echo(f"ems-yolo {__version__}")


def parse_key_values(tokens: list[str], allowed: dict[str, str], command: str) -> dict[str, Any]:
    """Parse `key=value` tokens with Ultralytics' rules; an unknown key is an error naming the closest valid one."""
    from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
    from ultralytics.cfg import merge_equals_args, parse_key_value_pair

    out = {}
    for token in merge_equals_args(tokens):
        if "=" not in token:
            raise UsageError(f"'{token}' is not a key=value pair (see 'ems-yolo {command} --help')")
        try:
            key, value = parse_key_value_pair(token)
        except AssertionError as e:
            raise UsageError(str(e)) from None
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            known = f"Valid keys: {', '.join(allowed)}" if len(allowed) <= 12 else f"See 'ems-yolo {command} --help'."
            raise UsageError(f"'{key}' is not a valid key for '{command}'.{hint} {known}")
        out[key] = value
    return check_values(out, command)


def require(kv: dict[str, Any], key: str, command: str, what: str = "") -> None:
    """A missing required key is a usage error naming it (and what it takes)."""
    if kv.get(key) is None:
        raise UsageError(f"{command} needs {key}=" + (f"<{what}>" if what else ""))


def _keys_help(keys: dict[str, str]) -> str:
    return "\n\n".join(f"{k}: {v}" for k, v in keys.items())


def _model(kv: dict[str, Any], keys: tuple[str, ...] = MODEL_KEYS):
    """EMSYOLO built from the model-choosing keys, which are taken out of `kv`."""
    from ems_yolo.engine.model import EMSYOLO

    return EMSYOLO(**{k: kv.pop(k) for k in keys if k in kv})


def _model_command(name: str, keys: dict[str, str], text: str, model_keys: tuple[str, ...] = MODEL_KEYS) -> None:
    """Register `ems-yolo <name>`: EMSYOLO(<model keys>).<name>(<the other keys>)."""

    def command(ctx: typer.Context) -> None:
        kv = parse_key_values(ctx.args, keys, name)
        getattr(_model(kv, model_keys), name)(**kv)

    app.command(name=name, context_settings=KEY_VALUE, help=f"{text}\n\n{_keys_help(keys)}")(command)


_model_command("info", INFO_KEYS, "Print a model's layer table and summary.",
               ("model", "time_steps", "nc", "channels", "input"))


def engine_overrides(tokens: list[str], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split key=value tokens into ems-yolo keys and Ultralytics overrides validated by Ultralytics' own checks."""
    from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
    from ultralytics.cfg import check_dict_alignment, get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    allowed = {**ENGINE_KEYS, **{k: "" for k in DEFAULT_CFG_DICT}}
    kv = parse_key_values(tokens, allowed, mode)
    if "cfg" in kv:  # a YAML of overrides, as `yolo cfg=...`, checked as the command line is; explicit keys win
        kv = {**check_cfg_file(kv.pop("cfg"), mode), **kv}
    ours = {k: kv.pop(k) for k in list(kv) if k in ENGINE_KEYS}
    for key in ours:
        if MODE_ONLY_KEYS.get(key, mode) != mode:
            raise UsageError(f"'{key}' applies to '{MODE_ONLY_KEYS[key]}' only, not to '{mode}'")
    try:
        check_dict_alignment(DEFAULT_CFG_DICT, kv)
        get_cfg(DEFAULT_CFG_DICT, {**kv, "mode": mode})  # type and range checks
    except (SyntaxError, TypeError, ValueError) as e:
        raise UsageError(str(e).strip()) from None
    return ours, kv


def run_mode(mode: str, tokens: list[str]):
    """EMSYOLO(model keys).<mode>(every other key): the facade does the work."""
    ours, kv = engine_overrides(tokens, mode)
    if mode in ("predict", "track"):
        events = ", .dat/.raw/.h5" if mode == "predict" else ""
        require(kv, "source", mode, f"image, folder, glob, video, URL or webcam index{events}")
    model = _model(ours)
    if mode in ("predict", "track"):
        kv.setdefault("save", True)
        for _ in getattr(model, mode)(stream=True, **ours, **kv) or ():  # bounded memory for long sources
            pass
        return None
    return getattr(model, mode)(**ours, **kv)


def _mode_help(mode: str) -> str:
    keys = {k: v for k, v in ENGINE_KEYS.items() if MODE_ONLY_KEYS.get(k, mode) == mode}
    return (
        f"{MODE_HELP[mode]}\n\nems-yolo keys:\n\n{_keys_help(keys)}\n\n"
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


_model_command("benchmark", BENCHMARK_KEYS, "Size, mAP50-95 and inference speed of a model as PyTorch and in each "
               "export format, validated on the data you name (nothing is downloaded); writes benchmarks.csv.")


@app.command(context_settings=KEY_VALUE, help="Tune training hyperparameters with Ultralytics' Tuner (iterations=N "
             "trainings, each mutating the fittest so far; lr0, momentum, weight decay, warm-up and augmentation "
             "keys); writes best_hyperparameters.yaml into runs/detect/tune.\n\niterations: number of trainings "
             "(default 300)\n\nEvery other key is a train key (model, data, epochs, imgsz, ...; see 'ems-yolo train "
             "--help').")
def tune(ctx: typer.Context) -> None:
    """EMSYOLO(model, ...).tune(iterations=..., <train keys>)."""
    tune_keys = parse_key_values([t for t in ctx.args if t.startswith("iterations=")], {"iterations": ""}, "tune")
    ours, kv = engine_overrides([t for t in ctx.args if not t.startswith("iterations=")], "train")
    out = _model(ours).tune(**tune_keys, **ours, **kv)
    typer.echo(f"best hyperparameters -> {out / 'best_hyperparameters.yaml'}")


_model_command("energy", ENERGY_KEYS, "Per-layer firing rates, synaptic operations and energy vs the ANN twin "
               "(E = T x (SOPs x E_AC + MACs x E_MAC)); writes energy.csv, energy.json and firing_rates.png.")


@app.command(context_settings=KEY_VALUE, help="Convert a checkpoint of the original EMS-YOLO code (BICLab/EMS-YOLO) "
             "or of SpikeYOLO's (BICLab/SpikeYOLO) into an ems-yolo checkpoint, read without executing it. Every "
             "ems-yolo command also takes such a file directly as model=.\n\n" + _keys_help(CONVERT_KEYS))
def convert(ctx: typer.Context) -> None:
    """convert_original(source, out, model, time_steps)."""
    from ems_yolo.engine.checkpoints import convert_original

    kv = parse_key_values(ctx.args, CONVERT_KEYS, "convert")
    require(kv, "source", "convert", "checkpoint of the original EMS-YOLO code")
    out = convert_original(str(kv["source"]), kv.get("out"), kv.get("model"), kv.get("time_steps"))
    typer.echo(f"ems-yolo checkpoint -> {out}")


def _preprocess(dataset: str, action: str, ctx: typer.Context) -> None:
    """`ems-yolo <dataset> preprocess`: the split caches and data YAML of a Gen1 or 1 Mpx folder."""
    from ems_yolo.events.automotive import SPLITS, default_representation, preprocess_dataset, write_event_data_yaml
    from ems_yolo.events.protocols import get_protocol
    from ems_yolo.utils.files import read_yaml_mapping

    if action != "preprocess":
        raise UsageError(f"unknown {dataset} action '{action}', expected 'preprocess'")
    kv = parse_key_values(ctx.args, DATASET_KEYS, f"{dataset} preprocess")
    for key in ("src", "dst"):
        require(kv, key, f"{dataset} preprocess")
    p = get_protocol(dataset)
    rep_keys = {"name": kv.get("representation", "ems_frames")}
    rep_keys.update({k: kv[k] for k in ("bins", "cutoff") if k in kv})
    rep_keys.update({k: kv[k] // p.downsample for k in ("height", "width") if k in kv})  # sensor -> input size
    if "window_ms" in kv:
        rep_keys["window_us"] = int(float(kv["window_ms"]) * 1000)
    rep_keys.update({f"{k}_us": int(round(float(kv[f"{k}_ms"]) * 1000)) for k in ("bin", "spacing") if f"{k}_ms" in kv})
    if "closed" in kv:
        rep_keys["closed"] = bool(kv["closed"])
    splits = kv.get("splits", SPLITS)
    if isinstance(splits, str):  # splits=[train,val] or splits=train,val arrive as text
        splits = [x.strip(" '\"") for x in splits.strip("[]()").split(",") if x.strip()]
    preprocess_dataset(str(kv["src"]), str(kv["dst"]), p, default_representation(p, **rep_keys), tuple(splits),
                       workers=kv.get("workers", 1))
    out = write_event_data_yaml(str(kv["dst"]))
    if read_yaml_mapping(Path(out)).get("train"):
        typer.echo(f"caches written; train with: ems-yolo train data={out}")
    else:
        typer.echo(f"caches written (no train split): data={out}")


_PREPROCESS_HELP = ("'ems-yolo {0} preprocess src=... dst=<folder>' builds one HDF5 sample cache per split and "
                    "data.yaml for training (resumable; workers=N processes recordings in parallel).\n\n")


@app.command(context_settings=KEY_VALUE, help="Gen1 tools (304x240, car and pedestrian). "
             + _PREPROCESS_HELP.format("gen1") + _keys_help(DATASET_KEYS))
def gen1(ctx: typer.Context, action: str = typer.Argument(..., help="preprocess")) -> None:
    """Build the Gen1 split caches and their data YAML from the recordings."""
    _preprocess("gen1", action, ctx)


@app.command(context_settings=KEY_VALUE, help="1 Megapixel dataset tools (1280x720; RVT's protocol: pedestrian, "
             "two-wheeler and car at half resolution). " + _PREPROCESS_HELP.format("gen4") + _keys_help(DATASET_KEYS))
def gen4(ctx: typer.Context, action: str = typer.Argument(..., help="preprocess")) -> None:
    """Build the 1 Mpx split caches and their data YAML from the recordings."""
    _preprocess("gen4", action, ctx)


def events_output(video: Path) -> Path:
    """Where `events source=<video>` writes without out=: <runs_dir>/events/<stem>_td.dat, numbered (<stem>-2_td.dat,
    ...) rather than replacing an earlier run's file."""
    from ems_yolo.utils.settings import runs_dir

    out, n = runs_dir() / "events" / f"{video.stem}_td.dat", 1
    while out.exists():
        n += 1
        out = out.with_name(f"{video.stem}-{n}_td.dat")
    return out


@app.command(context_settings=KEY_VALUE, help="Event files: simulate an event camera from a video (a Prophesee "
             ".dat), convert a recording between formats (source=x.raw out=x_td.dat; .dat, EVT 2.0/2.1/3.0 .raw and "
             ".npy in, .dat and EVT 2.0 .raw out), or describe one (info=True).\n\n" + _keys_help(EVENTS_KEYS))
def events(ctx: typer.Context) -> None:
    """Video to events (ESIM-style simulator), event-file conversion, or event-file info."""
    from ems_yolo.events.formats import EVENT_FILE_SUFFIXES, convert_events, open_events
    from ems_yolo.events.simulator import SimulatorConfig, video_to_events
    from ems_yolo.utils.files import refuse_overwriting_inputs

    kv = parse_key_values(ctx.args, EVENTS_KEYS, "events")
    require(kv, "source", "events", "video or event file")
    source = Path(str(kv["source"]))
    if source.suffix.lower() in EVENT_FILE_SUFFIXES:
        if kv.get("info"):
            typer.echo(open_events(source).describe())
            return
        if "out" not in kv:
            raise UsageError(f"events source={source} needs out=<file.dat or file.raw> (or info=True)")
        out, n = convert_events(source, str(kv["out"]), kv.get("width"), kv.get("height"))
        typer.echo(f"{n:,} events -> {out}")
        return
    if kv.get("info"):
        raise UsageError(f"info=True describes an event file ({', '.join(EVENT_FILE_SUFFIXES)}), not {source}")
    out = Path(str(kv["out"])) if "out" in kv else events_output(source)
    refuse_overwriting_inputs(out, source=source)
    sim = {k: kv[k] for k in ("c_on", "c_off", "sigma", "refractory_us", "noise_hz", "seed") if k in kv}
    ev = video_to_events(source, out, width=int(kv.get("width", 304)), height=int(kv.get("height", 240)),
                         config=SimulatorConfig(**sim), max_frames=kv.get("max_frames"), progress=True)
    typer.echo(f"{len(ev):,} events -> {out}")


@app.command(context_settings=KEY_VALUE, help="Show the environment: versions, CUDA and Triton, offline settings, "
             "where data, settings and runs go.")
def checks(ctx: typer.Context) -> None:
    """`ems-yolo checks` (Ultralytics' `yolo checks`)."""
    from ems_yolo.engine.checks import environment_report

    parse_key_values(ctx.args, {}, "checks")
    typer.echo("\n".join(environment_report()))


@app.command(context_settings=KEY_VALUE, help="Show ems-yolo's settings file (not Ultralytics'), change a setting "
             "(ems-yolo settings runs_dir=/data/runs) or restore the defaults (ems-yolo settings reset).\n\n"
             + _keys_help({k: v[1] for k, v in SETTINGS.items()}))
def settings(ctx: typer.Context) -> None:
    """Show, update or reset `$EMS_YOLO_HOME/settings.yaml`."""
    from ems_yolo.utils.settings import load_settings, reset_settings, settings_file, update_settings

    tokens = list(ctx.args)
    reset = "reset" in tokens
    if reset:
        tokens.remove("reset")
    kv = parse_key_values(tokens, {k: v[1] for k, v in SETTINGS.items()}, "settings")
    if reset:
        reset_settings()
    current = update_settings(**kv) if kv else load_settings()
    typer.echo(f"ems-yolo settings ({settings_file()}):")
    typer.echo("\n".join(f"  {k}: {v}" for k, v in current.items()))


@app.command(name="version", help="Print the version of ems-yolo (also: ems-yolo --version).")
def version_command() -> None:
    """`ems-yolo version`."""
    _version()


@app.command(name="help", help="Show the commands (also: ems-yolo -h, ems-yolo --help).")
def help_command(ctx: typer.Context) -> None:
    """`ems-yolo help`: the root help."""
    typer.echo(ctx.parent.get_help())


USER_ERRORS = (OSError, ValueError)  # bad paths, values, configs and files (OSError: also permissions)
EXIT_USAGE = 2  # every user error, as for a command-line usage error
OUTPUT_KEYS = ("out", "dst", "project")  # where a command writes, named by an OSError that names no file


def _where(e: OSError, argv: list[str]) -> str:
    """The file a system error is about (its `filename`), else where the command was writing (a full disk, a write
    refused by a limit); '' when neither is known."""
    if e.filename is not None:
        return str(e.filename)
    given = dict(a.split("=", 1) for a in argv if "=" in a)
    key = next((k for k in OUTPUT_KEYS if k in given), None)
    if key:
        return f"{key}={given[key]}"
    return f"project={default_project()}" if argv and argv[0] in (*MODE_HELP, "energy") else ""


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("EMS_YOLO_DEBUG", "").lower() not in ("", "0", "false", "no")


def run(argv: list[str]) -> int:
    """Run the command line `argv` and return its exit code. A user error prints one line,
    `ems-yolo: error: <file or key>: <what is wrong>, expected <what>` (hint lines may follow), and returns 2 (as
    Typer does for an unknown command); `--debug` anywhere in `argv` or EMS_YOLO_DEBUG=1 raises it with its
    traceback instead."""
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except USER_ERRORS as e:
        if debug:
            raise
        lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        where = _where(e, argv) if isinstance(e, OSError) and e.errno is not None else ""  # raised by the system
        if where and where not in lines[0]:
            lines[0] = f"{where}: {lines[0]}" if e.filename is not None else f"{lines[0]} (writing to {where})"
        typer.secho(f"ems-yolo: error: {lines[0]}", err=True, fg=typer.colors.RED)
        for line in lines[1:]:
            typer.echo(f"  {line.strip()}", err=True)
        return EXIT_USAGE
    return 0


def main() -> None:
    """Console-script entry point (`run` on the process arguments)."""
    raise SystemExit(run(sys.argv[1:]))
