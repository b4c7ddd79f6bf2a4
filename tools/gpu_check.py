"""The prepared GPU check (run through tools/gpu_check.sh): what only an accelerator can show, in one summary table.

1. the default LIF backend of the shipped models, and the Triton LIF against the torch LIF: identical spikes,
   input gradients within 1e-5, the time of each (forward + backward of a T=4 LIF on 16 M elements);
2. training smoke: EMS-ResNet10 (T=4, 320 px, batch 16) with AMP (float16 autocast + GradScaler) and
   channels_last, 20 optimizer steps on one batch of the built-in shapes data; the loss must fall;
3. torch.compile of the training model (a few AMP steps) and of the eval model (outputs against eager);
4. prediction through Ultralytics' predictor with its CUDA graph (`cuda_graph`), against eager;
5. the CUDA section of tools/bench_speed.py (training at the sizes users train at, LIF against SpikingJelly 2.0,
   batch-1 latency, the trainer's images/s); its summary rows, with their targets, end the table.

`--dry-run` runs the same code at toy sizes on the CPU (Triton through its interpreter when triton is installed,
no AMP; compile and CUDA graphs skipped), which is how the script is tested without a GPU.

    python tools/gpu_check.py [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_smoke(device: str, dry: bool) -> tuple[bool, str]:
    """Loss of 20 steps on one batch with AMP and channels_last (CUDA), or of 10 in float32 (CPU dry run)."""
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

    size, batch, steps, T = (64, 4, 10, 2) if dry else (320, 16, 20, 4)
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


def default_backend(device: str) -> tuple[bool | None, str]:
    """The LIF backend of the shipped model YAMLs and whether the Triton kernels serve it on this device."""
    import importlib.util
    import inspect

    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.nn.neuron import LIF

    default = inspect.signature(LIF).parameters["backend"].default
    shipped = load_model_yaml("ems-res10.yaml").get("neuron", {}).get("backend", default)
    triton = importlib.util.find_spec("triton") is not None
    fast = shipped in ("auto", "triton") and triton
    detail = f"ems-res10.yaml LIF backend '{shipped}', triton {'installed' if triton else 'missing'}"
    if device == "cpu":
        return None, detail + " (CPU: the torch path)"
    return fast, detail + ("" if fast else ": the default is not the fast path on CUDA")


def compile_check(device: str, dry: bool) -> tuple[bool | None, str]:
    """torch.compile of EMS-ResNet10 for training (AMP steps) and eval (outputs against eager)."""
    if dry:
        return None, "skipped in the dry run (compile=True is tested on the CPU by the test suite)"
    import torch

    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.nn.model import EMSDetectionModel

    torch.manual_seed(0)
    cfg = load_model_yaml("ems-res10.yaml")
    model = EMSDetectionModel(cfg, time_steps=4, verbose=False).to(device)
    x = torch.rand(16, 3, 320, 320, device=device)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")

    def step(m) -> float:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(r.float().square().mean() for r in m(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss)

    start = time.perf_counter()
    losses = [step(compiled) for _ in range(3)]
    first = time.perf_counter() - start
    times = {}
    for name, m in (("compiled", compiled), ("eager", model)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step(m)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / 5
    model.eval()
    with torch.inference_mode():
        eager_out = model(x[:1])[0]
        diff = float((torch.compile(model)(x[:1])[0] - eager_out).abs().max())
    ok = all(map(math.isfinite, losses)) and diff < 1e-3
    return ok, (f"train: first 3 steps {first:.0f} s, then {16 / times['compiled']:.0f} img/s compiled vs "
                f"{16 / times['eager']:.0f} eager (320 px T=4 b16 AMP); eval: max |compiled - eager| {diff:.1e}")


def cuda_graph_predict(device: str, dry: bool) -> tuple[bool | None, str]:
    """EMSYOLO.predict on 6 frames of one shape with cuda_graph on (the default) and off: the same boxes (within
    1e-3 px), one graph."""
    if dry:
        return None, "needs CUDA (the capture / replay logic is tested on the CPU: tests/test_cuda_graph.py)"
    import numpy as np
    import torch

    from ems_yolo.engine.model import EMSYOLO

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(6)]
    model = EMSYOLO("ems-res34.yaml", nc=80)
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"imgsz": 640, "conf": 0.001, "save": False, "verbose": False, "device": 0, "project": tmp}
        eager = [model.predict(f, cuda_graph=False, **kw)[0] for f in frames]
        graphed = [model.predict(f, **kw)[0] for f in frames]
    graphs = len(getattr(model.predictor.graphed, "graphs", {}))
    same = all(a.boxes.data.shape == b.boxes.data.shape and torch.allclose(a.boxes.data, b.boxes.data, atol=1e-3)
               for a, b in zip(eager, graphed))
    ms = {k: np.median([r.speed["inference"] for r in rs[2:]]) for k, rs in (("eager", eager), ("graph", graphed))}
    return same and graphs == 1, (f"EMS-ResNet34 640x480 frames: {graphs} graph(s), boxes "
                                  f"{'the same' if same else 'DIFFER'}; inference {ms['eager']:.1f} ms eager, "
                                  f"{ms['graph']:.1f} ms graph (Ultralytics' timing, fp32)")


def bench_speed(dry: bool, rows_out: list) -> tuple[bool, str]:
    """The CUDA section of tools/bench_speed.py (at toy sizes on the CPU in the dry run); its summary rows are
    added to the final table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, str(ROOT / "tools" / "bench_speed.py"), "--cuda-only", "--json", str(out),
               *(["--cuda-toy"] if dry else [])]
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(run.stdout, run.stderr[-3000:] if run.returncode else "", sep="")
        if out.is_file():
            rows_out += json.loads(out.read_text())
    return run.returncode == 0, f"{' '.join(Path(c).name for c in cmd[1:] if c != str(out))}: exit {run.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (no GPU needed)")
    args = parser.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU
    import torch

    import ems_yolo

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    bench_rows: list[dict] = []
    checks = [("default LIF backend", lambda: default_backend(device)),
              ("Triton LIF vs torch", lambda: triton_vs_torch(device, args.dry_run)),
              ("training smoke", lambda: training_smoke(device, args.dry_run)),
              ("torch.compile", lambda: compile_check(device, args.dry_run)),
              ("CUDA graph predict", lambda: cuda_graph_predict(device, args.dry_run)),
              ("bench_speed CUDA", lambda: bench_speed(args.dry_run, bench_rows))]
    rows = []
    for title, check in checks:
        start = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as e:  # one failed check must not hide the others' results
            ok, detail = False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        rows.append((title, {True: "ok", False: "FAIL", None: "skip"}[ok], detail, time.perf_counter() - start))
    print(f"\ngpu_check on {name}, torch {torch.__version__}, ems_yolo from {Path(ems_yolo.__file__).parent}")
    print(f"{'check':<22} {'result':<6} {'s':>6}  detail")
    for title, result, detail, seconds in rows:
        print(f"{title:<22} {result:<6} {seconds:6.1f}  {detail}")
    for r in bench_rows:
        value = f"{r['value']:.1%}" if r["percent"] else f"{r['value']:.2f}{r['unit']}"
        target = f" (target {r['target']}: {r['status']})" if r["target"] else ""
        print(f"{'  bench':<22} {'':<6} {'':>6}  {r['measure']}: {value}{target}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
