"""`make demo`: build the paper's EMS-ResNet10 from its YAML and run it on the built-in shapes data."""

from __future__ import annotations

import cv2
import torch

import ems_yolo  # noqa: F401
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.nn import EMSDetectionModel


def main() -> None:
    data_yaml = make_shapes_dataset(n_train=32, n_val=8, imgsz=160)
    print(f"built-in data: {data_yaml}")
    model = EMSDetectionModel("ems-res10.yaml", nc=5, time_steps=4, verbose=True)
    model.info(imgsz=320)
    image = cv2.imread(str(data_yaml.parent / "images" / "val" / "000000.png"))
    x = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y, raw = model.eval()(x)
    print(f"input {list(x.shape)} -> detections tensor {list(y.shape)} (B, 4 + nc, anchors), levels "
          f"{[list(r.shape) for r in raw]}")


if __name__ == "__main__":
    main()
