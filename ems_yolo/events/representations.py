"""Dense tensors built from event streams: EMS-YOLO frames, polarity count histograms and voxel grids.

All functions take structured event arrays (fields ``t`` in integer µs, ``x``, ``y``, ``p`` with 1 = ON) sorted
by time, and work without a Python loop over events (events-spec §4 and §5).

Time bins. A window ``[t_start, t_end)`` of length ``L`` is split into ``bins`` half-open bins with edges
``e_k = t_start + floor(k * L / bins)`` for ``k = 0..bins``. The first edge is exactly ``t_start`` and the last
exactly ``t_end``; when ``L`` is not divisible by ``bins`` the bins differ in length by at most 1 µs instead of
the window being shortened or stretched. An event at ``t`` falls in bin ``k`` when ``e_k <= t < e_{k+1}``.

Spaced bins (histograms only). RVT's Gen1 samples are not contiguous: bin ``k`` of ``bins`` ends at
``t_end - (bins - 1 - k) * spacing`` and covers the ``bin`` µs before its end, closed at both ends. The histogram
takes that layout through :func:`window_counts` (any list of windows; an event inside several counts in each).

:class:`EventRepresentation` is the configuration the datasets use: it produces a compact ``uint8`` array for
caching (:meth:`EventRepresentation.stored`) and expands it to the model input with time-major channels
(:meth:`EventRepresentation.to_model`, channel = ``t * C + c``, events-spec §5.4).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

__all__ = [
    "EventRepresentation", "count_histogram", "ems_frames", "resize_channels", "voxel_grid", "window_counts",
]

_NO_EVENT = 127
_ON = 255
_OFF = 0


def _check_sizes(bins: int, height: int, width: int) -> None:
    """Reject non-positive bin counts and sensor sizes early with a clear message."""
    for name, value in (("bins", bins), ("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _window(events: np.ndarray, t_start: int, t_end: int, inclusive_end: bool = False) -> np.ndarray:
    """Events with ``t_start <= t < t_end`` (``<= t_end`` if ``inclusive_end``), found by binary search.

    Checks that the events are sorted by time and that the window is not reversed, because both would silently
    produce wrong tensors.
    """
    if t_end < t_start:
        raise ValueError(f"t_end ({t_end}) is before t_start ({t_start})")
    t = events["t"]
    if t.size > 1 and np.any(t[1:] < t[:-1]):
        index = int(np.flatnonzero(t[1:] < t[:-1])[0]) + 1
        raise ValueError(f"events must be sorted by t: event {index} has t={t[index]} after t={t[index - 1]}")
    lo = np.searchsorted(t, t_start, side="left")
    hi = np.searchsorted(t, t_end, side="right" if inclusive_end else "left")
    return events[lo:hi]


def _pixel_index(events: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flat pixel index ``y * width + x`` (int64) after checking every event lies on the sensor."""
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    outside = np.flatnonzero((x < 0) | (x >= width) | (y < 0) | (y >= height))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"event at t={events['t'][i]} has x={x[i]}, y={y[i]} outside the {width}x{height} sensor")
    return y * width + x


def _bin_index(t: np.ndarray, t_start: int, t_end: int, bins: int) -> np.ndarray:
    """Bin of each time in ``[t_start, t_end)`` using the integer edges described in the module docstring."""
    length = t_end - t_start
    edges = t_start + (np.arange(bins + 1, dtype=np.int64) * length) // bins
    return np.searchsorted(edges, t.astype(np.int64), side="right") - 1


def ems_frames(
    events: np.ndarray,
    t_end: int,
    window_us: int = 250_000,
    bins: int = 5,
    height: int = 240,
    width: int = 304,
) -> np.ndarray:
    """EMS-YOLO input frames of the window ``[t_end - window_us, t_end)`` as uint8 ``[bins, height, width]``.

    Every pixel starts grey (127) and takes 255 if the last event of the bin at that pixel is ON, 0 if it is
    OFF (events-spec §4); ties in time are resolved by array order. Bin 0 is the oldest and bin ``bins - 1``
    ends exactly at ``t_end``. A window reaching before time 0 simply has empty early bins. The paper's three
    identical channels are stored once; :meth:`EventRepresentation.to_model` replicates them.
    """
    _check_sizes(bins, height, width)
    if window_us < 1:
        raise ValueError(f"window_us must be positive, got {window_us}")
    t_start = t_end - window_us
    window = _window(events, t_start, t_end)
    frames = np.full(bins * height * width, _NO_EVENT, dtype=np.uint8)
    if window.size:
        flat = _bin_index(window["t"], t_start, t_end, bins) * (height * width) + _pixel_index(window, height, width)
        # The last event per (bin, pixel) is the first occurrence in the reversed array.
        cells, first_in_reversed = np.unique(flat[::-1], return_index=True)
        last = window.size - 1 - first_in_reversed
        frames[cells] = np.where(window["p"][last] > 0, _ON, _OFF)
    return frames.reshape(bins, height, width)


