"""Does the spiking model learn? Train EMS-Res10, its ANN twin and a tiny SpikeYOLO with the same budget on the
built-in data.

The ANN twin is the same YAML with LIF replaced by ReLU and T = 1. SpikeYOLO is `--spikeyolo` (default
spikeyolo-tiny.yaml: I-LIF with integer spikes 0..4 at its YAML's T = 1, anchor-free head, Ultralytics' v8 loss).
All runs use the same data, seed, epochs, image size, optimiser and batch; the script prints mAP50-95 and mAP50 of
each and the SNN/ANN ratio (target: SNN >= 0.8 x ANN).

    python tools/bench_learning.py --epochs 30 --width 0.5 --time-steps 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

from ems_yolo import EMSYOLO
from ems_yolo.cfg import load_model_yaml
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.model import derive_model_yaml
from ems_yolo.nn.model import ann_twin


def train(cfg: dict, data: str, args: argparse.Namespace, name: str, project: str) -> tuple[float, float, float]:
    """Train one model and return (mAP50-95, mAP50, seconds)."""
    t = time.time()
    metrics = EMSYOLO(str(derive_model_yaml(cfg))).train(
        data=data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, optimizer=args.optimizer, lr0=args.lr0,
        warmup_epochs=1, warmup_bias_lr=0.0, nbs=args.batch, mosaic=args.mosaic, seed=args.seed, workers=2,
        plots=False, verbose=False,
        project=project, name=name,
    )
    return metrics.box.map, metrics.box.map50, time.time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ems-res10.yaml")
    p.add_argument("--spikeyolo", default="spikeyolo-tiny.yaml", help="SpikeYOLO YAML trained as a third row")
    p.add_argument("--width", type=float, default=0.5, help="width_multiple (reduced width allowed)")
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--lr0", type=float, default=0.002)
    p.add_argument("--mosaic", type=float, default=0.0)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    data = str(make_shapes_dataset(n_train=args.n_train, n_val=args.n_val, imgsz=160, seed=args.seed))
    snn = load_model_yaml(args.model)
    snn.update(width_multiple=args.width, time_steps=args.time_steps)
    project = tempfile.mkdtemp(prefix="bench-learning-")
    results = {
        "SNN": train(snn, data, args, "snn", project),
        "ANN": train(ann_twin(snn), data, args, "ann", project),
        "SpikeYOLO": train(load_model_yaml(args.spikeyolo), data, args, "spikeyolo", project),
    }
    print(f"\n{args.model} width {args.width}, T={args.time_steps} (ANN twin: ReLU, T=1); {args.epochs} epochs, "
          f"imgsz {args.imgsz}, {args.optimizer} lr0 {args.lr0}, built-in shapes {args.n_train}/{args.n_val}; "
          f"runs in {project}; SpikeYOLO: {args.spikeyolo} as its YAML is")
    print(f"{'model':<10}{'mAP50-95':>10}{'mAP50':>10}{'train s':>10}")
    for name, (m, m50, sec) in results.items():
        print(f"{name:<10}{m:>10.4f}{m50:>10.4f}{sec:>10.0f}")
    (s, s50, _), (a, a50, _) = results["SNN"], results["ANN"]
    print(f"ratio SNN/ANN: mAP50-95 {s / max(a, 1e-9):.2f}, mAP50 {s50 / max(a50, 1e-9):.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
