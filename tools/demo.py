"""`make demo`: the main job on the built-in data, offline, in a few CPU minutes.

Trains a reduced-width EMS-ResNet10 spiking detector on the generated shapes dataset, validates it, predicts on
the pedestrian video of ../shared/data (or on a clip made from the validation images when it is absent), exports
to ONNX and checks the export predicts the same, printing where everything went.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.model import derive_model_yaml

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT.parent / "shared" / "data" / "videos" / "pedestrians.avi"


def clip_from_images(images: list[Path], out: Path, fps: int = 10) -> Path:
    """Write the given images as a short video (the fallback source when the pedestrian video is absent)."""
    first = cv2.imread(str(images[0]))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, first.shape[1::-1])
    for p in images:
        writer.write(cv2.imread(str(p)))
    writer.release()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--project", default=str(Path.cwd() / "runs" / "demo"))
    args = p.parse_args()

    data = make_shapes_dataset()
    cfg = load_model_yaml("ems-res10.yaml")
    cfg["width_multiple"] = args.width
    model = EMSYOLO(derive_model_yaml(cfg), time_steps=args.time_steps)
    print(f"\n== train: EMS-ResNet10 (width {args.width}, T={args.time_steps}) on the built-in data {data}")
    model.train(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=16, nbs=16, optimizer="AdamW", lr0=0.005,
        warmup_epochs=1, warmup_bias_lr=0.0, mosaic=0.0, scale=0.2, workers=2, seed=0,
        project=args.project, name="train", exist_ok=True,
    )
    best = Path(model.trainer.best)

    print("\n== val")
    metrics = EMSYOLO(best).val(data=str(data), imgsz=args.imgsz, project=args.project, name="val", exist_ok=True)

    print("\n== predict")
    source = VIDEO if VIDEO.is_file() else clip_from_images(
        sorted((data.parent / "images" / "val").glob("*.png")), Path(args.project) / "shapes_clip.avi"
    )
    for _ in EMSYOLO(best).predict(source=str(source), imgsz=320, conf=0.25, stream=True, save=True, verbose=False,
                                   project=args.project, name="predict", exist_ok=True):
        pass

    print("\n== export")
    onnx_file = EMSYOLO(best).export(format="onnx", imgsz=args.imgsz)
    image = str(sorted((data.parent / "images" / "val").glob("*.png"))[0])
    n_pt = len(EMSYOLO(best).predict(image, imgsz=args.imgsz, conf=0.1, verbose=False)[0].boxes)
    n_onnx = len(EMSYOLO(onnx_file).predict(image, imgsz=args.imgsz, conf=0.1, verbose=False)[0].boxes)

    print(f"""
== done
  weights      {best}
  results      {best.parents[1] / 'results.csv'} (plots beside it)
  val          mAP50 {metrics.box.map50:.3f}, mAP50-95 {metrics.box.map:.3f}  ({Path(args.project) / 'val'})
  predictions  {Path(args.project) / 'predict'} (annotated video of {source.name})
  ONNX         {onnx_file} (same image: {n_pt} boxes from PyTorch, {n_onnx} from ONNX Runtime)
""")


if __name__ == "__main__":
    main()
