"""EventPredictor: detection on event streams, sliding the representation window along a recording (or over a
sample cache, one window per labelled timestamp).

For each window end t the model sees the representation it was trained on (recorded in its YAML by training on
event data); detections are mapped back to sensor pixels and yielded as Ultralytics `Results` on the window's
newest event frame. With `save=True` they are also collected as a Gen1 v2 `_bbox.npy` (t = window end,
`class_confidence` = score) that `evaluate_detections` reads, and drawn into an annotated video; `save_txt`,
`save_conf`, `save_crop` and `show` act per window as they do per frame in Ultralytics' predictor (labels/ and
crops/ files named `<stem>_<t>us`), and a progress bar counts the windows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import LOGGER, TQDM
from ultralytics.utils.checks import check_imshow
from ultralytics.utils.files import increment_path
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.torch_utils import select_device

from ems_yolo.cfg import EVENT_CACHE_SUFFIXES, default_project
from ems_yolo.engine.cuda_graph import CUDAGraphRunner, GraphedCall, use_cuda_graph
from ems_yolo.events.automotive import EventCache
from ems_yolo.events.formats import EVENT_FILE_SUFFIXES, EventSource, is_event_h5, open_events
from ems_yolo.events.io import concat_boxes, detections_to_boxes, write_bbox
from ems_yolo.events.representations import EventRepresentation, ems_frames, resize_channels
from ems_yolo.events.simulator import video_to_events
from ems_yolo.utils.checks import image_hw
from ems_yolo.utils.files import claim_run, no_half_written_runs, remove_stale_temporaries, temporary_sibling

MAX_WINDOWS = 10_000  # more windows than this get a warning with the expected output size before prediction starts
VIDEO_BYTES_PER_PIXEL = 0.1  # about what an MJPG frame of an annotated event frame takes (for that estimate)


def refuse_source_folder(save_dir: Path, source) -> None:
    """Refuse a run folder (`project`/`name`) that is the folder of the source: the outputs, named after the
    source files (`<name>.jpg`, `<stem>_bbox.npy`, ...), would overwrite them or the labels beside them."""
    p = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
    folder = None if p is None else p if p.is_dir() else p.parent
    if folder is not None and folder.is_dir() and save_dir.is_dir() and folder.samefile(save_dir):
        raise ValueError(f"project/name: {save_dir} is the folder of source={source}, expected another run folder "
                         "(predictions saved there would overwrite the source's files)")


class FramePredictor(DetectionPredictor):
    """Ultralytics' detection predictor whose run folder is checked against the source and claimed for clean-up;
    on CUDA it replays the model from a CUDA graph once an input shape repeats (`cuda_graph`, see GraphedCall)."""

    cuda_graph: bool | None = None  # None: on with a CUDA device and a PyTorch model
    graphed: GraphedCall | None = None

    def inference(self, im: torch.Tensor, *args, **kwargs):
        """The model's forward pass; from a CUDA graph when `cuda_graph` allows it and no Ultralytics option
        (augment, embed, visualize, tensor sources) asks for the eager model."""
        eager = args or kwargs or self.args.augment or self.args.embed or self.args.visualize or self.source_type.tensor
        if eager or not use_cuda_graph(self.cuda_graph, self.device, self.model.format == "pt"):
            return super().inference(im, *args, **kwargs)
        if self.graphed is None or self.graphed.fn is not self.model:  # a new model after setup_model
            self.graphed = GraphedCall(self.model, CUDAGraphRunner())
        return self.graphed(im)

    def stream_inference(self, source=None, model=None, *args, **kwargs):  # noqa: D102
        if self.args.save or self.args.save_txt:
            refuse_source_folder(self.save_dir, source if source is not None else self.args.source)
        claim_run(self.save_dir)
        yield from super().stream_inference(source, model, *args, **kwargs)


@functools.cache
def frame_predictor(cuda_graph: bool | None) -> type[FramePredictor]:
    """FramePredictor with a `cuda_graph` setting: one class per setting, so that Ultralytics, which rebuilds its
    predictor when the predictor class changes, reuses it (and its captured graphs) while the setting stays."""
    return type("FramePredictor", (FramePredictor,), {"cuda_graph": cuda_graph})


def model_representation(model) -> EventRepresentation | None:
    """The event representation a PyTorch model was trained on (None for frame models and exported models)."""
    rep = (getattr(model, "yaml", None) or {}).get("events") if isinstance(model, torch.nn.Module) else None
    return EventRepresentation(**rep) if rep else None


def stream_windows(
    source: EventSource, rep: EventRepresentation, stride_us: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (t_end, model input [T*C, H, W] uint8, newest-bin frame [H, W]) every `stride_us` along a recording
    (.dat, .raw, .npy). Reads only the events of each window, so memory stays bounded for long recordings."""
    if not source.count:
        return
    for t_end in range(source.t_first + stride_us, source.t_last + stride_us + 1, stride_us):
        events = source.read(*rep.event_range(t_end))
        newest = ems_frames(events, t_end, rep.bin_length_us, 1, rep.height, rep.width)[0]
        yield t_end, rep(events, t_end), newest


