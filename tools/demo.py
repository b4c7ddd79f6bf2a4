"""`make demo`: the main job on the built-in data, offline, in a few CPU minutes.

Trains a reduced-width EMS-ResNet10 spiking detector on the generated shapes dataset, validates it, predicts on a
video of held-out shapes images (drawn like the training data, but never trained or validated on) and scores those
predictions against the images' own boxes, exports to ONNX and checks the export predicts the same, printing where
everything went and what the annotated video shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.data.shapes import CLASS_NAMES, held_out_image, make_shapes_dataset, write_held_out_video
from ems_yolo.engine.model import derive_model_yaml

FRAMES = 40  # held-out images in the prediction video (10 s at 4 fps)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def found(truth: np.ndarray, classes: np.ndarray, boxes: np.ndarray) -> int:
    """How many true objects (cls, x0, y0, x1, y1) have a predicted box of their class at IoU >= 0.5."""
    return sum(any(c == t[0] and iou(b, t[1:].astype(float)) >= 0.5 for c, b in zip(classes, boxes)) for t in truth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--project", default=str(Path.cwd() / "runs" / "demo"))
    args = p.parse_args()
    project = Path(args.project)
    project.mkdir(parents=True, exist_ok=True)

    data = make_shapes_dataset()
    cfg = load_model_yaml("ems-res10.yaml")
    cfg["width_multiple"] = args.width
    model = EMSYOLO(derive_model_yaml(cfg), time_steps=args.time_steps)
    print(f"\n== train: EMS-ResNet10 (width {args.width}, T={args.time_steps}) on the built-in data {data}")
    model.train(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=16, nbs=16, optimizer="AdamW", lr0=0.005,
        warmup_epochs=1, warmup_bias_lr=0.0, mosaic=0.0, scale=0.2, workers=2, seed=0,
        project=str(project), name="train", exist_ok=True,
    )
    best = Path(model.trainer.best)

    print("\n== val")
    metrics = EMSYOLO(best).val(data=str(data), imgsz=args.imgsz, project=str(project), name="val", exist_ok=True)

    print("\n== predict on held-out images")
    video = write_held_out_video(project / "held_out_shapes.avi", frames=FRAMES)
    n_found = n_true = n_boxes = 0
    results = EMSYOLO(best).predict(source=str(video), imgsz=args.imgsz, conf=0.25, stream=True, save=True,
                                    verbose=False, project=str(project), name="predict", exist_ok=True)
    for i, r in enumerate(results):
        truth = held_out_image(i)[1]
        classes, boxes = r.boxes.cls.numpy().astype(int), r.boxes.xyxy.numpy()
        n_found, n_true, n_boxes = n_found + found(truth, classes, boxes), n_true + len(truth), n_boxes + len(boxes)

    print("\n== export")
    onnx_file = EMSYOLO(best).export(format="onnx", imgsz=args.imgsz)
    image = str(sorted((data.parent / "images" / "val").glob("*.png"))[0])
    n_pt = len(EMSYOLO(best).predict(image, imgsz=args.imgsz, conf=0.1, verbose=False)[0].boxes)
    n_onnx = len(EMSYOLO(onnx_file).predict(image, imgsz=args.imgsz, conf=0.1, verbose=False)[0].boxes)

    print(f"""
== done
  weights      {best}
  results      {best.parents[1] / 'results.csv'} (plots beside it)
  val          mAP50 {metrics.box.map50:.3f}, mAP50-95 {metrics.box.map:.3f}  ({project / 'val'})
  predictions  {project / 'predict' / video.name}: {FRAMES} held-out images, {n_boxes} boxes labelled
               {', '.join(CLASS_NAMES)} with their confidence; {n_found} of the {n_true} objects found
               with the right class (IoU >= 0.5)
  ONNX         {onnx_file} (same image: {n_pt} boxes from PyTorch, {n_onnx} from ONNX Runtime)
""")


if __name__ == "__main__":
    main()
