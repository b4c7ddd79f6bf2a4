"""`ems-yolo tune`: Ultralytics' hyperparameter evolution (its Tuner: mutate, train, keep the fittest) driving
ems-yolo's trainer in this process, over the keys that change an ems-yolo training.

Ultralytics' default search space also mutates `box`, `cls`, `dfl` and `cls_pw` (gains of its anchor-free loss;
ems-yolo's YOLOv5 loss takes its gains from the model YAML's `loss:` section), `copy_paste` (segments only) and
`close_mosaic`, `bgr`, `cutmix`, `perspective`: those are left out, so no iteration is spent on a key that changes
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ems_yolo import ultralytics_compat as compat  # first: offline environment before Ultralytics loads
from ultralytics.engine.tuner import Tuner

from ems_yolo.engine.trainer import EMSTrainer

# key: (min, max[, mutation gain]), Ultralytics' bounds for the keys ems-yolo's training uses
TUNE_SPACE: dict[str, tuple] = {
    "lr0": (1e-5, 1e-2),
    "lrf": (0.01, 1.0),
    "momentum": (0.7, 0.98, 0.3),
    "weight_decay": (0.0, 0.001),
    "warmup_epochs": (0.0, 5.0),
    "warmup_momentum": (0.0, 0.95),
    "hsv_h": (0.0, 0.1),
    "hsv_s": (0.0, 0.9),
    "hsv_v": (0.0, 0.9),
    "degrees": (0.0, 45.0),
    "translate": (0.0, 0.9),
    "scale": (0.0, 0.95),
    "shear": (0.0, 10.0),
    "flipud": (0.0, 1.0),
    "fliplr": (0.0, 1.0),
    "mosaic": (0.0, 1.0),
    "mixup": (0.0, 1.0),
}
LOSS_GAINS = ("box", "cls", "dfl", "cls_pw")  # Ultralytics' loss keys, unused by ems-yolo's loss


def check_space(space: dict | None) -> dict[str, tuple]:
    """A search space of keys that change an ems-yolo training, each `(min, max[, gain])` with min <= max; default
    TUNE_SPACE."""
    if space is None:
        return dict(TUNE_SPACE)
    if not isinstance(space, dict) or not space:
        raise ValueError(f"space={space!r}: expected a mapping of hyperparameters to (min, max) bounds")
    for key, bounds in space.items():
        if key in LOSS_GAINS:
            raise ValueError(f"space: '{key}' is a gain of Ultralytics' loss, which ems-yolo's YOLOv5 loss does not "
                             "use (its gains are the model YAML's loss: section); expected keys among "
                             f"{', '.join(TUNE_SPACE)}")
        if key not in TUNE_SPACE:
            raise ValueError(f"space: '{key}' is not a tunable training key; expected keys among "
                             f"{', '.join(TUNE_SPACE)}")
        ok = isinstance(bounds, (list, tuple)) and len(bounds) in (2, 3) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) and bounds[0] <= bounds[1]
        if not ok:
            raise ValueError(f"space: {key}={bounds!r}, expected (min, max) or (min, max, gain) numbers, min <= max")
    return {k: tuple(v) for k, v in space.items()}


def run_tuner(model, args: dict[str, Any], space: dict[str, tuple], iterations: int, callbacks: dict) -> Path:
    """Evolve `space` for `iterations` trainings of `model` with `args` (ems-yolo training settings, `project` and
    `name` giving the tune folder); every iteration's run goes inside the tune folder, which is returned
    (tune_results.ndjson, best_hyperparameters.yaml, weights/ of the best iteration, plots)."""
    tuner = Tuner(args={**args, "space": space}, model=model, _callbacks=callbacks)
    tuner.args.project = str(tuner.tune_dir)  # iterations' runs inside the tune folder, not beside it
    with compat.in_process_tuning(EMSTrainer):
        tuner(iterations=iterations)
    return tuner.tune_dir