def count_histogram(
    events: np.ndarray,
    t_start: int,
    t_end: int,
    bins: int,
    height: int = 240,
    width: int = 304,
    cutoff: int | None = None,
) -> np.ndarray:
    """Per-bin, per-polarity event counts of ``[t_start, t_end)`` as int32 ``[bins, 2, height, width]``.

    Channel 0 counts OFF events and channel 1 ON events (events-spec §5.1). Without ``cutoff`` the tensor sums
    to the number of events in the window; with it every count is clipped to ``cutoff``.
    """
    _check_sizes(bins, height, width)
    if t_end < t_start:
        raise ValueError(f"t_end ({t_end}) is before t_start ({t_start})")
    edges = t_start + (np.arange(bins + 1, dtype=np.int64) * (t_end - t_start)) // bins
    return window_counts(events, edges[:-1], edges[1:], height, width, cutoff)


def window_counts(
    events: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    height: int = 240,
    width: int = 304,
    cutoff: int | None = None,
    closed: bool = False,
) -> np.ndarray:
    """Per-polarity event counts of each window ``starts[k] <= t < ends[k]`` (``<= ends[k]`` if ``closed``) as
    int32 ``[len(ends), 2, height, width]``, OFF then ON, each count clipped to ``cutoff`` when given.

    Windows may leave gaps or overlap (an event counts in every window holding it), as RVT's histograms do.
    """
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    _check_sizes(len(ends), height, width)
    if cutoff is not None and cutoff < 1:
        raise ValueError(f"cutoff must be a positive integer or None, got {cutoff}")
    if starts.shape != ends.shape or np.any(ends < starts):
        raise ValueError(f"expected as many window starts as ends, none after its end, got {starts} and {ends}")
    window = _window(events, int(starts.min()), int(ends.max()), inclusive_end=closed)
    t = window["t"].astype(np.int64)
    plane = height * width
    flat = (window["p"] > 0).astype(np.int64) * plane + _pixel_index(window, height, width)
    counts = np.zeros((len(ends), 2 * plane), np.int64)
    side = "right" if closed else "left"
    for k, (lo, hi) in enumerate(zip(np.searchsorted(t, starts, "left"), np.searchsorted(t, ends, side))):
        counts[k] = np.bincount(flat[lo:hi], minlength=2 * plane)
    if cutoff is not None:
        np.minimum(counts, cutoff, out=counts)
    return counts.astype(np.int32).reshape(len(ends), 2, height, width)


def voxel_grid(
    events: np.ndarray,
    bins: int,
    height: int = 240,
    width: int = 304,
    t_start: int | None = None,
    t_end: int | None = None,
) -> np.ndarray:
    """Zhu et al. voxel grid as float32 ``[bins, height, width]`` over events with ``t_start <= t <= t_end``.

    Each event's normalised time ``t* = (bins - 1) * (t - t_start) / (t_end - t_start)`` spreads its signed
    polarity (ON +1, OFF -1) linearly over the two nearest bins (events-spec §5.3), so the grid sums to the
    polarity sum of the events and an event at ``t* = b`` lands wholly in bin ``b``. The bounds default to the
    first and last event time; a zero-length span puts every event in bin 0.
    """
    _check_sizes(bins, height, width)
    grid = np.zeros(bins * height * width, dtype=np.float64)
    if events.size == 0:
        return grid.astype(np.float32).reshape(bins, height, width)
    t_start = int(events["t"][0]) if t_start is None else t_start
    t_end = int(events["t"][-1]) if t_end is None else t_end
    window = _window(events, t_start, t_end, inclusive_end=True)
    span = t_end - t_start
    t_star = (bins - 1) * (window["t"].astype(np.float64) - t_start) / (span if span > 0 else 1)
    lower = np.floor(t_star).astype(np.int64)
    upper_weight = t_star - lower
    polarity = np.where(window["p"] > 0, 1.0, -1.0)
    pixel = _pixel_index(window, height, width)
    plane = height * width
    size = bins * plane
    grid += np.bincount(lower * plane + pixel, weights=polarity * (1.0 - upper_weight), minlength=size)
    has_upper = lower + 1 < bins
    grid += np.bincount(
        (lower[has_upper] + 1) * plane + pixel[has_upper],
        weights=polarity[has_upper] * upper_weight[has_upper],
        minlength=size,
    )
    return grid.astype(np.float32).reshape(bins, height, width)


