"""The prepared GPU check (run through tools/gpu_check.sh): what only an accelerator can show, in one summary table.

1. training smoke: EMS-ResNet10 (T=4, 320 px, batch 16) with AMP (float16 autocast + GradScaler) and channels_last,
   20 optimizer steps on one batch of the built-in shapes data; the loss must fall;
2. the Triton LIF backend against the torch backend: identical spikes, input gradients within 1e-5, the time of
   each (forward + backward of a T=4 LIF on 16 M elements);
3. tools/bench_speed.py on CUDA (`--quick` unless --full).

`--dry-run` runs the same code at toy sizes on the CPU (Triton through its interpreter when triton is installed,
no AMP, no benchmark), which is how the script is tested without a GPU.

    python tools/gpu_check.py [--dry-run] [--full]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_smoke(device: str, dry: bool) -> tuple[bool, str]:
    """Loss of 20 steps on one batch with AMP and channels_last (CUDA), or in float32 (CPU dry run)."""
    import numpy as np
    import torch

    import cv2
    import yaml

    from ems_yolo import ultralytics_compat  # noqa: F401  (first: offline environment before Ultralytics loads)
    from ultralytics.cfg import get_cfg
    from ultralytics.data.utils import img2label_paths

    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.data.shapes import make_shapes_dataset
    from ems_yolo.nn.model import EMSDetectionModel

    size, batch, steps, T = (64, 4, 20, 2) if dry else (320, 16, 20, 4)
    cfg = load_model_yaml("ems-res10.yaml")
    if dry:
        cfg["width_multiple"] = 0.25
    data = yaml.safe_load(Path(make_shapes_dataset()).read_text())
    images = sorted((Path(data["path"]) / data["train"]).glob("*.*"))[:batch]
    imgs, cls, boxes, index = [], [], [], []
    for i, (path, label) in enumerate(zip(images, map(Path, img2label_paths([str(p) for p in images])))):
        imgs.append(cv2.resize(cv2.imread(str(path)), (size, size))[:, :, ::-1].transpose(2, 0, 1))
        rows = np.loadtxt(label, ndmin=2) if label.is_file() and label.stat().st_size else np.zeros((0, 5))
        cls.append(rows[:, :1])
        boxes.append(rows[:, 1:])
        index.append(np.full(len(rows), i))
    model = EMSDetectionModel(cfg, nc=len(data["names"]), time_steps=T, verbose=False).to(device)
    model.args = get_cfg()  # the loss gains
    amp = device != "cpu"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs))).to(device).float() / 255
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    batch_dict = {"img": x, "cls": torch.from_numpy(np.concatenate(cls)).float().to(device),
                  "bboxes": torch.from_numpy(np.concatenate(boxes)).float().to(device),
                  "batch_idx": torch.from_numpy(np.concatenate(index)).float().to(device)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda" if amp else "cpu", enabled=amp):
            loss, _ = model.loss(batch_dict)
        scaler.scale(loss.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(float(loss.sum().detach()))
    seconds = time.perf_counter() - start
    ok = all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    return ok, (f"{size}px T={T} batch {batch}, {'AMP + channels_last' if amp else 'float32'}: loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps, {steps * batch / seconds:.1f} img/s")


def triton_vs_torch(device: str, dry: bool) -> tuple[bool | None, str]:
    """The Triton LIF against the torch LIF: spikes, gradients, time."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton not installed: skipped"
    import torch

    from ems_yolo.nn.ops import runtime
    from ems_yolo.nn.neuron import LIF

    T, n = (2, 4096) if dry else (4, 4 * 1024 * 1024)
    torch.manual_seed(0)
    x = (torch.randn(T * 4, n // 4, device=device) * 0.6 + 0.4).reshape(T * 4, -1, 4)
    if not runtime.usable(x.view(T, -1, *x.shape[1:])):
        return None, f"the Triton backend does not take this tensor on {device}: skipped"
    results, times = [], {}
    for backend in ("triton", "torch"):
        lif = LIF(T, backend=backend).train()
        xi = x.clone().requires_grad_()
        spikes = lif(xi)
        spikes.backward(torch.ones_like(spikes))
        results.append((spikes.detach(), xi.grad))
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(1 if dry else 20):
            xi.grad = None
            lif(xi).backward(torch.ones_like(spikes))
        if device != "cpu":
            torch.cuda.synchronize()
        times[backend] = (time.perf_counter() - start) / (1 if dry else 20) * 1e3
    (s1, g1), (s2, g2) = results
    same = torch.equal(s1, s2)
    grad_err = float((g1 - g2).abs().max())
    ok = same and grad_err <= 1e-5
    return ok, (f"T={T}, {x.numel():,} elements: spikes {'identical' if same else 'DIFFER'}, max grad "
                f"difference {grad_err:.1e}; forward+backward triton {times['triton']:.2f} ms, torch "
                f"{times['torch']:.2f} ms ({times['torch'] / times['triton']:.2f}x)")


def bench_speed(full: bool) -> tuple[bool, str]:
    """tools/bench_speed.py on this machine (it benchmarks CUDA under AMP when a GPU is present)."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_speed.py"), *([] if full else ["--quick"])]
    run = subprocess.run(cmd, capture_output=True, text=True)
    print(run.stdout, run.stderr[-2000:] if run.returncode else "", sep="")
    return run.returncode == 0, f"{' '.join(Path(c).name for c in cmd[1:])}: exit {run.returncode} (tables above)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (no GPU needed)")
    parser.add_argument("--full", action="store_true", help="the full bench_speed.py run instead of --quick")
    args = parser.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    checks = [("training smoke", lambda: training_smoke(device, args.dry_run)),
              ("Triton LIF vs torch", lambda: triton_vs_torch(device, args.dry_run))]
    if not args.dry_run:
        checks.append(("bench_speed on CUDA", lambda: bench_speed(args.full)))
    rows = []
    for title, check in checks:
        start = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as e:  # one failed check must not hide the others' results
            ok, detail = False, f"{type(e).__name__}: {e}"
        rows.append((title, {True: "ok", False: "FAIL", None: "skip"}[ok], detail, time.perf_counter() - start))
    print(f"\ngpu_check on {name}, torch {torch.__version__}")
    print(f"{'check':<22} {'result':<6} {'s':>6}  detail")
    for title, result, detail, seconds in rows:
        print(f"{title:<22} {result:<6} {seconds:6.1f}  {detail}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
