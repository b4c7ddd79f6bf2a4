"""Synthetic Gen1- and 1 Mpx-shaped event datasets: rendered street scenes turned into events by the simulator
(events-spec §7.3).

Each recording is a greyscale scene at the dataset's sensor size (Gen1 304 x 240, 1 Mpx 1280 x 720, objects scaled
with the sensor height) rendered at a high frame rate: a textured background (smooth
blotches, a road band and a few building blocks) pans slowly like a moving camera, while textured "cars" (wide
boxes with cabin, windows and wheels, moving fast and mostly horizontally) and "pedestrians" (tall ellipses or stick
figures, moving slowly) cross it. Objects lower in the image are larger and drawn in front, so they occlude the
ones behind. The frames go through :class:`~ems_yolo.events.simulator.EventSimulator` with threshold mismatch,
a refractory period and shot noise, and the events are written as ``<name>_td.dat`` next to ``<name>_bbox.npy``
(Gen1 v1 box layout).

Labels follow each dataset's conventions: Gen1 every 250 ms after the first 0.5 s with class 0 car, 1 pedestrian;
1 Mpx at 60 Hz with its 7-class ids (0 pedestrian, 2 car, and 3 truck, a large car that the 1 Mpx protocol drops).
One box per visible object (confidence 1, track id per object), all boxes of a label time sharing its timestamp.
A box is the bounding box of the object's pixels still visible at that instant (clipped by the sensor border and by
objects in front); boxes under the protocol's minimum side or diagonal (Gen1 10 / 30 px, 1 Mpx 20 / 60 px) or
showing less than a third of their object are dropped, so evaluation protocol A keeps every ground-truth box.

Generation is deterministic: recording ``i`` of split ``s`` draws everything from
``numpy.random.default_rng((seed, s, i))``. The event records and box files are identical for equal parameters;
only the ``% Date`` header line of the `.dat` files records when they were written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from ems_yolo.cfg import ems_home
from ems_yolo.events.io import BBOX_DTYPE_V1, write_bbox, write_dat
from ems_yolo.events.simulator import EventSimulator, SimulatorConfig
from ems_yolo.utils.checks import check_int
from ems_yolo.utils.files import build_folder_once

__all__ = ["CLASS_NAMES", "make_synthetic_gen1", "make_synthetic_gen4"]
_DATE = datetime(2020, 1, 1)  # fixed header date: equal parameters give byte-identical files

CLASS_NAMES: tuple[str, ...] = ("car", "pedestrian")

_GENERATOR_VERSION = 1  # bump whenever rendering or simulation changes, so cached datasets are regenerated
_SPLITS = ("train", "val", "test")
_MARKER = ".complete"
_SKIP_US = 500_000  # protocol A ignores labels at t <= 0.5 s, so the first label comes one period later
_MIN_VISIBLE_FRACTION = 1 / 3


@dataclass(frozen=True)
class _Camera:
    """What differs between the Gen1- and the 1 Mpx-shaped datasets."""

    width: int
    height: int
    label_period_us: float
    car: int  # class ids in the dataset's label files
    pedestrian: int
    truck: int | None
    min_side: float
    min_diagonal: float

    @property
    def scale(self) -> float:
        """Object sizes and speeds relative to the Gen1 sensor."""
        return self.height / 240


_CAMERAS = {
    "gen1": _Camera(304, 240, 250_000, car=0, pedestrian=1, truck=None, min_side=10, min_diagonal=30),
    "gen4": _Camera(1280, 720, 1e6 / 60, car=2, pedestrian=0, truck=3, min_side=20, min_diagonal=60),
}
_SUPERSAMPLE = 4  # sprites are drawn this much larger and area-averaged down, for anti-aliased edges
_SENSOR = SimulatorConfig(c_on=0.2, c_off=0.2, sigma=0.03, refractory_us=500, eps=1e-3, noise_hz=0.2)


@dataclass(frozen=True)
class _Actor:
    """One moving object: premultiplied sprite and alpha (stacked, padded by 1 px) and its linear motion."""

    class_id: int
    track_id: int
    layers: np.ndarray  # (h + 1, w + 1, 2) float32: intensity * alpha, alpha
    x0: float  # top-left corner at t = 0, pixels
    y0: float
    vx: float  # pixels per second
    vy: float

    def placed(self, t: float) -> tuple[int, int, np.ndarray]:
        """Integer top-left corner and the sub-pixel shifted layers of the sprite at time ``t`` (s)."""
        x, y = self.x0 + self.vx * t, self.y0 + self.vy * t
        ix, iy = math.floor(x), math.floor(y)
        h, w = self.layers.shape[:2]
        shift = np.float32([[1, 0, x - ix], [0, 1, y - iy]])
        return ix, iy, cv2.warpAffine(self.layers, shift, (w, h), flags=cv2.INTER_LINEAR)


def _crop(ix: int, iy: int, h: int, w: int, width: int, height: int) -> tuple[slice, slice, slice, slice] | None:
    """Sensor and patch slices of an ``h x w`` patch with top-left ``(ix, iy)``, or None if it is fully outside."""
    xa, xb, ya, yb = max(ix, 0), min(ix + w, width), max(iy, 0), min(iy + h, height)
    if xa >= xb or ya >= yb:
        return None
    return slice(ya, yb), slice(xa, xb), slice(ya - iy, yb - iy), slice(xa - ix, xb - ix)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field of ``h x w`` with features about ``cell`` pixels wide."""
    grid = rng.standard_normal((max(2, round(h / cell) + 2), max(2, round(w / cell) + 2))).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _background(rng: np.random.Generator, h: int, w: int, s: float = 1.0) -> np.ndarray:
    """Textured street backdrop of ``h x w`` with features ``s`` times the Gen1 size: blotches, a darker road band,
    building blocks, lane marks."""
    mean = rng.uniform(0.3, 0.5)
    img = mean + 0.05 * _smooth_noise(rng, h, w, 40 * s) + 0.025 * _smooth_noise(rng, h, w, 10 * s)
    horizon = int(h * rng.uniform(0.35, 0.45))
    x = 0
    while x < w:  # building blocks above the horizon: vertical edges that move as the camera pans
        bw = int(int(rng.integers(20, 70)) * s)
        top = int(rng.integers(horizon // 4, horizon - 10))
        img[top:horizon, x : x + bw] += rng.uniform(-0.12, 0.12)
        x += bw + int(int(rng.integers(0, 30)) * s)
    img[horizon:] *= rng.uniform(0.6, 0.85)  # road
    lane_y = int(rng.uniform(0.62, 0.72) * h)
    for x in range(int(int(rng.integers(0, 40)) * s), w, int(60 * s)):
        img[lane_y : lane_y + round(2 * s), x : x + int(25 * s)] += 0.15
    return np.clip(img, 0.02, 0.98).astype(np.float32)


def _sprite(draw: Callable[[np.ndarray, int], None], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased label image and alpha of an ``h x w`` sprite; ``draw(labels, scale)`` paints part ids 1..n."""
    big = np.zeros((h * _SUPERSAMPLE, w * _SUPERSAMPLE), np.uint8)
    draw(big, _SUPERSAMPLE)
    return big, cv2.resize((big > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def _shade(rng: np.random.Generator, parts: np.ndarray, values: list[float], h: int, w: int) -> np.ndarray:
    """Fill the part ids of the supersampled label image with ``values`` plus texture, area-averaged to ``h x w``."""
    lut = np.zeros(256, np.float32)
    lut[1 : len(values) + 1] = values
    tone = cv2.resize(lut[parts], (w, h), interpolation=cv2.INTER_AREA)
    coverage = cv2.resize((parts > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    tone = tone / np.maximum(coverage, 1e-3)  # undo the dimming of partially covered edge pixels
    texture = 0.06 * _smooth_noise(rng, h, w, 3) + 0.04 * np.sin(np.arange(w, dtype=np.float32) * rng.uniform(0.5, 1.2))
    return np.clip(tone + texture, 0.02, 0.98)


def _contrasting_tone(rng: np.random.Generator, backdrop: float) -> float:
    """A body intensity clearly darker or brighter than the ``backdrop`` intensity beneath the object."""
    dark = backdrop > 0.22 and rng.random() < 0.5
    return rng.uniform(0.04, 0.14) if dark else rng.uniform(0.6, 0.92)


def _car(rng: np.random.Generator, scale: float, backdrop: float) -> tuple[np.ndarray, np.ndarray]:
    """Sprite (intensity, alpha) of a car: body, cabin with windows, two wheels; about ``scale`` times 65 px wide."""
    w = max(34, round(rng.uniform(55, 80) * scale))
    h = max(16, round(w * rng.uniform(0.42, 0.58)))
    body = _contrasting_tone(rng, backdrop)
    window = 0.85 if body < 0.4 else 0.12
    cabin_x0, cabin_x1 = rng.uniform(0.12, 0.25), rng.uniform(0.7, 0.88)

    def draw(img: np.ndarray, s: int) -> None:
        W, H = w * s, h * s
        cv2.rectangle(img, (0, int(0.38 * H)), (W - 1, int(0.85 * H)), 1, -1)
        cv2.rectangle(img, (int(cabin_x0 * W), 0), (int(cabin_x1 * W), int(0.42 * H)), 1, -1)
        gap = int(0.06 * W)
        cv2.rectangle(img, (int(cabin_x0 * W) + gap, int(0.08 * H)), (int(cabin_x1 * W) - gap, int(0.36 * H)), 2, -1)
        r = int(0.16 * H)
        for cx in (0.22, 0.78):
            cv2.circle(img, (int(cx * W), H - r - 1), r, 3, -1)

    parts, alpha = _sprite(draw, h, w)
    return _shade(rng, parts, [body, window, 0.05], h, w), alpha


def _pedestrian(rng: np.random.Generator, scale: float, backdrop: float) -> tuple[np.ndarray, np.ndarray]:
    """Sprite (intensity, alpha) of a pedestrian: a tall ellipse with a head, or a stick figure."""
    h = max(34, round(rng.uniform(45, 62) * scale))
    w = max(12, round(h * rng.uniform(0.3, 0.42)))
    tone = _contrasting_tone(rng, backdrop)
    stick = rng.random() < 0.5
    stride = rng.uniform(0.15, 0.4)

    def draw(img: np.ndarray, s: int) -> None:
        W, H = w * s, h * s
        head = int(0.1 * H)
        cv2.circle(img, (W // 2, head + 1), head, 2, -1)
        if stick:
            t = max(s, int(0.16 * W))
            hip, neck = (W // 2, int(0.58 * H)), (W // 2, 2 * head)
            cv2.line(img, neck, hip, 1, t)
            cv2.line(img, (int(0.1 * W), int(0.42 * H)), (int(0.9 * W), int(0.3 * H)), 1, t)
            for side in (-1, 1):
                cv2.line(img, hip, (int(W / 2 + side * stride * W), H - t), 1, t)
        else:
            cv2.ellipse(img, (W // 2, int(0.6 * H)), (W // 2 - 1, int(0.39 * H)), 0, 0, 360, 1, -1)

    parts, alpha = _sprite(draw, h, w)
    return _shade(rng, parts, [tone, tone * 0.8 + 0.1], h, w), alpha


class _Scene:
    """One recording's world: panning background plus actors in back-to-front order."""

    def __init__(self, rng: np.random.Generator, duration_s: float, camera: _Camera) -> None:
        self.camera = cam = camera
        width, height, s = cam.width, cam.height, cam.scale
        speed = rng.uniform(3, 10) * rng.choice([-1, 1]) * s
        drift = rng.uniform(-1.5, 1.5) * s
        tex_h = height + math.ceil(abs(drift) * duration_s) + 4
        tex_w = width + math.ceil(abs(speed) * duration_s) + 4
        self.background = _background(rng, tex_h, tex_w, s)
        self.pan = (speed, drift)
        self.pan0 = (1.0 if speed > 0 else tex_w - width - 3.0, 1.0 if drift > 0 else tex_h - height - 3.0)

        kinds = [0] * int(rng.integers(1, 5)) + [1] * int(rng.integers(1, 4))  # 0 car, 1 pedestrian, 2 truck
        if cam.truck is not None:
            kinds += [2] * int(rng.integers(0, 2))
        actors = []
        for track_id, kind in enumerate(kinds):
            bottom = rng.uniform(0.5, 0.97) * height if kind != 1 else rng.uniform(0.55, 1.0) * height
            scale = 0.55 + 0.9 * (bottom / height - 0.5) / 0.47
            backdrop = float(self.background[min(int(bottom), tex_h - 1)].mean())
            make = _pedestrian if kind == 1 else _car
            tone, alpha = make(rng, scale * s * (1.5 if kind == 2 else 1.0), backdrop)
            h, w = alpha.shape
            if kind != 1:
                vx, vy = rng.uniform(40, 110) * rng.choice([-1, 1]) * s, rng.uniform(-2, 2) * s
            else:
                vx, vy = rng.uniform(10, 35) * rng.choice([-1, 1]) * s, rng.uniform(-6, 6) * s
            # pass through a random point of the central part of the view during the labelled period
            t_mid, x_mid = rng.uniform(_SKIP_US * 1e-6, duration_s), rng.uniform(0.15, 0.85) * width
            layers = np.zeros((h + 1, w + 1, 2), np.float32)
            layers[:h, :w, 0], layers[:h, :w, 1] = tone * alpha, alpha
            x0, y0 = x_mid - w / 2 - vx * t_mid, bottom - h - vy * t_mid
            class_id = (cam.car, cam.pedestrian, cam.truck)[kind]
            actors.append((bottom, _Actor(class_id, track_id, layers, x0, y0, vx, vy)))
        self.actors = [actor for _, actor in sorted(actors, key=lambda item: item[0])]

    def render(self, t: float) -> np.ndarray:
        """Greyscale float32 frame in [0, 1] at time ``t`` (s)."""
        offset = np.float32([[1, 0, self.pan0[0] + self.pan[0] * t], [0, 1, self.pan0[1] + self.pan[1] * t]])
        frame = cv2.warpAffine(
            self.background, offset, (self.camera.width, self.camera.height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        )
        for actor in self.actors:
            ix, iy, layers = actor.placed(t)
            crop = _crop(ix, iy, *layers.shape[:2], self.camera.width, self.camera.height)
            if crop is None:
                continue
            sy, sx, py, px = crop
            region = frame[sy, sx]
            region *= 1 - layers[py, px, 1]
            region += layers[py, px, 0]
        return frame

    def boxes(self, t: float) -> list[tuple[int, int, int, int, int, int]]:
        """``(class_id, track_id, x, y, w, h)`` of the visible extent of every sufficiently visible actor at ``t``."""
        cam = self.camera
        owner = np.full((cam.height, cam.width), -1, np.int16)
        areas = []
        for index, actor in enumerate(self.actors):
            ix, iy, layers = actor.placed(t)
            solid = layers[..., 1] >= 0.5
            areas.append(int(solid.sum()))
            crop = _crop(ix, iy, *solid.shape, cam.width, cam.height)
            if crop is not None:
                sy, sx, py, px = crop
                owner[sy, sx][solid[py, px]] = index
        found = []
        for index, actor in enumerate(self.actors):
            ys, xs = np.nonzero(owner == index)
            if ys.size < _MIN_VISIBLE_FRACTION * areas[index]:
                continue
            x, y, w, h = int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
            if w >= cam.min_side and h >= cam.min_side and w * w + h * h >= cam.min_diagonal**2:
                found.append((actor.class_id, actor.track_id, x, y, w, h))
        return found


def _record(rng: np.random.Generator, duration_s: float, fps: int, camera: _Camera) -> tuple[np.ndarray, np.ndarray]:
    """Render and simulate one recording; return its events (EVENT_DTYPE) and boxes (v1 layout)."""
    scene = _Scene(rng, duration_s, camera)
    simulator = EventSimulator(camera.width, camera.height, replace(_SENSOR, seed=int(rng.integers(2**31))))
    n_frames = round(duration_s * fps) + 1
    events = np.concatenate([simulator.feed(scene.render(k / fps), round(k * 1e6 / fps)) for k in range(n_frames)])

    rows = []
    end_us = round(duration_s * 1e6)
    first = math.ceil(_SKIP_US / camera.label_period_us) + 1  # the first label time after the skipped 0.5 s
    for ts in (round(k * camera.label_period_us) for k in range(first, int(end_us / camera.label_period_us) + 1)):
        rows += [(ts, x, y, w, h, c, 1.0, track) for c, track, x, y, w, h in scene.boxes(ts * 1e-6)]
    return events, np.array(rows, dtype=BBOX_DTYPE_V1)


def _default_root(params: dict) -> Path:
    """``$EMS_YOLO_HOME/datasets/<camera>-synthetic-<params>``."""
    name = (
        f"{params['camera']}-synthetic-g{params['generator']}-{params['n_train']}-{params['n_val']}-{params['n_test']}"
        f"-{params['duration_s']:g}s-{params['fps']}fps-s{params['seed']}"
    )
    return ems_home() / "datasets" / name


def _expected_files(params: dict) -> list[Path]:
    """Relative paths of every file a complete dataset with ``params`` holds, besides the marker."""
    return [
        Path(split) / f"synth_{split}_{i:04d}{suffix}"
        for split in _SPLITS
        for i in range(params[f"n_{split}"])
        for suffix in ("_td.dat", "_bbox.npy")
    ]


def _is_complete(folder: Path, params: dict) -> bool:
    """Whether ``folder`` holds a finished dataset generated with ``params``."""
    try:
        if json.loads((folder / _MARKER).read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    return all((folder / rel).is_file() for rel in _expected_files(params))


def _write_dataset(folder: Path, params: dict) -> None:
    """Generate every recording into ``folder``; the marker file is written last."""
    camera = _CAMERAS[params["camera"]]
    for split_id, split in enumerate(_SPLITS):
        if params[f"n_{split}"]:  # no empty split folder (preprocessing refuses one)
            (folder / split).mkdir()
        for i in range(params[f"n_{split}"]):
            rng = np.random.default_rng((params["seed"], split_id, i))
            events, boxes = _record(rng, params["duration_s"], params["fps"], camera)
            stem = folder / split / f"synth_{split}_{i:04d}"
            write_dat(stem.with_name(stem.name + "_td.dat"), events, camera.width, camera.height, date=_DATE)
            write_bbox(stem.with_name(stem.name + "_bbox.npy"), boxes, version=1)
    (folder / _MARKER).write_text(json.dumps(params, sort_keys=True))


def _make_synthetic(camera: str, root: str | Path | None, n_train: int, n_val: int, n_test: int,
                    duration_s: float, fps: int, seed: int) -> Path:
    """Generate (once) the synthetic dataset of one camera; see `make_synthetic_gen1`."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("seed", seed)):
        check_int(name, value, 0)
    check_int("fps", fps, 100, " (slower rendering bunches events up)")
    period = _CAMERAS[camera].label_period_us
    first_label_s = (math.ceil(_SKIP_US / period) + 1) * period * 1e-6
    if not (math.isfinite(duration_s) and duration_s >= first_label_s):
        raise ValueError(f"duration_s must be >= {first_label_s:g} s so that recordings get labels, got {duration_s!r}")
    params = {
        "camera": camera,
        "generator": _GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "duration_s": float(duration_s),
        "fps": int(fps),
        "seed": int(seed),
    }
    final = (Path(root).expanduser() if root is not None else _default_root(params)).resolve()
    if _is_complete(final, params):
        return final
    if final.exists() and not (final.is_dir() and {p.name for p in final.iterdir()} <= {*_SPLITS, _MARKER}):
        raise FileExistsError(f"{final} exists and is not a synthetic {camera} dataset; refusing to overwrite it")

    build_folder_once(final, lambda f: _is_complete(f, params), lambda tmp: _write_dataset(tmp, params))
    return final


def make_synthetic_gen1(
    root: str | Path | None = None,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 2,
    duration_s: float = 2.5,
    fps: int = 500,
    seed: int = 0,
) -> Path:
    """Generate (once) a Gen1-shaped synthetic dataset and return its root folder.

    The root holds ``train/``, ``val/`` and ``test/`` with ``synth_<split>_<index>_td.dat`` and ``_bbox.npy``
    pairs, and a marker file naming the parameters. A complete folder generated with the same parameters is
    reused untouched; otherwise the dataset is generated in a temporary sibling and renamed into place, replacing
    an incomplete or differently parametrised dataset (any other existing content raises FileExistsError).
    ``root`` defaults to ``$EMS_YOLO_HOME/datasets/gen1-synthetic-<params>``.
    """
    return _make_synthetic("gen1", root, n_train, n_val, n_test, duration_s, fps, seed)


def make_synthetic_gen4(
    root: str | Path | None = None,
    n_train: int = 2,
    n_val: int = 1,
    n_test: int = 1,
    duration_s: float = 1.0,
    fps: int = 300,
    seed: int = 0,
) -> Path:
    """Generate (once) a 1 Mpx-shaped synthetic dataset (1280x720, labels at 60 Hz, 1 Mpx class ids) and return
    its root folder; layout and reuse as in `make_synthetic_gen1`, default root
    ``$EMS_YOLO_HOME/datasets/gen4-synthetic-<params>``."""
    return _make_synthetic("gen4", root, n_train, n_val, n_test, duration_s, fps, seed)