_NAMES = ("ems_frames", "histogram", "voxel")


_LAYOUT = {"bin_us": None, "spacing_us": None, "closed": False}  # the contiguous layout, absent from old records


@dataclass(frozen=True)
class EventRepresentation:
    """Which tensor a dataset builds from the events before each label time, and how it is cached.

    The window is ``[t_end - window_us, t_end)`` split into ``bins`` time steps for every representation.
    Stored arrays are uint8 so caches stay small:

    * ``ems_frames``: ``[bins, H, W]`` with 0 / 127 / 255 (OFF / none / ON).
    * ``histogram``: ``[bins, 2, H, W]``, counts clipped to ``cutoff`` and scaled to
      ``round(count * 255 / cutoff)`` (half up), so 0 means no event.
    * ``voxel``: ``[bins, H, W]`` with ``clip(round(127 + 127 * v / s), 0, 254)``, ``s = max(1, cutoff / 2)``;
      0 maps exactly to 127 and ``±s`` (or beyond) to 0 / 254. The voxel time span is the nominal window
      ``[t_end - window_us, t_end]``, not the events' own first and last time, so scaling is the same for
      every sample.

    The histogram may instead take RVT's layout: bins of ``bin_us`` whose ends are ``spacing_us`` apart (either
    alone means both are equal), the newest ending at ``t_end``, and with ``closed`` each bin also holds the events
    at its end (``end - bin_us <= t <= end``). ``window_us`` is then the span the bins cover,
    ``(bins - 1) * spacing_us + bin_us``. Left at None / False they keep the contiguous bins above, and records
    without them (caches and models written before) read as before.
    """

    name: str = "ems_frames"
    bins: int = 5
    window_us: int = 250_000
    height: int = 240
    width: int = 304
    cutoff: int = 10
    bin_us: int | None = None
    spacing_us: int | None = None
    closed: bool = False

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ValueError(f"name must be one of {list(_NAMES)}, got {self.name!r}")
        for key in ("bins", "bin_us", "spacing_us", "window_us", "height", "width", "cutoff"):
            value = getattr(self, key)
            if value is None and key in _LAYOUT:
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.spaced:  # either alone means both are equal: record both, so equal layouts compare equal
            object.__setattr__(self, "bin_us", int(self.bin_us or self.spacing_us))
            object.__setattr__(self, "spacing_us", int(self.spacing_us or self.bin_us))
        if not isinstance(self.closed, (bool, np.bool_)):
            raise ValueError(f"closed must be true or false, got {self.closed!r}")
        object.__setattr__(self, "closed", bool(self.closed))  # numpy's bool does not go to JSON
        if self.name != "histogram" and self.layout != _LAYOUT:
            raise ValueError(f"bin_us, spacing_us and closed apply to the histogram representation only, got "
                             f"{self.layout} for {self.name!r}")
        if self.window_us < self.bins:
            raise ValueError(f"window_us ({self.window_us}) must be at least bins ({self.bins}) so no bin is empty")
        if self.spaced:
            span = (self.bins - 1) * self.bin_spacing_us + self.bin_length_us
            if self.window_us != span:
                raise ValueError(f"window_us must be (bins - 1) * spacing_us + bin_us = {span} for {self.bins} bins "
                                 f"of {self.bin_length_us} us whose ends are {self.bin_spacing_us} us apart, got "
                                 f"{self.window_us}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EventRepresentation:
        """Build from a config mapping (None = defaults); unknown keys raise ValueError listing the valid ones. With
        `bin_us` or `spacing_us` and no `window_us`, the window is the span of those bins."""
        d = dict(d or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown event representation keys {unknown}; valid keys are {valid}")
        if "window_us" not in d and (d.get("bin_us") or d.get("spacing_us")):
            bin_us, spacing_us = d.get("bin_us") or d["spacing_us"], d.get("spacing_us") or d["bin_us"]
            d["window_us"] = (d.get("bins", cls.bins) - 1) * spacing_us + bin_us
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping, leaving out the layout fields at their defaults, so a contiguous
        representation records exactly as before they existed (caches built then still resume and compare equal)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if k not in _LAYOUT or v != _LAYOUT[k]}

    @property
    def layout(self) -> dict[str, Any]:
        """The three layout fields: bin_us, spacing_us, closed."""
        return {k: getattr(self, k) for k in _LAYOUT}

    @property
    def spaced(self) -> bool:
        """Whether the bins have an explicit length and spacing (RVT's layout) instead of splitting the window."""
        return self.bin_us is not None or self.spacing_us is not None

    @property
    def bin_length_us(self) -> int:
        """Time each bin covers (the contiguous layout's bins differ by at most 1 µs; this is the shortest)."""
        return self.bin_us if self.bin_us is not None else self.window_us // self.bins

    @property
    def bin_spacing_us(self) -> int:
        """Distance between the ends of consecutive bins."""
        return self.spacing_us if self.spacing_us is not None else self.window_us // self.bins

    def bin_windows(self, t_end: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) in µs of the bins of the sample ending at ``t_end``, oldest first."""
        if not self.spaced:
            edges = t_end - self.window_us + (np.arange(self.bins + 1, dtype=np.int64) * self.window_us) // self.bins
            return edges[:-1], edges[1:]
        ends = t_end - np.arange(self.bins - 1, -1, -1, dtype=np.int64) * self.bin_spacing_us
        return ends - self.bin_length_us, ends

    def event_range(self, t_end: int) -> tuple[int, int]:
        """Half-open ``[t0, t1)`` of the event times the sample ending at ``t_end`` needs (``t0 >= 0``), what a
        reader must load: ``window_us`` before ``t_end``, plus ``t_end`` itself when the bins are closed."""
        return max(t_end - self.window_us, 0), t_end + 1 if self.closed else t_end

    @property
    def channels_per_bin(self) -> int:
        """Channels each time step has in the model input: 3 (replicated frames), 2 (OFF, ON) or 1 (voxel)."""
        return {"ems_frames": 3, "histogram": 2, "voxel": 1}[self.name]

    @property
    def no_event_value(self) -> int:
        """uint8 value meaning "no event", used e.g. to pad letterboxed inputs."""
        return 0 if self.name == "histogram" else _NO_EVENT

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the arrays returned by :meth:`stored`."""
        if self.name == "histogram":
            return (self.bins, 2, self.height, self.width)
        return (self.bins, self.height, self.width)

    def stored(self, events: np.ndarray, t_end: int) -> np.ndarray:
        """Compact uint8 array of the window ending at ``t_end``, suitable for caching."""
        t_start = t_end - self.window_us
        if self.name == "ems_frames":
            return ems_frames(events, t_end, self.window_us, self.bins, self.height, self.width)
        if self.name == "histogram":
            counts = window_counts(events, *self.bin_windows(t_end), self.height, self.width, self.cutoff, self.closed)
            return ((2 * 255 * counts.astype(np.int64) + self.cutoff) // (2 * self.cutoff)).astype(np.uint8)
        window = _window(events, t_start, t_end)
        grid = voxel_grid(window, self.bins, self.height, self.width, t_start=t_start, t_end=t_end)
        scale = max(1.0, self.cutoff / 2)
        return np.clip(np.rint(127.0 + 127.0 * grid / scale), 0, 254).astype(np.uint8)

    def to_model(self, stored: np.ndarray) -> np.ndarray:
        """uint8 ``[bins * channels_per_bin, H, W]`` with time-major channels (bin t at ``t*C .. t*C + C - 1``)."""
        if stored.shape != self.stored_shape or stored.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array of shape {self.stored_shape} for {self.name!r}, "
                f"got {stored.dtype} {stored.shape}"
            )
        if self.name == "ems_frames":
            return np.repeat(stored, 3, axis=0)
        return np.ascontiguousarray(stored.reshape(self.bins * self.channels_per_bin, self.height, self.width))

    def __call__(self, events: np.ndarray, t_end: int) -> np.ndarray:
        """Model input of the window ending at ``t_end``: ``to_model(stored(events, t_end))``."""
        return self.to_model(self.stored(events, t_end))


def resize_channels(x: np.ndarray, size: int) -> np.ndarray:
    """Stretch a ``[C, H, W]`` uint8 stack to ``[C, size, size]`` (bilinear, any number of channels)."""
    hwc = cv2.resize(np.ascontiguousarray(x.transpose(1, 2, 0)), (size, size), interpolation=cv2.INTER_LINEAR)
    return hwc.reshape(size, size, -1).transpose(2, 0, 1)
