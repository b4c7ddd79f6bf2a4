"""Event data several test files build alike: the Gen1 cache representation, a tiny event-model checkpoint and
random recordings."""

from pathlib import Path

import numpy as np

from ems_yolo.cfg import load_model_yaml
from ems_yolo.engine.checkpoints import write_checkpoint
from ems_yolo.events.io import EVENT_DTYPE
from ems_yolo.events.representations import EventRepresentation
from ems_yolo.nn import EMSDetectionModel

GEN1_REP = EventRepresentation(bins=3, window_us=150_000)  # the caches of the `gen1_cache` fixture


def tiny_event_checkpoint(path: Path, rep: EventRepresentation) -> Path:
    """An untrained two-class ems-res10 at 1/8 width reading `rep` (T = its bins, as training makes it), written as
    a checkpoint at `path`."""
    cfg = load_model_yaml("ems-res10.yaml")
    cfg.update(width_multiple=0.125, input="events", time_steps=rep.bins, events=vars(rep).copy())
    model = EMSDetectionModel(cfg, nc=2, ch=rep.bins * rep.channels_per_bin, verbose=False)
    return write_checkpoint({"model": model, "optimizer": None, "epoch": -1, "train_args": {"task": "detect"}}, path)


def random_events(n: int, duration_us: int, width: int, height: int) -> np.ndarray:
    """`n` events at uniformly random times in [0, duration_us) (sorted), pixels and polarities; seed 0."""
    rng = np.random.default_rng(0)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, duration_us, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, width, n), rng.integers(0, height, n), rng.integers(0, 2, n)
    return ev