def stream_window_count(source: EventSource, stride_us: int) -> int:
    """How many windows `stream_windows` yields."""
    return source.duration_us // stride_us + 1 if source.count else 0


def cache_windows(cache: EventCache) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (t, model input, newest-bin frame) for every sample of a split cache (its label times)."""
    rep = cache.representation
    for i in range(len(cache)):
        x = rep.to_model(cache.stored(i))
        yield int(cache.t_us[i]), x, x[-rep.channels_per_bin]


class EventPredictor:
    """Sliding-window detection on `.dat` / `.raw` recordings, `.h5` sample caches, or videos simulated into events.

    `model` is a PyTorch detection model or the path of an exported one; `args` are Ultralytics predict settings
    (conf, iou, max_det, imgsz, device, save, project, name, exist_ok); `cuda_graph` as for frames (the windows
    all have one shape, so every window after the second is a graph replay).
    """

    def __init__(self, model, args, stride_ms: float = 50.0, simulate: bool = False, cuda_graph: bool | None = None):
        if not stride_ms > 0:
            raise ValueError(f"stride_ms must be > 0, got {stride_ms!r}")
        self.torch_model = model if isinstance(model, torch.nn.Module) else None
        self.args, self.stride_us, self.simulate = args, int(round(stride_ms * 1000)), simulate
        self.backend = AutoBackend(model, device=select_device(args.device or "cpu", verbose=False))
        graphs = use_cuda_graph(cuda_graph, self.backend.device, self.backend.format == "pt")
        self.forward = GraphedCall(self.backend, CUDAGraphRunner()) if graphs else self.backend
        self.save_dir = increment_path(Path(args.project or default_project()) / (args.name or "predict"),
                                       exist_ok=args.exist_ok)

    def _windows(self, source: Path) -> tuple[str, EventRepresentation, Iterator, int]:
        """(output stem, representation, window iterator, window count) of an event source."""
        trained = model_representation(self.torch_model)
        if source.suffix in EVENT_CACHE_SUFFIXES and not is_event_h5(source):
            cache = EventCache(source)
            if trained is not None and trained != cache.representation:
                raise ValueError(f"{source}: cached as {cache.representation}, but the model was trained on {trained}")
            return source.stem, cache.representation, cache_windows(cache), len(cache)
        if trained is None:
            raise ValueError(
                f"{source}: the model records no event representation (it was not trained on event data, or it is "
                "an export); predict with a .pt trained on events, or on an .h5 cache, which carries its own"
            )
        events = open_events(source)
        self._check_windows(events)
        rep = replace(trained, height=events.height or trained.height, width=events.width or trained.width)
        stem = source.name.removesuffix(source.suffix).removesuffix(".dat").removesuffix("_td")  # x_td.dat.h5 -> x
        return stem, rep, stream_windows(events, rep, self.stride_us), stream_window_count(events, self.stride_us)

    def _check_windows(self, events: EventSource) -> None:
        """Warn before starting when the stride gives more than MAX_WINDOWS windows: their count, and the size of
        the annotated video they make."""
        n = stream_window_count(events, self.stride_us)
        if n > MAX_WINDOWS:
            mb = n * (events.width or 304) * (events.height or 240) * 3 * VIDEO_BYTES_PER_PIXEL / 1e6
            video = f" and an annotated video of about {mb:,.0f} MB" if self.args.save else ""
            LOGGER.warning(f"{events.path}: stride_ms={self.stride_us / 1000:g} gives {n:,} windows{video} over "
                           f"{events.duration_us / 1e6:.1f} s; a larger stride_ms gives fewer (stride_ms="
                           f"{-(-events.duration_us // (MAX_WINDOWS * 1000))} gives at most {MAX_WINDOWS:,})")

    def stream(self, source: str | Path) -> Iterator[Results]:
        """Yield one `Results` per window (boxes in sensor pixels); files are written when the stream ends (the
        video under a temporary name until then). A prediction that fails or is interrupted (Ctrl-C, SIGTERM)
        removes the run folder it created, so no half-written run is left; a run folder that is the source's own
        folder is refused."""
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: event source not found")
        if self.args.save or self.args.save_txt or self.args.save_crop:
            refuse_source_folder(self.save_dir, source)
        with no_half_written_runs(self.save_dir.parent):
            claim_run(self.save_dir)
            yield from self._stream(source)

    def _stream(self, source: Path) -> Iterator[Results]:
        if self.simulate and source.suffix not in (*EVENT_FILE_SUFFIXES, *EVENT_CACHE_SUFFIXES):
            dat = self.save_dir / f"{source.stem}_td.dat"
            n = len(video_to_events(source, dat, progress=self.args.verbose))
            LOGGER.info(f"simulated {n:,} events from {source} -> {dat}")
            source = dat
        stem, rep, windows, count = self._windows(source)
        args, size = self.args, max(image_hw(self.args.imgsz))
        save, show = bool(args.save), bool(args.show) and check_imshow(warn=True)
        names, rows, video = self.backend.names, [], None
        avi = self.save_dir / f"{stem}.avi"
        tmp = temporary_sibling(avi, ".avi")  # a killed run leaves no unindexed .avi (the writer chooses by suffix)
        try:
            for t, x, newest in TQDM(windows, total=count, desc=f"{source.name} windows", disable=not args.verbose):
                inp = torch.from_numpy(resize_channels(x, size).copy())[None].float().div(255).to(self.backend.device)
                with torch.no_grad():
                    det = non_max_suppression(self.forward(inp), args.conf, args.iou, max_det=args.max_det)[0].cpu()
                det[:, [0, 2]] = (det[:, [0, 2]] * (rep.width / size)).clamp(0, rep.width)  # to sensor pixels
                det[:, [1, 3]] = (det[:, [1, 3]] * (rep.height / size)).clamp(0, rep.height)
                d = det.numpy()
                rows.append(detections_to_boxes(d[:, :4], d[:, 5], d[:, 4], t))
                frame = cv2.cvtColor(np.ascontiguousarray(newest), cv2.COLOR_GRAY2BGR)
                result = Results(frame, path=f"{source}@{t}us", names=names, boxes=det)
                self._write_window(result, f"{stem}_{t}us")
                if save or show:
                    plotted = result.plot(line_width=1)
                if show:
                    cv2.imshow(str(source), plotted)
                    cv2.waitKey(1)
                if save:
                    if video is None:
                        self.save_dir.mkdir(parents=True, exist_ok=True)
                        remove_stale_temporaries(avi)
                        fps = max(1.0, 1e6 / self.stride_us)
                        video = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps,
                                                (plotted.shape[1], plotted.shape[0]))
                    video.write(plotted)
                yield result
            if save:
                out = self.save_dir / f"{stem}_bbox.npy"
                write_bbox(out, concat_boxes(rows), version=2)
                if video is not None:
                    video.release()
                    tmp.replace(avi)
                video_note = f"\nannotated video -> {avi}" if video is not None else (
                    " (no window fits the recording: no video)")
                LOGGER.info(f"detections of {len(rows)} windows -> {out}{video_note}")
        finally:
            if video is not None:
                video.release()
            tmp.unlink(missing_ok=True)

    def _write_window(self, result: Results, name: str) -> None:
        """A window's labels (`save_txt`, with scores when `save_conf`) and crops (`save_crop`), named after it."""
        if self.args.save_txt:
            (self.save_dir / "labels").mkdir(parents=True, exist_ok=True)
            result.save_txt(self.save_dir / "labels" / f"{name}.txt", save_conf=self.args.save_conf)
        if self.args.save_crop:
            result.save_crop(self.save_dir / "crops", file_name=name)

    def __call__(self, source: str | Path, stream: bool = False) -> Iterator[Results] | list[Results]:
        """Predict on an event source: a generator with `stream=True`, else the list of all windows' results."""
        return self.stream(source) if stream else list(self.stream(source))
