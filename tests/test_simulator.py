"""Tests for `ems_yolo.events.simulator`: level crossings, timing, refractory period, mismatch, noise, real video."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shared_data import SHARED_DATA

from ems_yolo.events import EVENT_DTYPE, read_dat, read_dat_header
from ems_yolo.events.simulator import EventSimulator, SimulatorConfig, video_to_events

VIDEO = SHARED_DATA / "videos" / "esim_test_frames.avi"
needs_video = pytest.mark.skipif(not VIDEO.exists(), reason="shared test video not available")

EPS = 1e-3


def _frame(level: float) -> np.ndarray:
    """2 x 3 float frame of intensity 0.5 except pixel (row 1, col 2) whose log intensity is ``level``."""
    frame = np.full((2, 3), 0.5)
    frame[1, 2] = math.exp(level) - EPS
    return frame


def _moving_pattern(n: int, height: int = 40, width: int = 50) -> list[np.ndarray]:
    """Frames of a smooth random texture sliding one pixel per frame."""
    rng = np.random.default_rng(1)
    texture = rng.uniform(0.05, 1.0, (height, width + n))
    return [texture[:, k : k + width] for k in range(n)]


def test_rising_ramp_emits_interpolated_on_events():
    sim = EventSimulator(3, 2, SimulatorConfig(c_on=0.2, c_off=0.2, eps=EPS))
    l0 = math.log(0.2 + EPS)
    assert sim.feed(_frame(l0), 0).size == 0  # first frame only initialises
    events = sim.feed(_frame(l0 + 0.5), 10_000)  # +2.5 C: crossings at +0.2 and +0.4 of the 0.5 rise
    assert events.dtype == EVENT_DTYPE
    assert events["t"].tolist() == [4_000, 8_000]
    assert events["p"].tolist() == [1, 1]
    assert events["x"].tolist() == [2, 2] and events["y"].tolist() == [1, 1]


def test_falling_ramp_emits_off_events_from_the_reference_level():
    sim = EventSimulator(3, 2, SimulatorConfig(c_on=0.2, c_off=0.2, eps=EPS))
    l0 = math.log(0.2 + EPS)
    sim.feed(_frame(l0), 0)
    sim.feed(_frame(l0 + 0.5), 10_000)  # reference ends at l0 + 0.4
    events = sim.feed(_frame(l0 - 0.1), 20_000)  # falls 0.6: OFF levels l0 + 0.2 and l0, not l0 + 0.3
    assert events["p"].tolist() == [0, 0]
    assert events["t"].tolist() == [15_000, round(10_000 + 10_000 * 0.5 / 0.6)]
    assert sim.feed(_frame(l0 - 0.1), 30_000).size == 0


def test_asymmetric_thresholds():
    sim = EventSimulator(3, 2, SimulatorConfig(c_on=0.3, c_off=0.1, eps=EPS))
    l0 = math.log(0.3 + EPS)
    sim.feed(_frame(l0), 0)
    assert sim.feed(_frame(l0 + 0.65), 1_000)["p"].tolist() == [1, 1]
    assert sim.feed(_frame(l0 + 0.25), 2_000)["p"].tolist() == [0, 0, 0]


def test_uint8_frames_match_float_frames():
    frames = _moving_pattern(6)
    as_uint8 = [np.round(f * 255).astype(np.uint8) for f in frames]
    sim_u8, sim_f = EventSimulator(50, 40), EventSimulator(50, 40)
    for k, (u8, f) in enumerate(zip(as_uint8, frames)):
        a, b = sim_u8.feed(u8, k * 1000), sim_f.feed(u8 / 255.0, k * 1000)
        np.testing.assert_array_equal(a, b)


def test_constant_video_emits_nothing():
    frame = np.random.default_rng(0).uniform(0, 1, (24, 32))
    sim = EventSimulator(32, 24, SimulatorConfig(sigma=0.05, refractory_us=100))
    assert sum(sim.feed(frame, k * 2_000).size for k in range(20)) == 0


def test_events_sorted_inside_sensor_and_between_frames():
    sim = EventSimulator(50, 40, SimulatorConfig(sigma=0.03))
    t_prev, total = 0, 0
    for k, frame in enumerate(_moving_pattern(12)):
        t = k * 3_333
        events = sim.feed(frame, t)
        total += events.size
        assert np.all(np.diff(events["t"]) >= 0)
        assert np.all((events["t"] >= t_prev) & (events["t"] <= t))
        assert events["x"].max(initial=0) < 50 and events["y"].max(initial=0) < 40
        t_prev = t
    assert total > 1000


def test_refractory_period_suppresses_close_events_but_moves_the_reference():
    l0 = math.log(0.01 + EPS)
    rise = 10.5 * 0.2  # crossings every 1000 µs over a 10.5 ms ramp
    free = EventSimulator(3, 2, SimulatorConfig(eps=EPS))
    free.feed(_frame(l0), 0)
    assert free.feed(_frame(l0 + rise), 10_500)["t"].tolist() == list(range(1_000, 10_001, 1_000))

    sim = EventSimulator(3, 2, SimulatorConfig(refractory_us=2_500, eps=EPS))
    sim.feed(_frame(l0), 0)
    assert sim.feed(_frame(l0 + rise), 10_500)["t"].tolist() == [1_000, 4_000, 7_000, 10_000]
    # the suppressed crossings still moved the reference to l0 + 2.0, so rising to l0 + 2.25 fires exactly once
    later = sim.feed(_frame(l0 + 2.25), 20_500)
    assert later["p"].tolist() == [1]


def test_refractory_period_applies_across_frames():
    l0 = math.log(0.1 + EPS)
    sim = EventSimulator(3, 2, SimulatorConfig(refractory_us=5_000, eps=EPS))
    sim.feed(_frame(l0), 0)
    assert sim.feed(_frame(l0 + 0.25), 1_000)["t"].tolist() == [800]
    assert sim.feed(_frame(l0 + 0.45), 2_000).size == 0  # crossing at 1750 µs, within 5 ms of the last event
    assert sim.feed(_frame(l0 + 0.65), 12_000)["t"].tolist() == [9_500]  # 8.7 ms after the last event


def _count(config: SimulatorConfig) -> int:
    sim = EventSimulator(50, 40, config)
    return sum(sim.feed(frame, k * 2_000).size for k, frame in enumerate(_moving_pattern(8)))


def test_threshold_mismatch_is_deterministic_per_seed():
    base = _count(SimulatorConfig())
    a, b = _count(SimulatorConfig(sigma=0.05, seed=3)), _count(SimulatorConfig(sigma=0.05, seed=3))
    c = _count(SimulatorConfig(sigma=0.05, seed=4))
    assert a == b
    assert a != base and c != a


def test_tiny_thresholds_are_clamped():
    sim = EventSimulator(50, 40, SimulatorConfig(c_on=0.02, c_off=0.02, sigma=0.5))
    assert sim._c_on.min() >= 0.01 and sim._c_off.min() >= 0.01


def test_shot_noise_rate_and_determinism():
    frame = np.full((40, 50), 0.5)
    config = SimulatorConfig(noise_hz=10.0, seed=7)
    runs = []
    for _ in range(2):
        sim = EventSimulator(50, 40, config)
        runs.append(np.concatenate([sim.feed(frame, k * 10_000) for k in range(101)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    expected = 10.0 * 50 * 40 * 1.0  # rate x pixels x 1 s
    assert abs(runs[0].size - expected) < 5 * math.sqrt(expected)
    assert np.all(np.diff(runs[0]["t"]) >= 0) and set(np.unique(runs[0]["p"])) == {0, 1}


def test_invalid_inputs():
    sim = EventSimulator(4, 3)
    with pytest.raises(ValueError, match="shape"):
        sim.feed(np.zeros((4, 3)), 0)
    with pytest.raises(TypeError):
        sim.feed(np.zeros((3, 4), np.int32), 0)
    sim.feed(np.zeros((3, 4)), 100)
    with pytest.raises(ValueError, match="increase"):
        sim.feed(np.zeros((3, 4)), 100)
    with pytest.raises(ValueError, match="c_on"):
        SimulatorConfig(c_on=0.0)
    with pytest.raises(ValueError, match="refractory"):
        SimulatorConfig(refractory_us=-1)


@needs_video
def test_real_video_to_events(tmp_path):
    out = tmp_path / "x_td.dat"
    events = video_to_events(VIDEO, out=out)
    assert events.dtype == EVENT_DTYPE
    assert events.size > 50_000
    assert np.all(np.diff(events["t"]) >= 0)
    assert events["t"][0] >= 0 and events["t"][-1] <= 160 * 40_000  # 161 frames at 25 fps
    assert events["x"].max() < 304 and events["y"].max() < 240
    assert set(np.unique(events["p"])) == {0, 1}
    header = read_dat_header(out)
    assert (header.width, header.height) == (304, 240)
    np.testing.assert_array_equal(read_dat(out), events)


@needs_video
def test_simulated_events_can_be_written_as_evt2_raw(tmp_path):
    from ems_yolo.events.raw import read_raw, read_raw_header

    out = tmp_path / "x.raw"
    events = video_to_events(VIDEO, out=out, width=64, height=48, max_frames=10)
    assert read_raw_header(out).encoding == "EVT2" and (read_raw_header(out).width, read_raw_header(out).height) == (
        64, 48)
    np.testing.assert_array_equal(read_raw(out), events)


@needs_video
def test_real_video_max_frames_and_size():
    events = video_to_events(VIDEO, width=64, height=48, max_frames=10)
    assert events.size > 0
    assert events["t"].max() <= 9 * 40_000
    assert events["x"].max() < 64 and events["y"].max() < 48


def test_missing_or_unreadable_video(tmp_path):
    missing = tmp_path / "nope.avi"
    with pytest.raises(FileNotFoundError, match="nope.avi"):
        video_to_events(missing)
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="junk.avi"):
        video_to_events(junk)
