"""Event-camera simulator: turn greyscale frames or a video into ON/OFF change events (events-spec §7.1–7.2).

Each pixel watches its log intensity ``L = log(I + eps)`` and keeps a reference level ``L_ref``. Between two
frames, every time ``L`` crosses ``L_ref + C_on`` (or ``L_ref - C_off``) the pixel emits an ON (OFF) event and
moves its reference by one threshold. Crossing times are linearly interpolated between the frame timestamps,
the way ESIM and v2e do it; thresholds may differ per pixel (Gaussian mismatch), a refractory period drops
events that follow the previous one of the same pixel too closely, and shot noise adds spontaneous events.

The work is vectorised over pixels: each frame pair costs a handful of whole-frame array operations plus one
pass per threshold-crossing index (1st crossing, 2nd crossing, ...) over the pixels that cross that often; the
clamped thresholds bound that count by ``log((1 + eps) / eps) / 0.01`` (691 passes for ``eps = 1e-3``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ems_yolo.events.formats import write_events
from ems_yolo.events.io import EVENT_DTYPE

__all__ = ["EventSimulator", "SimulatorConfig", "video_to_events"]

_MIN_THRESHOLD = 0.01  # per-pixel thresholds are clamped here so mismatch never yields zero or negative levels
_NEVER = np.iinfo(np.int64).min // 2  # "last event time" of a pixel that has not fired yet


@dataclass(frozen=True)
class SimulatorConfig:
    """Pixel model parameters (defaults: ESIM's ideal sensor, no mismatch, no refractory period, no noise).

    ``c_on``/``c_off`` are the log-intensity contrast thresholds, ``sigma`` the standard deviation of their
    per-pixel Gaussian mismatch (thresholds are clamped to at least 0.01), ``refractory_us`` the minimum time
    between two events of one pixel, ``eps`` the offset that keeps ``log(I + eps)`` finite in the dark,
    ``noise_hz`` the rate of spontaneous (shot noise) events per pixel and ``seed`` the random seed for the
    mismatch and the noise.
    """

    c_on: float = 0.2
    c_off: float = 0.2
    sigma: float = 0.0
    refractory_us: int = 0
    eps: float = 1e-3
    noise_hz: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("c_on", "c_off", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("sigma", "noise_hz"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.refractory_us < 0:
            raise ValueError(f"refractory_us must be >= 0, got {self.refractory_us}")


class EventSimulator:
    """Stateful per-pixel event generator for a ``width x height`` sensor fed one frame at a time."""

    def __init__(self, width: int, height: int, config: SimulatorConfig = SimulatorConfig()) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"sensor size must be positive, got {width}x{height}")
        self.width, self.height, self.config = int(width), int(height), config
        self._rng = np.random.default_rng(config.seed)
        n = self.height * self.width
        thresholds = []
        for mean in (config.c_on, config.c_off):
            values = self._rng.normal(mean, config.sigma, n) if config.sigma > 0 else np.full(n, mean)
            thresholds.append(np.maximum(values, _MIN_THRESHOLD))
        self._c_on, self._c_off = thresholds  # flattened row-major, like every per-pixel state array
        self._log_prev: np.ndarray | None = None
        self._log_ref = np.zeros(n)
        self._last_event = np.full(n, _NEVER, dtype=np.int64)
        self._t_prev = 0

    def _log_intensity(self, frame: np.ndarray) -> np.ndarray:
        """Flattened ``log(I + eps)`` of a uint8 or [0, 1] float greyscale frame of the sensor's shape."""
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width):
            raise ValueError(f"frame must be a greyscale ({self.height}, {self.width}) array, got shape {frame.shape}")
        if frame.dtype == np.uint8:
            intensity = frame.astype(np.float64) / 255.0
        elif frame.dtype.kind == "f":
            intensity = np.clip(frame.astype(np.float64), 0.0, 1.0)
        else:
            raise TypeError(f"frame must be uint8 or floating point in [0, 1], got {frame.dtype}")
        return np.log(intensity.ravel() + self.config.eps)

    def feed(self, frame: np.ndarray, t_us: int) -> np.ndarray:
        """Consume the frame taken at ``t_us`` (µs) and return the events since the previous frame.

        The first frame only initialises the pixel state and returns no events. Events (EVENT_DTYPE) are sorted
        by time and lie in ``[t_prev, t_us]``, their times rounded to whole µs.
        """
        log_new = self._log_intensity(frame)
        t_us = int(t_us)
        if self._log_prev is None:
            self._log_prev, self._log_ref[:] = log_new, log_new
            self._t_prev = t_us
            return np.empty(0, dtype=EVENT_DTYPE)
        if t_us <= self._t_prev:
            raise ValueError(f"frame times must increase: got t={t_us} µs after t={self._t_prev} µs")

        t_prev, log_prev = self._t_prev, self._log_prev
        # The previous level lies strictly between L_ref - C_off and L_ref + C_on, so the levels crossed since the
        # previous frame are exactly L_ref + k*C (k = 1..n) up to the new level, all in one direction.
        diff = log_new - self._log_ref
        pixels = np.flatnonzero((diff >= self._c_on) | (diff <= -self._c_off))
        diff = diff[pixels]
        up = diff > 0
        step = np.where(up, self._c_on[pixels], -self._c_off[pixels])
        counts = np.floor(diff / step).astype(np.int64)
        ref0, start, change = self._log_ref[pixels], log_prev[pixels], log_new[pixels] - log_prev[pixels]
        self._log_ref[pixels] = ref0 + counts * step  # every crossing moves the reference, fired or not
        dt = t_us - t_prev

        batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for k in range(1, int(counts.max(initial=0)) + 1):
            keep = counts >= k
            if not keep.all():
                pixels, counts, up, step = pixels[keep], counts[keep], up[keep], step[keep]
                ref0, start, change = ref0[keep], start[keep], change[keep]
            level = ref0 + k * step
            frac = np.divide(level - start, change, out=np.ones_like(change), where=change != 0)
            t = t_prev + np.rint(np.clip(frac, 0.0, 1.0) * dt).astype(np.int64)
            fire = t - self._last_event[pixels] >= self.config.refractory_us
            self._last_event[pixels[fire]] = t[fire]
            batches.append((t[fire], pixels[fire], up[fire]))

        self._log_prev, self._t_prev = log_new, t_us
        if self.config.noise_hz > 0:
            batches.append(self._shot_noise(t_prev, t_us))
        return self._assemble(batches)

    def _shot_noise(self, t_prev: int, t_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spontaneous events of random polarity in ``(t_prev, t_us]``; they leave the reference levels alone."""
        n_pixels = self.width * self.height
        n = int(self._rng.poisson(self.config.noise_hz * n_pixels * (t_us - t_prev) * 1e-6))
        t = self._rng.integers(t_prev + 1, t_us + 1, n)
        return t, self._rng.integers(0, n_pixels, n), self._rng.random(n) < 0.5

    def _assemble(self, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """Concatenate (t, flat pixel index, is_on) batches into EVENT_DTYPE events stably sorted by time."""
        if not batches:
            return np.empty(0, dtype=EVENT_DTYPE)
        t = np.concatenate([b[0] for b in batches])
        pixel = np.concatenate([b[1] for b in batches])
        on = np.concatenate([b[2] for b in batches])
        order = np.argsort(t, kind="stable")
        events = np.empty(t.size, dtype=EVENT_DTYPE)
        events["t"] = t[order]
        events["y"], events["x"] = np.divmod(pixel[order], self.width)
        events["p"] = on[order]
        return events


def video_to_events(
    source: str | Path,
    out: str | Path | None = None,
    width: int = 304,
    height: int = 240,
    config: SimulatorConfig = SimulatorConfig(),
    max_frames: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Simulate the events a ``width x height`` event camera would record watching the video ``source``.

    Frames are read one at a time with OpenCV, converted to grey, stretched to the sensor size and stamped
    ``round(k * 1e6 / fps)`` µs, so the first frame is at 0. At most ``max_frames`` frames are used. With
    ``out`` the events are also written, as a Gen1-compatible Event2D `.dat` or an EVT 2.0 `.raw` file by its
    suffix. Returns all events.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"video file not found: {source}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    capture = cv2.VideoCapture(str(source))
    try:
        if not capture.isOpened():
            raise ValueError(f"OpenCV cannot open video file {source}")
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"video file {source} reports no usable frame rate (fps={fps})")
        total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0) or None
        if max_frames is not None:
            total = min(total, max_frames) if total else max_frames
        simulator = EventSimulator(width, height, config)
        chunks: list[np.ndarray] = []
        n_frames = 0
        while max_frames is None or n_frames < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if frame.ndim == 3:  # OpenCV decodes to BGR by default
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            chunks.append(simulator.feed(frame, round(n_frames * 1e6 / fps)))
            n_frames += 1
            if progress and (n_frames % 50 == 0 or n_frames == total):
                print(f"\r{source.name}: frame {n_frames}/{total or '?'}", end="", file=sys.stderr, flush=True)
    finally:
        capture.release()
    if progress:
        print(file=sys.stderr)
    if n_frames == 0:
        raise ValueError(f"video file {source} contains no readable frames")
    events = np.concatenate(chunks)
    if out is not None:
        write_events(out, events, width, height)
    return events
