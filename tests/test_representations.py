"""Tests for `ems_yolo.events.representations`: bin boundaries, frame semantics, counts, voxels, config object."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import SAMPLE, needs_sample

from ems_yolo.events import (
    EVENT_DTYPE,
    EventRepresentation,
    count_histogram,
    ems_frames,
    read_dat,
    voxel_grid,
)

H, W = 6, 8


def _events(*rows: tuple[int, int, int, int]) -> np.ndarray:
    """Structured events from (t, x, y, p) tuples."""
    events = np.empty(len(rows), dtype=EVENT_DTYPE)
    for i, (t, x, y, p) in enumerate(rows):
        events[i] = (t, x, y, p)
    return events


def _random_events(n: int, t_max: int, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """Sorted random events with many repeated timestamps and pixels."""
    rng = np.random.default_rng(seed)
    events = np.empty(n, dtype=EVENT_DTYPE)
    events["t"] = np.sort(rng.integers(0, t_max, n))
    events["x"] = rng.integers(0, width, n)
    events["y"] = rng.integers(0, height, n)
    events["p"] = rng.integers(0, 2, n)
    return events


def _naive_counts(events: np.ndarray, t_start: int, t_end: int, bins: int, height: int, width: int) -> np.ndarray:
    """Loop reference for count_histogram using the documented integer bin edges."""
    out = np.zeros((bins, 2, height, width), dtype=np.int64)
    length = t_end - t_start
    for t, x, y, p in events.tolist():
        if t_start <= t < t_end:
            k = max(k for k in range(bins) if t_start + k * length // bins <= t)
            out[k, p, y, x] += 1
    return out


def _naive_frames(events: np.ndarray, t_end: int, window: int, bins: int, height: int, width: int) -> np.ndarray:
    """Loop reference for ems_frames: paint events in order, last one wins."""
    out = np.full((bins, height, width), 127, dtype=np.uint8)
    t_start = t_end - window
    for t, x, y, p in events.tolist():
        if t_start <= t < t_end:
            k = max(k for k in range(bins) if t_start + k * window // bins <= t)
            out[k, y, x] = 255 if p else 0
    return out


# ----------------------------------------------------------------------------------------------- EMS frames


def test_frame_bins_end_at_t_end_and_boundaries_land_in_documented_bin():
    t_end, window, bins = 1_000_000, 250_000, 5  # bins of 50 ms: edges 750k, 800k, ..., 1000k
    events = _events(
        (749_999, 0, 0, 1),  # before the window: ignored
        (750_000, 1, 0, 1),  # window start: bin 0
        (799_999, 2, 0, 0),  # last µs of bin 0
        (800_000, 3, 0, 1),  # first µs of bin 1
        (949_999, 4, 0, 0),  # last µs of bin 3
        (950_000, 5, 0, 1),  # first µs of bin 4
        (999_999, 6, 0, 0),  # last µs of the window: bin 4
        (1_000_000, 7, 0, 1),  # t_end itself: excluded
    )
    frames = ems_frames(events, t_end, window, bins, H, W)
    assert frames.shape == (bins, H, W) and frames.dtype == np.uint8
    painted = {(k, int(x)): int(frames[k, 0, x]) for k, x in zip(*np.nonzero(frames[:, 0] != 127))}
    assert painted == {(0, 1): 255, (0, 2): 0, (1, 3): 255, (3, 4): 0, (4, 5): 255, (4, 6): 0}
    assert (frames[:, 1:] == 127).all()


def test_frames_non_divisible_window_edges():
    # window 10 µs in 3 bins: edges t_start + floor(k * 10 / 3) = 0, 3, 6, 10 relative to t_start = 90
    events = _events((92, 0, 0, 1), (93, 1, 0, 1), (95, 2, 0, 1), (96, 3, 0, 1), (99, 4, 0, 1))
    frames = ems_frames(events, 100, window_us=10, bins=3, height=H, width=W)
    assert [list(np.flatnonzero(frames[k, 0] == 255)) for k in range(3)] == [[0], [1, 2], [3, 4]]


def test_frames_last_event_wins():
    events = _events((10, 2, 3, 1), (20, 2, 3, 0), (30, 2, 3, 1), (30, 2, 3, 0), (40, 5, 1, 0), (45, 5, 1, 1))
    frames = ems_frames(events, 100, window_us=100, bins=1, height=H, width=W)
    assert frames[0, 3, 2] == 0  # tie at t=30 resolved by array order: the OFF event comes last
    assert frames[0, 1, 5] == 255
    assert (frames != 127).sum() == 2


def test_frames_match_loop_reference_on_random_events():
    events = _random_events(3000, 1000)
    expected = _naive_frames(events, 900, 700, 7, H, W)
    np.testing.assert_array_equal(ems_frames(events, 900, 700, 7, H, W), expected)


def test_frames_early_window_is_grey():
    events = _events((0, 0, 0, 1), (10_000, 1, 1, 0), (60_000, 2, 2, 1))
    frames = ems_frames(events, 100_000, window_us=250_000, bins=5, height=H, width=W)
    # window [-150 ms, 100 ms): bins 0..2 lie (mostly) before time 0, bin 3 = [0, 50 ms), bin 4 = [50, 100 ms)
    assert (frames[:3] == 127).all()
    assert frames[3, 0, 0] == 255 and frames[3, 1, 1] == 0 and frames[4, 2, 2] == 255


def test_frames_reject_unsorted_and_out_of_sensor_events():
    with pytest.raises(ValueError, match="sorted"):
        ems_frames(_events((20, 0, 0, 1), (10, 0, 0, 1)), 100, 100, 1, H, W)
    with pytest.raises(ValueError, match="outside"):
        ems_frames(_events((20, W, 0, 1)), 100, 100, 1, H, W)


# ------------------------------------------------------------------------------------------------ histogram


def test_histogram_counts_sum_and_off_channel_first():
    events = _events((3, 3, 3, 0), (5, 1, 1, 0), (6, 1, 1, 0), (7, 2, 2, 1), (15, 1, 1, 1), (20, 0, 0, 1))
    hist = count_histogram(events, 0, 20, bins=2, height=H, width=W)
    assert hist.shape == (2, 2, H, W) and hist.dtype == np.int32
    assert hist.sum() == 5  # the event at t=20 = t_end is excluded
    assert hist[0, 0, 1, 1] == 2 and hist[0, 0, 3, 3] == 1  # OFF events in channel 0
    assert hist[0, 1, 2, 2] == 1 and hist[1, 1, 1, 1] == 1  # ON events in channel 1
    assert hist[:, 1].sum() == 2 and hist[:, 0].sum() == 3


def test_histogram_cutoff_and_loop_reference():
    events = _random_events(5000, 1000)
    expected = _naive_counts(events, 100, 901, 4, H, W)
    hist = count_histogram(events, 100, 901, 4, H, W)
    np.testing.assert_array_equal(hist, expected)
    assert hist.sum() == np.count_nonzero((events["t"] >= 100) & (events["t"] < 901))
    clipped = count_histogram(events, 100, 901, 4, H, W, cutoff=3)
    np.testing.assert_array_equal(clipped, np.minimum(expected, 3))
    assert clipped.max() == 3


# -------------------------------------------------------------------------------------------------- voxel


def test_voxel_polarity_sum_conserved():
    events = _random_events(4000, 10_000, seed=1)
    grid = voxel_grid(events, bins=5, height=H, width=W)
    assert grid.shape == (5, H, W) and grid.dtype == np.float32
    polarity_sum = int(np.sum(np.where(events["p"] > 0, 1, -1)))
    assert grid.sum(dtype=np.float64) == pytest.approx(polarity_sum, abs=1e-3)
    # per pixel as well
    per_pixel = np.zeros((H, W))
    np.add.at(per_pixel, (events["y"], events["x"]), np.where(events["p"] > 0, 1.0, -1.0))
    np.testing.assert_allclose(grid.sum(axis=0), per_pixel, atol=1e-4)


def test_voxel_bin_centre_and_interpolation():
    # 5 bins over [0, 400]: bin b is centred at t = 100 b (t* = 4 t / 400)
    events = _events((0, 0, 0, 1), (100, 1, 0, 0), (150, 2, 0, 1), (400, 3, 0, 1))
    grid = voxel_grid(events, bins=5, height=H, width=W)
    np.testing.assert_allclose(grid[:, 0, 0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(grid[:, 0, 1], [0, -1, 0, 0, 0])
    np.testing.assert_allclose(grid[:, 0, 2], [0, 0.5, 0.5, 0, 0])
    np.testing.assert_allclose(grid[:, 0, 3], [0, 0, 0, 0, 1])  # the last event stays on the grid


def test_voxel_explicit_bounds_and_degenerate_span():
    events = _events((50, 0, 0, 1), (150, 1, 0, 1), (250, 2, 0, 0))
    grid = voxel_grid(events, bins=3, height=H, width=W, t_start=100, t_end=200)
    assert grid[:, 0, 0].sum() == 0 and grid[:, 0, 2].sum() == 0  # outside [100, 200]
    np.testing.assert_allclose(grid[:, 0, 1], [0, 1, 0])
    single = voxel_grid(_events((7, 1, 1, 0)), bins=3, height=H, width=W)
    np.testing.assert_allclose(single[:, 1, 1], [-1, 0, 0])
    assert not voxel_grid(np.empty(0, EVENT_DTYPE), bins=3, height=H, width=W).any()


# ---------------------------------------------------------------------------------- EventRepresentation


@pytest.mark.parametrize("name, channels, no_event", [("ems_frames", 3, 127), ("histogram", 2, 0), ("voxel", 1, 127)])
def test_representation_channels_and_no_event_value(name, channels, no_event):
    rep = EventRepresentation(name=name, bins=4, window_us=400, height=H, width=W)
    assert rep.channels_per_bin == channels and rep.no_event_value == no_event
    empty = rep(np.empty(0, EVENT_DTYPE), 1000)
    assert empty.shape == (4 * channels, H, W) and empty.dtype == np.uint8
    assert (empty == no_event).all()


def test_to_model_is_time_major():
    events = _events((10, 0, 0, 1), (110, 1, 0, 0), (110, 1, 0, 0), (210, 2, 0, 1), (310, 3, 0, 0))
    frames = EventRepresentation("ems_frames", bins=4, window_us=400, height=H, width=W)
    x = frames(events, 400)
    assert x.shape == (12, H, W)
    for t in range(4):
        np.testing.assert_array_equal(x[3 * t : 3 * t + 3], np.repeat(frames.stored(events, 400)[t : t + 1], 3, 0))
    assert [int(x[3 * t, 0, t]) for t in range(4)] == [255, 0, 255, 0]

    hist = EventRepresentation("histogram", bins=4, window_us=400, height=H, width=W, cutoff=2)
    stored = hist.stored(events, 400)
    np.testing.assert_array_equal(stored[1, 0, 0, 1], 255)  # two OFF events = cutoff -> 255
    x = hist(events, 400)
    assert x.shape == (8, H, W)
    # bin t, polarity c at channel 2 t + c
    assert x[0 * 2 + 1, 0, 0] == 128 and x[1 * 2 + 0, 0, 1] == 255 and x[2 * 2 + 1, 0, 2] == 128
    assert x[3 * 2 + 0, 0, 3] == 128 and x.astype(bool).sum() == 4

    voxel = EventRepresentation("voxel", bins=4, window_us=400, height=H, width=W, cutoff=2)
    x = voxel(events, 400)
    assert x.shape == (4, H, W)
    grid = voxel_grid(events, 4, H, W, t_start=0, t_end=400)
    np.testing.assert_array_equal(x, np.clip(np.rint(127 + 127 * grid), 0, 254).astype(np.uint8))
    assert x[0, 0, 0] > 127 and x[1, 0, 1] < 127


def test_histogram_stored_scaling():
    rep = EventRepresentation("histogram", bins=1, window_us=100, height=H, width=W, cutoff=10)
    events = _events(*[(t, 0, 0, 1) for t in range(3)], *[(t, 1, 0, 1) for t in range(3, 30)])
    stored = rep.stored(events, 100)
    assert stored[0, 1, 0, 0] == 77  # round(3 * 25.5) = 76.5 -> 77 (half up)
    assert stored[0, 1, 0, 1] == 255  # clipped at the cutoff


def test_from_dict():
    assert EventRepresentation.from_dict(None) == EventRepresentation()
    rep = EventRepresentation.from_dict({"name": "histogram", "bins": 10, "window_us": 50_000})
    assert (rep.name, rep.bins, rep.window_us, rep.cutoff) == ("histogram", 10, 50_000, 10)
    with pytest.raises(ValueError, match=r"unknown .*\['nbins'\].*valid keys.*'bins'"):
        EventRepresentation.from_dict({"nbins": 3})
    with pytest.raises(ValueError, match="name must be one of"):
        EventRepresentation.from_dict({"name": "frames"})
    for key, value in (("bins", 0), ("window_us", -5), ("height", 0), ("width", 2.5), ("cutoff", 0)):
        with pytest.raises(ValueError, match=key):
            EventRepresentation.from_dict({key: value})
    with pytest.raises(ValueError, match="at least bins"):
        EventRepresentation.from_dict({"bins": 10, "window_us": 5})
    with pytest.raises(ValueError, match="expected a uint8 array"):
        rep.to_model(np.zeros((10, 240, 304), np.uint8))


# ------------------------------------------------------------------------------------------ real N-CARS file


@needs_sample
def test_real_file_against_loop_reference():
    events = read_dat(SAMPLE)
    assert events.size == 2009
    height, width = 42, 78  # the sample's extent (x <= 77, y <= 41); no Width/Height in its header
    hist = count_histogram(events, 0, 100_000, 5, height, width)
    np.testing.assert_array_equal(hist, _naive_counts(events, 0, 100_000, 5, height, width))
    assert hist.sum() == 2009 and hist[:, 0].sum() == 659 and hist[:, 1].sum() == 1350

    frames = ems_frames(events, 80_000, window_us=50_000, bins=5, height=height, width=width)
    np.testing.assert_array_equal(frames, _naive_frames(events, 80_000, 50_000, 5, height, width))

    grid = voxel_grid(events, 5, 240, 304)
    assert grid.sum(dtype=np.float64) == pytest.approx(1350 - 659, abs=1e-2)

    rep = EventRepresentation(bins=5, window_us=100_000)
    x = rep(events, 100_000)
    assert x.shape == (15, 240, 304)
    assert (x[:, height:] == 127).all() and (x[:, :, width:] == 127).all()
