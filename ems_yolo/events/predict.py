"""Detection on event streams: slide the representation window along a recording (or over a sample cache).

For each window end t the model sees the same representation it was trained on; detections are mapped back to
sensor pixels and collected as a Gen1 v2 `_bbox.npy` (t = window end, `class_confidence` = score) that
`evaluate_gen1` reads, and drawn on the window's newest event frame into an annotated video.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from ems_yolo.events.dataset import resize_channels
from ems_yolo.events.io import (
    concat_boxes,
    detections_to_boxes,
    read_dat,
    read_dat_header,
    write_bbox,
)
from ems_yolo.events.representations import EventRepresentation, ems_frames


def representation_for(model, default_bins: int) -> EventRepresentation:
    """The representation a model was trained on (its event cache), else EMS frames with T bins over 250 ms."""
    from ems_yolo.data.datasets import is_event_data
    from ems_yolo.events.gen1 import read_representation

    data = (getattr(model, "args", None) or {}).get("data")
    if data and Path(str(data)).is_file() and is_event_data(data):
        cache = Path(yaml.safe_load(Path(data).read_text())["cache"])
        if cache.is_file():
            return read_representation(cache)
    return EventRepresentation(bins=default_bins)


def stream_windows(path: Path, rep: EventRepresentation, stride_us: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (t_end, model input [T*C, H, W] uint8, newest-bin frame [H, W]) every `stride_us` along a .dat file.

    Reads only the events of each window (binary search on time), so memory stays bounded for long recordings.
    """
    span = _time_range(path)
    if span is None:
        return
    first, last = span
    for t_end in range(first + stride_us, last + stride_us + 1, stride_us):
        events = read_dat(path, max(t_end - rep.window_us, 0), t_end)
        newest = ems_frames(events, t_end, rep.window_us // rep.bins, 1, rep.height, rep.width)[0]
        yield t_end, rep(events, t_end), newest


def _time_range(path: Path) -> tuple[int, int] | None:
    """Timestamps of the first and last event of a .dat file (None when it holds no events)."""
    header = read_dat_header(path)
    if header.num_events == 0:
        return None
    times = np.memmap(path, "<u4", "r", header.data_offset, (header.num_events, 2))[:, 0]
    return int(times[0]), int(times[-1])


def cache_windows(path: Path, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (t, model input, newest-bin frame) for every sample of an event cache split (label times)."""
    from ems_yolo.events.gen1 import Gen1Cache

    cache = Gen1Cache(path, split)
    rep = cache.representation
    for i in range(len(cache)):
        stored = cache.stored(i)
        x = rep.to_model(stored)
        yield int(cache.t_us[i]), x, x[-rep.channels_per_bin]


def predict_events(
    weights: str | Path,
    source: str | Path,
    out_dir: str | Path,
    stride_ms: float = 50.0,
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 300,
    imgsz: int | None = None,
    split: str = "val",
    save_video: bool = True,
    device: str = "cpu",
) -> Path:
    """Detect objects along an event recording (`.dat`) or cache (`.h5`); returns the written `_bbox.npy`."""
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.plotting import Annotator, colors

    from ems_yolo.engine.model import EMSYOLO

    source, out_dir = Path(source), Path(out_dir)
    if not source.is_file():
        raise FileNotFoundError(f"event source '{source}' not found")
    wrapper = EMSYOLO(weights)
    torch_model = wrapper.model if isinstance(wrapper.model, torch.nn.Module) else None
    bins = int(torch_model.yaml.get("time_steps", 5)) if torch_model is not None else 5
    backend = AutoBackend(torch_model if torch_model is not None else str(weights), device=torch.device(device))
    names = backend.names
    if source.suffix in (".h5", ".hdf5"):
        from ems_yolo.events.gen1 import Gen1Cache

        rep = Gen1Cache(source, split).representation
        windows = cache_windows(source, split)
        stem = f"{source.stem}_{split}"
    else:
        rep = representation_for(torch_model if torch_model is not None else wrapper, bins)
        header = read_dat_header(source)
        rep = replace(rep, height=header.height or rep.height, width=header.width or rep.width)
        windows = stream_windows(source, rep, int(stride_ms * 1000))
        stem = source.name.removesuffix(".dat").removesuffix("_td")
    size = imgsz or int((getattr(wrapper, "overrides", {}) or {}).get("imgsz") or 320)
    out_dir.mkdir(parents=True, exist_ok=True)
    video = None
    rows = []
    fps = max(1.0, 1000.0 / stride_ms)
    for t, x, newest in windows:
        inp = torch.from_numpy(resize_channels(x, size).copy())[None].float().div(255)
        with torch.no_grad():
            det = non_max_suppression(backend(inp.to(backend.device)), conf, iou, max_det=max_det)[0].cpu().numpy()
        det[:, [0, 2]] = (det[:, [0, 2]] * (rep.width / size)).clip(0, rep.width)  # to sensor pixels, clipped
        det[:, [1, 3]] = (det[:, [1, 3]] * (rep.height / size)).clip(0, rep.height)
        rows.append(detections_to_boxes(det[:, :4], det[:, 5], det[:, 4], t))
        if save_video:
            frame = cv2.cvtColor(np.ascontiguousarray(newest), cv2.COLOR_GRAY2BGR)
            ann = Annotator(frame, line_width=1)
            for b in det:
                ann.box_label(b[:4], f"{names[int(b[5])]} {b[4]:.2f}", color=colors(int(b[5]), True))
            if video is None:
                video = cv2.VideoWriter(str(out_dir / f"{stem}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), fps,
                                        (frame.shape[1], frame.shape[0]))
            video.write(ann.result())
    if video is not None:
        video.release()
    out = out_dir / f"{stem}_bbox.npy"
    write_bbox(out, concat_boxes(rows), version=2)
    return out
