"""EMSYOLO: the `ultralytics.YOLO`-style facade for spiking EMS models; every mode of the CLI is one of its methods.

    EMSYOLO("ems-res10.yaml").train(data="coco8.yaml", epochs=3)
    EMSYOLO("runs/detect/train/weights/best.pt").val(energy=True)
    EMSYOLO("best.pt").predict("video.mp4"); EMSYOLO("best.pt").predict("recording_td.dat", stride_ms=50)
    EMSYOLO("best.pt").export(format="onnx"); EMSYOLO("best.pt").energy(data="gen1-synthetic")
    EMSYOLO("original-best.pt", time_steps=4).val(data="coco.yaml")  # a checkpoint of the original EMS-YOLO code

`ann=True` builds the ANN twin of a YAML (LIF replaced by ReLU, T = 1), trained and used the same way;
`checkpoint=True` recomputes activations in backward (less training memory, more compute); `sync_bn=True` shares
tdBN batch statistics across the processes of a distributed run; `nc`, `channels` and
`input` override those keys of a YAML. Time steps come from the model YAML or checkpoint and can be overridden with
`time_steps=`; an override of a YAML is written to a derived YAML file (the trainer rebuilds models from the file
named in its arguments, also in DDP workers), so the new T is what checkpoints record.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.cfg import get_cfg
from ultralytics.engine.model import Model
from ultralytics.utils import DEFAULT_CFG, LOGGER

from ems_yolo.cfg import (
    BUILTIN_DATA,
    DEFAULT_MODEL,
    EXPORT_PACKAGES,
    EMS_TRAIN_DEFAULTS,
    EMS_VAL_DEFAULTS,
    EVENT_CACHE_SUFFIXES,
    EVENT_SUFFIXES,
    builtin_train_defaults,
    check_cfg_file,
    default_project,
    check_values,
    ems_home,
    find_model_yaml,
    load_model_yaml,
)
from ems_yolo.data.datasets import load_data, resolve_data
from ems_yolo.data.verify import check_media_source
from ems_yolo.engine.checkpoints import foreign_format, load_converted, trust_file, write_checkpoint
from ems_yolo.engine.cuda_graph import use_cuda_graph
from ems_yolo.engine.predictor import EventPredictor, FramePredictor, frame_predictor
from ems_yolo.engine.trainer import EMSTrainer, model_for_data
from ems_yolo.engine.validator import EMSValidator
from ems_yolo.nn.model import EMSDetectionModel, ann_twin
from ems_yolo.nn.parser import ULTRALYTICS_HEADS
from ems_yolo.nn.spike_driven import to_spike_driven
from ems_yolo.utils.checks import check_exported_model
from ems_yolo.utils.files import claim_run, content_addressed, no_half_written_runs, read_yaml_mapping

YAML_OVERRIDES = ("nc", "channels", "input")  # model YAML keys that EMSYOLO(...) may override besides T


def derive_model_yaml(cfg: dict) -> Path:
    """Write a model dict to `$EMS_YOLO_HOME/models/<stem>-<hash>.yaml` (content-addressed, written once)."""
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != "yaml_file"}, sort_keys=False)
    return content_addressed(ems_home() / "models", Path(cfg.get("yaml_file", "model")).stem, text)


def resolve_model_source(
    model: str | Path, time_steps: int | None = None, ann: bool = False, checkpoint: bool = False,
    sync_bn: bool = False, **overrides
) -> str:
    """Map a model argument to a YAML path or an existing weights file; errors early for missing files.

    `time_steps`, `ann` (the ANN twin: ReLU, T=1), `checkpoint` (activation checkpointing), `sync_bn` (tdBN over
    all processes of a distributed run) and YAML `overrides` (nc, channels, input) on a YAML are written to a
    derived YAML.
    """
    unknown = set(overrides) - set(YAML_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown model setting(s) {sorted(unknown)}; expected time_steps, ann, checkpoint or "
                        f"{', '.join(YAML_OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    text = str(model).strip()
    p = Path(text).expanduser()
    if p.suffix in (".yaml", ".yml") or (not p.suffix and not p.exists()):
        path = find_model_yaml(text)
        if time_steps or ann or checkpoint or sync_bn or overrides:
            cfg = {**load_model_yaml(path), **overrides}
            if time_steps:
                cfg["time_steps"] = int(time_steps)
            for key, on in (("checkpoint", checkpoint), ("sync_bn", sync_bn)):
                if on:
                    cfg[key] = True
            path = derive_model_yaml(ann_twin(cfg) if ann else cfg)
        return str(path)
    if ann or checkpoint or sync_bn or overrides:
        raise ValueError(f"ann, checkpoint, sync_bn, {', '.join(YAML_OVERRIDES)} are model YAML settings; '{text}' is "
                         "a weights file")
    if not p.exists():
        raise FileNotFoundError(f"{text}: model weights not found (ems-yolo does not download weights)")
    check_exported_model(p)
    return str(p)


def missing_export_packages(fmt: str) -> list[str]:
    """The packages an export format needs (EXPORT_PACKAGES) that are not installed."""
    import importlib.util

    return [p for p in EXPORT_PACKAGES.get(str(fmt).lower(), ((), ""))[0] if importlib.util.find_spec(p) is None]


def check_export_packages(fmt: str) -> None:
    """A ValueError naming the missing packages of an export format and the extra that installs them (Ultralytics
    would try to pip-install them, which ems-yolo keeps off, and fail with a traceback)."""
    missing = missing_export_packages(fmt)
    if missing:
        raise ValueError(f"format={fmt} needs {', '.join(missing)}, expected installed: pip install "
                         f"'ems-yolo[{EXPORT_PACKAGES[str(fmt).lower()][1]}]'")


def _guarded(results, project: str | Path) -> Iterator:
    """Iterate a prediction stream; a failure removes the run folder it created (`no_half_written_runs`)."""
    with no_half_written_runs(project):
        yield from results or ()


class EMSYOLO(Model):
    """Spiking YOLO model: info, train, val, predict (frames and events), export and energy through one object."""

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        task: str = "detect",
        verbose: bool = False,
        time_steps: int | None = None,
        ann: bool = False,
        checkpoint: bool = False,
        sync_bn: bool = False,
        trust: bool = False,
        **overrides,
    ):
        check_values({"ann": ann, "checkpoint": checkpoint, "sync_bn": sync_bn, "trust": trust})
        overrides = check_values(overrides)
        time_steps = check_values({"time_steps": time_steps})["time_steps"]
        source = resolve_model_source(model, time_steps, ann, checkpoint, sync_bn, **overrides)
        if trust:  # the user vouches for the file: unpickle it without the allow-list
            trust_file(source)
        self._conversion_time_steps = time_steps  # read by _load if `source` is an original EMS-YOLO checkpoint
        # the model part of this model's `ems-yolo` command line (for printed hints)
        self._model_keys = {"model": str(model), "time_steps": time_steps, "ann": ann, "checkpoint": checkpoint,
                            "sync_bn": sync_bn, "trust": trust, **overrides}
        try:
            super().__init__(source, task=task, verbose=verbose)
        except ValueError as e:  # an error in a derived YAML (overrides applied) names the user's model instead
            if source == str(model) or source not in str(e):
                raise
            raise ValueError(str(e).replace(source, str(model))) from None
        if time_steps and isinstance(self.model, nn.Module) and self.model.yaml.get("time_steps") != time_steps:
            self.model.set_time_steps(int(time_steps))
        elif time_steps and not isinstance(self.model, nn.Module):
            raise ValueError(f"time_steps is fixed in exported model '{source}' (T is unrolled into the graph)")

    @property
    def task_map(self) -> dict:
        """Engine classes for the detect task."""
        return {
            "detect": {
                "model": EMSDetectionModel,
                "trainer": EMSTrainer,
                "validator": EMSValidator,
                "predictor": FramePredictor,
            }
        }

    @property
    def time_steps(self) -> int | None:
        """T of a PyTorch model (None for exported models, whose T is baked in)."""
        return self.model.yaml.get("time_steps") if isinstance(self.model, nn.Module) else None

    def _load(self, weights: str, task: str | None = None) -> None:
        """Ultralytics' checkpoint loading; a checkpoint of the original EMS-YOLO code or of SpikeYOLO's is converted
        in memory first (read without executing it; T unless `time_steps=` is given: the original EMS-YOLO's default
        5, or what the SpikeYOLO file says)."""
        if not (str(weights).endswith(".pt") and foreign_format(weights)):
            return super()._load(weights, task)
        self.model, self.ckpt = load_converted(weights, self._conversion_time_steps)
        self.task = "detect"
        self.overrides = self.model.args = self._reset_ckpt_args(self.model.args)
        self.overrides.update(model=str(weights), task="detect")
        self.ckpt_path = self.model_name = str(weights)

    def save(self, filename: str | Path = "saved_model.pt") -> None:
        """Write the model as an ems-yolo checkpoint (FP16, atomically); for a converted original checkpoint this
        is the converted file."""
        self._check_is_pytorch_model()
        write_checkpoint({**(self.ckpt or {}), "model": self.model, "ema": None}, filename)

    def _new(self, cfg: str, task: str | None = None, *args, **kwargs) -> None:
        """Ultralytics' build from a YAML, after resolving ems-yolo's model names to their files."""
        super()._new(str(find_model_yaml(cfg)), "detect", *args, **kwargs)

    def export(self, spike_driven: bool = False, **kwargs):
        """Ultralytics' exporter (ONNX, TorchScript, ...); its closing hints name `ems-yolo` commands.
        `spike_driven=True` exports the binary-spike form of an I-LIF model (`ems_yolo.nn.spike_driven`)."""
        check_export_packages(str(kwargs.get("format", "torchscript")))  # Ultralytics' default format
        kwargs = check_values({**kwargs, "spike_driven": spike_driven})
        model = self.model
        if kwargs.pop("spike_driven"):
            self._check_is_pytorch_model()
            self.model = to_spike_driven(model)
        try:
            with ultralytics_compat.ems_yolo_hints(self._val_images()):
                return super().export(**kwargs)
        finally:
            self.model = model

    def _val_images(self) -> str | None:
        """The validation images of the dataset this model was trained on (a folder or list of images), for the
        exporter's predict hint; None for event data, or when unknown or no longer on disk."""
        try:
            d = read_yaml_mapping(Path(self.overrides["data"]), ("val",))
        except (KeyError, TypeError, OSError, ValueError):
            return None
        val = d["val"][0] if isinstance(d["val"], list) else d["val"]
        path = Path(d.get("path") or ".") / str(val)
        return str(path) if path.exists() and path.suffix.lower() not in EVENT_CACHE_SUFFIXES else None

    def info(self, detailed: bool = False, verbose: bool = True, imgsz: int | list = 640):
        """Log the layer table and the summary (layers, parameters, gradients, GFLOPs per step and over all T)."""
        self._check_is_pytorch_model()
        check_values({"imgsz": imgsz, "detailed": detailed})
        if verbose and isinstance(self.model, EMSDetectionModel):  # Ultralytics' own models log their table in info
            self.model.log_layers()
        return self.model.info(detailed=detailed, verbose=verbose, imgsz=imgsz)

    def train(self, trainer=None, **kwargs):
        """Train with the EMS-YOLO recipe defaults (overridable); `data` defaults to the built-in dataset, and the
        generated datasets train at their own size for a few CPU minutes unless imgsz=/epochs= are set."""
        user = check_values(kwargs, "train")
        user_keys = {*user, *self.overrides, *(check_cfg_file(user["cfg"], "train") if user.get("cfg") else {})}
        builtin = {} if user.get("resume") else builtin_train_defaults(
            user.get("data") or self.overrides.get("data"), user_keys)
        command = {**getattr(self, "_model_keys", {"model": self.model_name}), **user}  # for the trainer's hints
        kwargs = {**EMS_TRAIN_DEFAULTS, "project": default_project(), **builtin, **user}
        if self.ckpt and not isinstance(self.model, EMSDetectionModel):  # e.g. a stock Ultralytics YOLO .pt
            raise ValueError(f"{self.ckpt_path}: holds an Ultralytics {type(self.model).__name__} with "
                             f"{ULTRALYTICS_HEADS}")
        if kwargs.get("resume") and self.ckpt and self.ckpt.get("optimizer") is None:
            epochs = (self.ckpt.get("train_args") or {}).get("epochs")
            raise ValueError(f"{self.ckpt_path}: training{f' to {epochs} epochs' if epochs else ''} is finished "
                             "(no optimizer state), nothing to resume; expected the last.pt of an interrupted run "
                             f"(to train further from these weights: ems-yolo train model={self.ckpt_path})")
        if not kwargs.get("resume"):
            kwargs["data"] = resolve_data(kwargs.get("data") or self.overrides.get("data"))
        with no_half_written_runs(kwargs["project"]):
            return super().train(trainer=trainer or partial(EMSTrainer, command=command), **kwargs)

    def val(self, validator=None, energy: bool = False, **kwargs):
        """Validate on `data` (default: the checkpoint's dataset, else the built-in one); `energy=True` also writes
        the energy report of the validation data into the validation run folder."""
        from ems_yolo.engine.energy import energy_after_val

        kwargs = check_values({**kwargs, "energy": energy})
        energy = kwargs.pop("energy")
        kwargs["data"] = resolve_data(kwargs.get("data") or self.overrides.get("data"))
        kwargs = {**EMS_VAL_DEFAULTS, "project": default_project(), **kwargs}
        callback = energy_after_val(self.model, untrained=not self.ckpt) if energy else None
        if callback:
            self.add_callback("on_val_end", callback)
        try:
            with no_half_written_runs(kwargs["project"]):
                return super().val(validator=validator, **kwargs)
        finally:
            if callback:
                self.callbacks["on_val_end"].remove(callback)

    def predict(self, source=None, stream: bool = False, predictor=None, events: bool = False,
                stride_ms: float = 50.0, cuda_graph: bool | None = None, **kwargs):
        """Ultralytics prediction on images, videos and streams; event recordings (.dat, .raw), event caches (.h5) and,
        with `events=True`, videos simulated into events go to `EventPredictor` (window step `stride_ms`), which takes
        the same save/show keys with the same defaults (nothing saved unless `save=True`). NMS keeps val's IoU (0.6,
        the original's) unless `iou` is given. Saved results go to <runs_dir>/detect/<name> unless `project` is
        given. On CUDA the model is replayed from a CUDA graph once an input shape repeats (video frames, event
        windows); `cuda_graph=False` runs it eagerly, `cuda_graph=True` without CUDA is an error."""
        kwargs = {**EMS_VAL_DEFAULTS, **check_values({**kwargs, "events": events, "stride_ms": stride_ms,
                                                      "cuda_graph": cuda_graph})}
        stride_ms, events, cuda_graph = kwargs.pop("stride_ms"), kwargs.pop("events"), kwargs.pop("cuda_graph")
        kwargs.setdefault("project", default_project())
        pytorch = isinstance(self.model, nn.Module)
        use_cuda_graph(cuda_graph, kwargs.get("device", self.overrides.get("device")), pytorch)  # refuses early
        if not events:
            check_media_source(source)
        if events or str(source).endswith(EVENT_SUFFIXES):
            args = get_cfg(DEFAULT_CFG, {**self.overrides, "conf": 0.25, "save": False, **kwargs, "source": source,
                                         "mode": "predict"})  # Python saves nothing unless asked, as for frames
            model = self.model if isinstance(self.model, nn.Module) else self.model_name
            return EventPredictor(model, args, stride_ms=float(stride_ms), simulate=events,
                                  cuda_graph=cuda_graph)(source, stream=stream)
        predictor = predictor or frame_predictor(cuda_graph)
        if stream:  # Ultralytics' generator does its work when iterated: guard the iteration
            return _guarded(super().predict(source, True, predictor, **kwargs), kwargs["project"])
        with no_half_written_runs(kwargs["project"]):
            return super().predict(source, False, predictor, **kwargs)

    def track(self, source=None, stream: bool = False, persist: bool = False, **kwargs):
        """Ultralytics' trackers (`tracker=botsort.yaml`, the default, or `bytetrack.yaml`) on this model's
        detections of images, videos and streams; `Results.boxes.id` holds the track ids. Frame sources only (event
        recordings: predict). Needs the `lap` package (`pip install 'ems-yolo[track]'`)."""
        try:
            import lap  # noqa: F401  (Ultralytics' trackers match boxes with it, and would try to pip-install it)
        except ImportError:
            raise ValueError("tracking needs the lap package, expected it installed: pip install 'ems-yolo[track]' "
                             "(or pip install lap)") from None
        if str(source).endswith(EVENT_SUFFIXES) or kwargs.get("events"):
            raise ValueError(f"source={source}: track follows objects across frames of images, videos or streams, "
                             "expected a frame source (event recordings: ems-yolo predict)")
        return super().track(source, stream, persist, **check_values(kwargs))

    def _pytorch_only(self, what: str) -> None:
        """A ValueError (one line from the CLI) when the model is an exported file, not a YAML or .pt."""
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"{self.model_name}: {what} needs a PyTorch model (a model YAML or .pt), expected one "
                             "instead of an exported file")

    def tune(self, iterations: int = 300, space: dict | None = None, use_ray: bool = False, **kwargs) -> Path:
        """Ultralytics' hyperparameter evolution with ems-yolo's trainer, in this process: `iterations` trainings
        (each with the training `kwargs`: data, epochs, imgsz, ...), each mutating the fittest so far over `space`
        (default `TUNE_SPACE`: the optimiser and augmentation keys that change an ems-yolo training). Returns the
        tune folder (<runs_dir>/detect/tune unless project/name say otherwise) with best_hyperparameters.yaml."""
        from ems_yolo.engine.tuner import check_space, run_tuner

        self._pytorch_only("tune")
        if use_ray:
            raise ValueError("use_ray=True: Ray Tune runs Ultralytics' own trainer, which builds no ems-yolo model; "
                             "expected use_ray=False (Ultralytics' Tuner, run in this process)")
        iterations = check_values({"iterations": iterations})["iterations"]
        space = check_space(space)
        kwargs = {**EMS_TRAIN_DEFAULTS, "project": default_project(), **check_values(kwargs, "train")}
        kwargs["data"] = resolve_data(kwargs.get("data") or self.overrides.get("data"))
        return run_tuner(self.model, {**self.overrides, **kwargs, "mode": "train"}, space, iterations, self.callbacks)

    def benchmark(self, data: str | None = None, imgsz: int | None = None, format: str = "", device: str | None = None,
                  project: str | None = None, name: str = "benchmark", **kwargs) -> list[dict]:
        """Size, mAP and inference speed of this model as PyTorch and in each export format (or the one `format`
        names), validated on `data` (default: the checkpoint's dataset, else the built-in one; nothing is
        downloaded) at `imgsz` (default: the training size, else 640); everything goes into one run folder with
        benchmarks.csv. A model YAML is built for the data's classes first, as training would."""
        from ultralytics.utils.files import increment_path

        from ems_yolo.cfg import BENCHMARK_FORMATS
        from ems_yolo.engine.benchmark import benchmark_formats

        self._pytorch_only("benchmark")
        if kwargs:
            raise ValueError(f"benchmark: unknown key(s) {', '.join(sorted(kwargs))}; expected data, imgsz, format, "
                             "device, project or name")
        checked = check_values({"imgsz": imgsz, "format": format or None}, "benchmark")
        formats = (checked["format"],) if format else BENCHMARK_FORMATS
        if format:
            check_export_packages(checked["format"])
        else:  # every format whose packages are installed
            skipped = [f for f in formats if missing_export_packages(f)]
            for f in skipped:
                LOGGER.warning(f"benchmark: format={f} skipped, it needs {', '.join(missing_export_packages(f))} "
                               f"(pip install 'ems-yolo[{EXPORT_PACKAGES[f][1]}]')")
            formats = tuple(f for f in formats if f not in skipped)
        imgsz = checked["imgsz"] or int(self.overrides.get("imgsz") or 640)
        named = data or self.overrides.get("data")
        data = resolve_data(named)
        project = Path(project or default_project())
        folder = increment_path(project / name)
        with no_half_written_runs(project):
            claim_run(folder)
            stem = Path(self.ckpt_path or self.model.yaml.get("yaml_file", "model")).stem
            weights = folder / "weights" / f"{stem}.pt"
            model = self.model
            if not self.ckpt:
                dataset = load_data(data)
                model = model_for_data(self.model.yaml, dataset)
                model.names = dataset["names"]
            weights.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint({**(self.ckpt or {}), "model": model, "ema": None, "optimizer": None,  # weights only
                              "train_args": {**(self.ckpt or {}).get("train_args", {}), "data": data, "imgsz": imgsz}},
                             weights)
            return benchmark_formats(weights, data, formats, folder, imgsz, device, str(named or BUILTIN_DATA))

    def energy(
        self,
        data: str | None = None,
        imgsz: int | None = None,
        batch: int = 8,
        split: str = "val",
        max_batches: int | None = None,
        project: str | None = None,
        name: str = "energy",
        spike_driven: bool = False,
        **energy_kwargs: Any,
    ):
        """Firing rates on `data`, synaptic operations and energy vs the ANN twin; files go to a run folder.

        A model YAML is built for the dataset (its classes, channels and, for events, T = bins), as training would;
        a checkpoint is measured as it is.

        `spike_driven=True` reports the binary-spike form of an I-LIF model. `energy_kwargs`: e_ac, e_mac (pJ) or
        preset ("fp32", "fp16", "int8"), device.
        """
        from ultralytics.utils.files import increment_path
        from ultralytics.utils.torch_utils import select_device

        from ems_yolo.engine.energy import energy_dataloader, run_energy

        if not isinstance(self.model, nn.Module):
            raise ValueError("energy needs a PyTorch model (a YAML or .pt), not an exported one")
        batch = check_values({"imgsz": imgsz, "batch": batch, "max_batches": max_batches, "split": split,
                              "spike_driven": spike_driven, **energy_kwargs}, "energy")["batch"]
        if energy_kwargs.get("device") is not None:  # Ultralytics' check, as train and val make
            energy_kwargs["device"] = select_device(energy_kwargs["device"], verbose=False)
        imgsz = int(imgsz or self.overrides.get("imgsz") or 640)
        data = resolve_data(data or self.overrides.get("data"))
        model = self.model if self.ckpt else model_for_data(self.model.yaml, load_data(data, split=split))
        if spike_driven:
            model = to_spike_driven(model)
        loader = energy_dataloader(data, imgsz, batch, split)
        project = Path(project or default_project())
        folder = increment_path(project / name)
        with no_half_written_runs(project):  # a failed report (a full disk) leaves no partial folder
            claim_run(folder)
            return run_energy(model, loader, imgsz, folder, untrained=not self.ckpt, max_batches=max_batches,
                              **energy_kwargs)

