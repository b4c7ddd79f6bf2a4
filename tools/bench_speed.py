"""Speed and memory of our time-folded EMS-YOLO against the naive per-step reference of the original code.

Our model runs every stateless layer once on `[T*B, C, H, W]` and loops over T only inside the LIF; the reference
(tools/naive_reference.py, same parameters, same outputs) loops over T around every layer with zero-filled buffers,
as the original EMS-YOLO code does. Measurements alternate ours / naive within one run after warm-up and report
medians (with min..max), for EMS-ResNet10 at 320 px:

* training throughput (forward + backward + SGD step, images/s) for each T,
* peak training memory,
* inference latency per frame at T=4 (eager ours / naive, and ONNX Runtime for ours),
* the LIF alone (forward + backward) on a large tensor, ours against a per-step LIF,
* our training FLOP/s as a fraction of the machine's measured dense matmul FLOP/s.

CPU memory is read from /proc/self/status (Linux), with glibc's mmap threshold fixed so that it follows live tensor
memory.

With CUDA available, a CUDA section follows (fp16 AMP, the sizes users train at; see `cuda_section`): training
images/s and peak memory of ours (default settings) against the naive reference for EMS-ResNet10 320 px T=5 batch
32, EMS-ResNet34 640 px T=4 batch 16 and the COCO model (ems-res34-coco.yaml) 640 px T=4 batch 16; the LIF alone
against SpikingJelly 2.0's `functional.lif_multi_step` (the `bench-gpu` extra; skipped with a line when missing);
batch-1 latency with and without a CUDA graph; the Ultralytics trainer's images/s on the built-in data at 640 px,
batch 64. The summary gives each ratio with its target.

    python tools/bench_speed.py               # full run (about 2-3 minutes on 2 CPU cores, plus CUDA if present)
    python tools/bench_speed.py --quick       # smoke run (about 30 s on 2 CPU cores)
    python tools/bench_speed.py --cuda-only   # the CUDA section alone (tools/gpu_check.sh runs this)
"""

from __future__ import annotations

import torch  # first: Ultralytics sets OMP_NUM_THREADS=1 on import when it is unset

DEFAULT_THREADS = torch.get_num_threads()

import argparse
import copy
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn.flops import conv_ops
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import EncodingConv
from ems_yolo.nn import layers
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.neuron import LIF

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_reference import NaiveEMS, naive_lif

MODEL = "ems-res10.yaml"
IMPLS = ("ours", "naive")
CPU = torch.device("cpu")  # the device of the CPU section (the CUDA section has functions of its own)


@dataclass
class Settings:
    """Sizes and repetition counts of one run."""

    time_steps: list[int]
    memory_time_steps: list[int]
    width: float
    batch: int
    imgsz: int
    infer_time_steps: int
    warmup: int
    train_iters: int
    infer_warmup: int
    infer_iters: int
    lif_iters: int
    lif_batch: int
    matmul_size: int
    compile: bool = False


@dataclass
class Result:
    """One line of the final summary: a measured ratio and, for the stated targets, its limit."""

    measure: str
    value: float
    limit: float | None = None
    at_least: bool = False  # the target is value >= limit (else value <= limit)
    percent: bool = False
    unit: str = ""  # printed after the value (img/s, ms); ratios have none

    def status(self) -> str:
        """'met', 'NOT met' or '-' when there is no target."""
        if self.limit is None:
            return "-"
        return "met" if (self.value >= self.limit if self.at_least else self.value <= self.limit) else "NOT met"


# ----------------------------------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    fns: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each function `iters` times in alternation (a, b, a, b, ...) after `warmup` calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def med(ts: list[float]) -> float:
    """Median of a list of timings."""
    return statistics.median(ts)


def spread(ts: list[float], scale: float = 1.0, unit: str = "s") -> str:
    """`median (min..max)` of timings, multiplied by `scale`."""
    return f"{med(ts) * scale:.3f} {unit} ({min(ts) * scale:.3f}..{max(ts) * scale:.3f})"


def model_cfg(time_steps: int, width: float) -> dict:
    """EMS-ResNet10 config at the given T and width."""
    cfg = load_model_yaml(MODEL)
    cfg.update(time_steps=time_steps, width_multiple=width)
    return cfg


def build(impl: str, time_steps: int, width: float) -> nn.Module:
    """Our model on the CPU ("ours"; "ckpt" with activation checkpointing) or the naive reference around a fresh
    copy of it (same initialisation for a given seed)."""
    torch.manual_seed(0)
    cfg = model_cfg(time_steps, width)
    cfg["checkpoint"] = impl == "ckpt"
    model = EMSDetectionModel(cfg, verbose=False)
    return NaiveEMS(model) if impl == "naive" else model


def make_train_step(model: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    """One SGD training step (forward, synthetic loss on the raw outputs, backward, step) as a closure."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.937, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()

    def step() -> None:
        with autocast:
            loss = sum(r.float().square().mean() for r in model(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a left-aligned first column and right-aligned value columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = (str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  " + "  ".join(cells))


# -------------------------------------------------------------------------------------------------- benchmarks


def bench_training(s: Settings) -> dict[int, dict[str, list[float]]]:
    """Step times per T for ours and naive, and a dense matmul, measured in alternation (same machine state)."""
    n = s.matmul_size
    print(f"\nTraining throughput: EMS-ResNet10 width {s.width}, batch {s.batch}, {s.imgsz} px, SGD step, "
          f"synthetic loss; {s.warmup} warm-up + {s.train_iters} alternating steps each, with a {n}^3 "
          "float32 torch.mm in every round for the FLOP/s reference", flush=True)
    x = torch.rand(s.batch, 3, s.imgsz, s.imgsz)
    a, b = (torch.randn(n, n) for _ in range(2))
    results, rows = {}, []
    for T in s.time_steps:
        fns = {impl: make_train_step(build(impl, T, s.width), x, amp=False) for impl in IMPLS}
        fns["matmul"] = lambda: torch.mm(a, b)
        results[T] = times = alternate(fns, s.warmup, s.train_iters, CPU)
        rate = {k: s.batch / med(times[k]) for k in IMPLS}
        rows.append([f"T={T}", f"{rate['ours']:.2f}", f"{rate['naive']:.2f}", f"{rate['ours'] / rate['naive']:.2f}x",
                     spread(times["ours"]), spread(times["naive"])])
        del fns
    print_table(["", "ours img/s", "naive img/s", "ours/naive", "ours step", "naive step"], rows)
    return results


def rss_mib(key: str) -> float:
    """`VmRSS` (current) or `VmHWM` (peak) resident set size of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**10
    raise KeyError(key)


def memory_probe(impl: str, time_steps: int, s: Settings) -> None:
    """Child process: print the peak RSS growth (MiB) of building a model and running two training steps."""
    x = torch.rand(s.batch, 3, s.imgsz, s.imgsz)
    before = rss_mib("VmRSS")
    step = make_train_step(build(impl, time_steps, s.width), x, amp=False)
    step()
    step()
    print(json.dumps({"peak_mib": rss_mib("VmHWM") - before}))


LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}  # glibc: every block >= 64 KiB is mmap'ed, freed at once


def memory_run(impl: str, time_steps: int, argv: list[str], env: dict[str, str]) -> float:
    """Peak RSS growth (MiB) of one fresh `--memory-probe` subprocess."""
    cmd = [sys.executable, __file__, *argv, "--memory-probe", impl, str(time_steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def bench_memory_cpu(s: Settings, argv: list[str]) -> dict[int, dict[str, float]]:
    """Peak training memory per T, one fresh subprocess per configuration (ours and naive in alternation).

    Measured with glibc's mmap threshold fixed at 64 KiB, so that every tensor buffer is returned to the OS when
    freed and the peak RSS follows the peak of live memory (what torch.cuda.max_memory_allocated reports on a GPU).
    Under the default dynamic threshold freed buffers stay in the heap and the peak also holds allocator slack that
    depends on the order of frees; that figure is printed for the largest T too.
    """
    print("\nPeak training memory (CPU): peak resident set size (VmHWM) of a fresh subprocess per configuration "
          "minus its resident size before the model is built, over model build + 2 training steps (weights, "
          "grads, SGD momentum, activations); glibc mmap threshold fixed at 64 KiB so that freed tensors leave the "
          "process at once", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(DEFAULT_THREADS)}
    results, rows = {}, []
    impls = (*IMPLS, "ckpt")
    for i, T in enumerate(s.memory_time_steps):
        results[T] = {}
        for impl in impls if i % 2 == 0 else impls[::-1]:
            results[T][impl] = memory_run(impl, T, argv, {**env, **LIVE_MALLOC})
        ours, naive, ckpt = results[T]["ours"], results[T]["naive"], results[T]["ckpt"]
        rows.append([f"T={T}", f"{ours:.0f}", f"{naive:.0f}", f"{ours / naive:.2f}x", f"{ckpt:.0f}",
                     f"{ckpt / naive:.2f}x"])
    print_table(["", "ours MiB", "naive MiB", "ours/naive", "ours+checkpoint MiB", "ckpt/naive"], rows)
    T = s.memory_time_steps[-1]
    default = {impl: memory_run(impl, T, argv, env) for impl in IMPLS}
    print(f"  with glibc's default (dynamic) mmap threshold, T={T}: ours {default['ours']:.0f} MiB, naive "
          f"{default['naive']:.0f} MiB, ours/naive {default['ours'] / default['naive']:.2f}x")
    return results


def export_onnx(model: EMSDetectionModel, x: torch.Tensor, path: str) -> None:
    """Export the eval model (decoded output only) with the TorchScript-based exporter, opset 18."""
    m = copy.deepcopy(model).cpu().eval()
    m.model[-1].export = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x.cpu(),), path, dynamo=False, opset_version=18, input_names=["images"],
                          output_names=["output0"])


def onnx_runner(model: EMSDetectionModel, x: torch.Tensor) -> Callable[[], object] | None:
    """An ONNX Runtime CPU session of `model` as a closure on `x`, or None when ONNX Runtime has no CPU provider.

    Intra-op spinning is disabled: spinning ORT threads would otherwise steal the cores from the eager runs that
    follow in the alternation.
    """
    import onnxruntime as ort

    provider = "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        print(f"  ONNX Runtime: {provider} not available, skipped")
        return None
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = DEFAULT_THREADS
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ems-res10.onnx")
        export_onnx(model, x, path)
        session = ort.InferenceSession(path, opts, providers=[provider])
    feed = {"images": x.cpu().numpy()}
    with torch.inference_mode():
        eager = model(x)[0].float().cpu()
    diff = (torch.from_numpy(session.run(None, feed)[0]) - eager).abs().max().item()
    print(f"  ONNX Runtime {ort.__version__} ({provider}, no spinning): max |ORT - eager| on the decoded output "
          f"= {diff:.2e}")
    return lambda: session.run(None, feed)


def bench_inference(s: Settings) -> dict[str, list[float]]:
    """Per-frame latency (batch 1) of ours, naive and, when possible, ONNX Runtime running ours."""
    T = s.infer_time_steps
    print(f"\nInference latency per frame: batch 1, {s.imgsz} px, T={T}, eval mode; {s.infer_warmup} warm-up + "
          f"{s.infer_iters} alternating runs each", flush=True)
    x = torch.rand(1, 3, s.imgsz, s.imgsz)
    models = {impl: build(impl, T, s.width).eval() for impl in IMPLS}

    def eager(m: nn.Module, cast: object = nullcontext()) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), cast:
                return m(x)

        return run

    fns = {impl: eager(m) for impl, m in models.items()}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # information, not a target
        for impl, m in models.items():
            fns[f"{impl}+bf16"] = eager(m, torch.autocast("cpu", dtype=torch.bfloat16))
    if s.compile:  # torch.compile of our eval model; compiled once here, outside the timed runs
        t0 = time.perf_counter()
        fns["ours+compile"] = eager(torch.compile(models["ours"]))
        fns["ours+compile"]()
        print(f"  torch.compile: first call (compilation) took {time.perf_counter() - t0:.0f} s", flush=True)
    ort_run = onnx_runner(models["ours"], x)
    if ort_run is not None:
        fns["onnxruntime"] = ort_run
    times = alternate(fns, s.infer_warmup, s.infer_iters, CPU)
    print_table(["", "latency per frame"], [[k, spread(v, 1e3, "ms")] for k, v in times.items()])
    print(f"  naive/ours: {med(times['naive']) / med(times['ours']):.2f}x"
          + (f", ours eager/ONNX Runtime: {med(times['ours']) / med(times['onnxruntime']):.2f}x"
             if "onnxruntime" in times else ""))
    if "ours+bf16" in times:
        print(f"  bfloat16 autocast (this CPU has native bf16; spikes may differ from float32 near the threshold): "
              f"naive/ours {med(times['naive+bf16']) / med(times['ours+bf16']):.2f}x, ours float32/bf16 "
              f"{med(times['ours']) / med(times['ours+bf16']):.2f}x")
    return times


def bench_lif(s: Settings) -> dict[str, list[float]]:
    """LIF forward + backward on `[T*B, 64, 80, 80]`: ours (fused node over time-folded views) vs the per-step
    original."""
    T = 4
    shape = (T * s.lif_batch, 64, 80, 80)
    print(f"\nLIF alone: forward + backward (surrogate), T={T}, input {list(shape)} float32; {s.warmup} warm-up + "
          f"{s.lif_iters} alternating runs each", flush=True)
    lif = LIF(T).train()
    x = (torch.randn(shape) * 0.5 + 0.3).requires_grad_()
    g = torch.randn(shape)

    def ours() -> None:
        torch.autograd.grad(lif(x), x, g)

    def naive() -> None:
        torch.autograd.grad(naive_lif(lif, x.view(T, -1, *shape[1:])), x, g.view(T, -1, *shape[1:]))

    times = alternate({"ours": ours, "naive": naive}, s.warmup, s.lif_iters, CPU)
    print_table(["", "fwd+bwd"], [[k, spread(v, 1e3, "ms")] for k, v in times.items()])
    print(f"  naive/ours: {med(times['naive']) / med(times['ours']):.2f}x")
    return times


def report_flops(s: Settings, train: dict[int, dict[str, list[float]]]) -> float:
    """Executed training FLOP/s (3 x forward, forward = 2 x conv MACs per image) over the matmul FLOP/s of the same
    rounds; returns our fraction at the largest T.

    The naive reference runs every conv T times. Ours runs the frame encoding conv once (its input is the same at
    every step) and the head convs once (on the mean over T), so it executes fewer FLOPs for the same model.
    """
    model = build("ours", 1, s.width)
    once = {id(c) for m in model.modules() if isinstance(m, (EncodingConv, EMSDetect)) for c in m.modules()}
    ops = conv_ops(model, s.imgsz)
    macs_once = sum(op.macs for op in ops if id(op.conv) in once)
    macs_step = sum(op.macs for op in ops)
    print(f"\nAchieved FLOP/s: model {2 * macs_step / 1e9:.3f} GFLOPs per image per step (2 x conv MACs from "
          f"layer shapes; {2 * macs_once / 1e9:.3f} of them in the encoding and head convs, which ours runs once "
          f"per image instead of T times), training = 3 x forward; reference: {s.matmul_size}^3 "
          "float32 torch.mm timed in the same rounds", flush=True)
    rows, fraction = [], 0.0
    for T, times in train.items():
        peak = 2 * s.matmul_size**3 / med(times["matmul"])
        naive_flops = 3 * 2 * macs_step * T * s.batch
        ours_flops = 3 * 2 * ((macs_step - macs_once) * T + macs_once) * s.batch
        ours, naive = ours_flops / med(times["ours"]), naive_flops / med(times["naive"])
        fraction = ours / peak
        rows.append([f"T={T}", f"{peak / 1e9:.1f}", f"{ours / 1e9:.1f}", f"{fraction:.1%}", f"{naive / 1e9:.1f}",
                     f"{naive / peak:.1%}"])
    print_table(["", "matmul GFLOP/s", "ours GFLOP/s", "ours/matmul", "naive GFLOP/s", "naive/matmul"], rows)
    return fraction


def run_section(s: Settings, argv: list[str]) -> list[Result]:
    """All benchmarks of the CPU section (float32); returns the summary lines."""
    train = bench_training(s)
    memory = bench_memory_cpu(s, argv)
    infer = bench_inference(s)
    lif = bench_lif(s)
    fraction = report_flops(s, train)
    tt, tm = s.time_steps[-1], s.memory_time_steps[-1]
    results = [
        Result(f"training throughput ours/naive, T={tt}", med(train[tt]["naive"]) / med(train[tt]["ours"]), 2.5, True),
        Result(f"peak training memory ours/naive, T={tm}", memory[tm]["ours"] / memory[tm]["naive"], 0.5),
        *([Result(f"peak training memory ours+checkpoint/naive, T={tm}", memory[tm]["ckpt"] / memory[tm]["naive"], 0.5)]
          if "ckpt" in memory[tm] else []),
        Result(f"inference latency ours/naive, T={s.infer_time_steps}", med(infer["ours"]) / med(infer["naive"]),
               0.33),
    ]
    if "onnxruntime" in infer:
        results.append(Result("inference latency ONNX Runtime/eager (ours)",
                              med(infer["onnxruntime"]) / med(infer["ours"]), 1.0))
    if "ours+compile" in infer:
        results.append(Result("inference latency torch.compile/eager (ours)",
                              med(infer["ours+compile"]) / med(infer["ours"])))
    results += [
        Result("LIF alone fwd+bwd time ours/naive", med(lif["ours"]) / med(lif["naive"])),
        Result(f"training FLOP/s / matmul FLOP/s (ours, T={tt})", fraction, percent=True),
    ]
    return results


# ------------------------------------------------------------------------------- CUDA: the sizes users train at


@dataclass
class TrainConfig:
    """One training configuration of the CUDA section."""

    name: str
    yaml: str
    imgsz: int
    time_steps: int
    batch: int
    nc: int = 80
    naive: bool = True  # the naive reference has no per-step form of the COCO model's SiLU convs
    target: float | None = None  # images/s with the default settings (issue 23)


CUDA_TRAIN = [
    TrainConfig("EMS-ResNet10 320px T=5 b32", "ems-res10.yaml", 320, 5, 32, nc=2, target=2000),
    TrainConfig("EMS-ResNet34 640px T=4 b16", "ems-res34.yaml", 640, 4, 16),
    TrainConfig("COCO model 640px T=4 b16", "ems-res34-coco.yaml", 640, 4, 16, naive=False, target=400),
]
LATENCY = [("EMS-ResNet34 640px T=4", "ems-res34.yaml", 640, 4, 5.0), ("EMS-ResNet10 320px T=5", "ems-res10.yaml",
                                                                       320, 5, None)]
LIF_TARGET = 3.0  # SpikingJelly 2.0 time / ours, LIF forward + backward
MEMORY_TARGET = 0.25  # peak training memory ours / naive
SJ_DYNAMICS = {"tau": 4 / 3, "decay_input": False, "v_threshold": 0.5, "v_reset": 0.0, "detach_reset": True}


def default_backend() -> str:
    """The LIF backend a model YAML gets when it names none."""
    return inspect.signature(LIF).parameters["backend"].default


def build_cuda(c: TrainConfig, impl: str, device: torch.device, toy: bool) -> nn.Module:
    """Model of a CUDA configuration: "ours" (its YAML as shipped), "torch" / "triton" (that LIF backend),
    "unfused" (ours without the tdBN + LIF fusion) or "naive" around a fresh "ours" (same initialisation)."""
    torch.manual_seed(0)
    cfg = load_model_yaml(c.yaml)
    cfg.update(time_steps=2 if toy else c.time_steps, nc=c.nc)
    if toy:
        cfg["width_multiple"] = 0.125
    if impl in ("torch", "triton"):
        cfg["neuron"] = {**cfg.get("neuron", {}), "backend": impl}
    model = EMSDetectionModel(cfg, verbose=False).to(device)
    if impl == "unfused":  # the LCBs' tdBN not fused into their LIF (the layers' switch, where it exists)
        layers.configure_kernels(model, fuse_bn=False)
    return NaiveEMS(model) if impl == "naive" else model


def peak_mib(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    """`fn()` and the growth of the peak allocated memory while it ran (CUDA; 0 on the CPU, which has no such
    counter: the CPU section measures memory)."""
    if device.type != "cuda":
        return fn(), 0.0
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def cuda_training(device: torch.device, toy: bool, amp: bool) -> list[Result]:
    """Training images/s and peak memory (build + 2 steps) of ours, the other LIF backend and naive, per config."""
    other = "torch" if default_backend() != "torch" else "triton"
    print(f"\nTraining (fp16 AMP, SGD step, synthetic loss on the raw outputs): ours = the shipped YAML (LIF backend "
          f"'{default_backend()}'), '{other}' = the same with that LIF backend, unfused = ours without the tdBN + "
          "LIF fusion (where the layers have it), naive = tools/naive_reference.py; "
          "medians of alternating steps after warm-up; peak memory = torch.cuda.max_memory_allocated growth over "
          "model build + 2 steps", flush=True)
    results, rows = [], []
    for c in CUDA_TRAIN[::2] if toy else CUDA_TRAIN:  # toy: the ResNet34 config repeats ResNet10's code path
        size, batch = (64, 1) if toy else (c.imgsz, c.batch)
        x = torch.rand(batch, 3, size, size, device=device)
        impls = ["ours", other] + (["unfused"] if hasattr(layers, "configure_kernels") else []) + (
            ["naive"] if c.naive else [])
        if other == "triton" and not (device.type == "cuda" and importlib.util.find_spec("triton")):
            impls.remove("triton")
        steps, memory = {}, {}
        for impl in impls:
            def first_steps(impl: str = impl) -> Callable[[], None]:
                step = make_train_step(build_cuda(c, impl, device, toy), x, amp)
                step()
                step()
                return step

            steps[impl], memory[impl] = peak_mib(device, first_steps)
        times = alternate(steps, 0 if toy else 1, 1 if toy else 8, device)
        rate = {k: batch / med(v) for k, v in times.items()}
        rows.append([c.name, *(f"{rate[k]:.0f}" if k in rate else "-" for k in ("ours", other, "unfused", "naive")),
                     f"{rate['ours'] / rate['naive']:.2f}x" if "naive" in rate else "-",
                     *(f"{memory[k]:.0f}" if k in memory else "-" for k in ("ours", "naive")),
                     f"{memory['ours'] / memory['naive']:.2f}" if "naive" in memory and memory["naive"] else "-"])
        results.append(Result(f"training img/s, {c.name} (default)", rate["ours"], c.target, True, unit=" img/s"))
        if other in rate:
            results.append(Result(f"training ours/{other} backend, {c.name}", rate["ours"] / rate[other]))
        if "unfused" in rate:
            results.append(Result(f"training ours/unfused tdBN+LIF, {c.name}", rate["ours"] / rate["unfused"]))
        if "naive" in rate:
            results.append(Result(f"training ours/naive, {c.name}", rate["ours"] / rate["naive"]))
            if memory["naive"]:
                results.append(Result(f"peak training memory ours/naive, {c.name}", memory["ours"] / memory["naive"],
                                      MEMORY_TARGET))
        del steps, times
    print_table(["", "ours img/s", f"{other} img/s", "unfused img/s", "naive img/s", "ours/naive", "ours MiB",
                 "naive MiB", "memory ours/naive"], rows)
    return results


def spikingjelly_lif() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """SpikingJelly 2.0's multi-step LIF with our dynamics (x_seq [T, N, ...] -> spikes), or None when it is not
    installed (the `bench-gpu` extra: pip install -e ".[bench-gpu]")."""
    try:
        from spikingjelly.activation_based import functional
    except ImportError:
        return None
    return lambda x_seq, v: functional.lif_multi_step(x_seq, v, surrogate_function=None, **SJ_DYNAMICS)[0]


def cuda_lif(device: torch.device, toy: bool) -> list[Result]:
    """LIF forward + backward on [T*B, 64, 80, 80] float32, T=4: ours (default backend, torch path), the naive
    per-step LIF and SpikingJelly 2.0 (sigmoid surrogate, its own kernel choice) with the same dynamics."""
    T, B = 4, (1 if toy else 32)
    shape = (T * B, 8 if toy else 64, 16 if toy else 80, 16 if toy else 80)
    print(f"\nLIF alone: forward + backward, T={T}, input {list(shape)} float32 (16 bytes per element moved at best); "
          "SpikingJelly 2.0 functional.lif_multi_step with tau=4/3, decay_input=False, v_reset=0, v_threshold=0.5, "
          "detach_reset=True (the same dynamics)", flush=True)
    x = (torch.randn(shape, device=device) * 0.5 + 0.3).requires_grad_()
    g = torch.randn(shape, device=device)
    ours, torch_path = LIF(T).train(), LIF(T, backend="torch").train()
    fns = {"ours": lambda: torch.autograd.grad(ours(x), x, g),
           "ours, torch path": lambda: torch.autograd.grad(torch_path(x), x, g),
           "naive": lambda: torch.autograd.grad(naive_lif(ours, x.view(T, B, *shape[1:])), x, g.view(T, B, *shape[1:]))}
    sj = spikingjelly_lif()
    if sj is None:
        print("  SpikingJelly 2.0 not installed (pip install -e '.[bench-gpu]'): compared with ours and naive only")
    else:
        v0 = torch.zeros(B, *shape[1:], device=device)
        fns["spikingjelly"] = lambda: torch.autograd.grad(sj(x.view(T, B, *shape[1:]), v0), x, g.view(T, B, *shape[1:]))
        with torch.no_grad():
            differ = (sj(x.view(T, B, *shape[1:]), v0).view(shape) != ours(x)).float().mean().item()
        print(f"  spikes of SpikingJelly and ours differ at a fraction {differ:.1e} of the elements")
    times = alternate(fns, 2, 2 if toy else 20, device)
    gbs = 16 * x.numel() / 1e9
    print_table(["", "fwd+bwd", "GB/s"], [[k, spread(v, 1e3, "ms"), f"{gbs / med(v):.0f}"] for k, v in times.items()])
    results = [Result("LIF fwd+bwd naive/ours time", med(times["naive"]) / med(times["ours"]))]
    if "spikingjelly" in times:
        results.append(Result("LIF fwd+bwd SpikingJelly 2.0/ours time", med(times["spikingjelly"]) / med(times["ours"]),
                              LIF_TARGET, True))
    return results


def cuda_latency(device: torch.device, toy: bool) -> list[Result]:
    """Batch-1 eval latency, fp16 weights, eager against a replayed CUDA graph (GraphedCall, as predict uses)."""
    from ems_yolo.engine.cuda_graph import CUDAGraphRunner, GraphedCall

    if device.type != "cuda":
        print("\nBatch-1 latency with a CUDA graph: needs CUDA, skipped")
        return []
    print("\nBatch-1 inference latency (eval, fp16 weights): eager against the CUDA graph that predict replays "
          "(ems_yolo.engine.cuda_graph.GraphedCall); 5 warm-up + 50 alternating runs", flush=True)
    results, rows = [], []
    for name, yaml_name, size, T, target in LATENCY:
        c = TrainConfig(name, yaml_name, size, T, 1)
        model = build_cuda(c, "ours", device, toy).eval().half()
        x = torch.rand(1, 3, size, size, device=device).half()
        graphed = GraphedCall(model, CUDAGraphRunner())

        def run(fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
            def call() -> object:
                with torch.inference_mode():
                    return fn(x)

            return call

        fns = {"eager": run(model), "graph": run(graphed)}
        same = torch.equal(fns["eager"]()[0], fns["graph"]()[0]) and torch.equal(fns["eager"]()[0], fns["graph"]()[0])
        times = alternate(fns, 5, 50, device)
        eager, graph = med(times["eager"]) * 1e3, med(times["graph"]) * 1e3
        rows.append([name, f"{eager:.2f} ms", f"{graph:.2f} ms", f"{eager / graph:.2f}x",
                     "identical" if same and graphed.graphs else "DIFFER" if graphed.graphs else "no graph"])
        results += [Result(f"batch-1 latency with CUDA graph, {name}", graph, target, unit=" ms"),
                    Result(f"batch-1 latency eager/graph, {name}", eager / graph)]
    print_table(["", "eager", "CUDA graph", "eager/graph", "outputs"], rows)
    return results


def cuda_trainer(device: torch.device, toy: bool) -> list[Result]:
    """The Ultralytics trainer (ems-yolo train) on the built-in shapes data: images/s of the batch loop of the
    second epoch (from its first batch's end to its last's), COCO model, 640 px, batch 64, AMP."""
    from ems_yolo.data.shapes import make_shapes_dataset
    from ems_yolo.engine.model import EMSYOLO, derive_model_yaml

    model_yaml, size, batch, n, workers = ("ems-res10.yaml", 64, 4, 16, 0) if toy else (
        "ems-res34-coco.yaml", 640, 64, 1024, min(16, os.cpu_count() or 1))
    print(f"\nEnd-to-end trainer: ems-yolo train model={model_yaml} on {n} built-in shapes images, {size} px, batch "
          f"{batch}, {workers} workers, epochs=2 (no validation, no plots); images/s of epoch 2's batch loop",
          flush=True)
    data = make_shapes_dataset(n_train=n, n_val=8)
    marks: list[float] = []

    def batch_end(trainer) -> None:
        if trainer.epoch == 1:
            sync(device)
            marks.append(time.perf_counter())

    if toy:
        cfg = load_model_yaml(model_yaml)
        cfg["width_multiple"] = 0.125
        model_yaml = str(derive_model_yaml(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        yolo = EMSYOLO(model_yaml)
        yolo.add_callback("on_train_batch_end", batch_end)
        yolo.train(data=str(data), imgsz=size, batch=batch, epochs=2, workers=workers, val=False, plots=False,
                   device=0 if device.type == "cuda" else "cpu", project=tmp, name="bench", verbose=False,
                   amp=device.type == "cuda")
    rate = (len(marks) - 1) * batch / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    print(f"  epoch 2: {len(marks)} batches, {rate:.1f} img/s")
    return [Result(f"trainer img/s, {Path(model_yaml).name} {size}px batch {batch}", rate, unit=" img/s")]


def cuda_section(device: torch.device, toy: bool = False) -> list[Result]:
    """The CUDA benchmarks at the sizes users train at; `toy` runs the same code at toy sizes (on the CPU: how
    tools/gpu_check.sh --dry-run checks it without a GPU)."""
    amp = device.type == "cuda"
    results = cuda_training(device, toy, amp)
    results += cuda_lif(device, toy)
    results += cuda_latency(device, toy)
    results += cuda_trainer(device, toy)
    return results


def print_summary(sections: dict[str, list[Result]]) -> None:
    """Final table: every measured ratio with its target and whether it is met, per device section."""
    print("\n=== Summary ===")
    rows = [
        [name, r.measure, f"{r.value:.1%}" if r.percent else f"{r.value:.2f}{r.unit}",
         "-" if r.limit is None else f"{'>=' if r.at_least else '<='} {r.limit}", r.status()]
        for name, results in sections.items()
        for r in results
    ]
    print_table(["device", "measure", "value", "target", "status"], rows)


def settings(args: argparse.Namespace) -> Settings:
    """Full or quick sizes; --time-steps overrides the T list."""
    ts = args.time_steps or ([1, 5] if args.quick else [1, 2, 3, 4, 5])
    common = {"width": args.width, "batch": args.batch, "imgsz": args.imgsz, "infer_time_steps": 4, "lif_batch": 8,
              "matmul_size": 2048}
    if args.quick:
        return Settings(time_steps=ts, memory_time_steps=ts[-1:], warmup=1, train_iters=3, infer_warmup=2,
                        infer_iters=5, lif_iters=3, **common)
    return Settings(time_steps=ts, memory_time_steps=ts, warmup=2, train_iters=10, infer_warmup=3, infer_iters=30,
                    lif_iters=20, compile=True, **common)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: T in {1, 5}, memory at the largest T only, "
                   "fewer iterations")
    p.add_argument("--width", type=float, default=1.0, help="width_multiple of EMS-ResNet10 (default full width)")
    p.add_argument("--batch", type=int, default=2, help="training batch size")
    p.add_argument("--imgsz", type=int, default=320, help="input size (pixels)")
    p.add_argument("--time-steps", type=int, nargs="+", help="T values for training (default 1..5, quick 1 5)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA section even when a GPU is present")
    p.add_argument("--cuda-only", action="store_true", help="the CUDA section alone (no CPU section)")
    p.add_argument("--cuda-toy", action="store_true", help="the CUDA section's code at toy sizes on the CPU (how "
                   "tools/gpu_check.sh --dry-run tests it)")
    p.add_argument("--json", type=Path, help="also write the summary rows to this JSON file (tools/gpu_check.py "
                   "reads it)")
    p.add_argument("--memory-probe", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(DEFAULT_THREADS)
    if args.memory_probe:
        memory_probe(args.memory_probe[0], int(args.memory_probe[1]), settings(args))
        return
    argv = [f"--width={args.width}", f"--batch={args.batch}", f"--imgsz={args.imgsz}"]

    import onnxruntime as ort

    t0 = time.time()
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, Python {platform.python_version()}")
    cuda = torch.cuda.is_available() and not args.no_cuda
    if args.cuda_only and not (cuda or args.cuda_toy):
        raise SystemExit("bench_speed.py: --cuda-only needs a CUDA device (or --cuda-toy for the CPU)")
    if cuda:
        print(f"CUDA: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    sections = {}
    if not args.cuda_only:
        print("\n=== CPU, float32 ===")
        sections["CPU fp32"] = run_section(settings(args), argv)
    if args.cuda_toy:
        print("\n=== CUDA section at toy sizes, on the CPU ===")
        sections["CUDA toy (CPU)"] = cuda_section(torch.device("cpu"), toy=True)
    elif cuda:
        print("\n=== CUDA, AMP autocast float16 ===")
        sections["CUDA AMP"] = cuda_section(torch.device("cuda"))
    print_summary(sections)
    if args.json:
        rows = [{"section": name, "measure": r.measure, "value": r.value, "unit": r.unit, "percent": r.percent,
                 "target": None if r.limit is None else f"{'>=' if r.at_least else '<='} {r.limit:g}",
                 "status": r.status()} for name, results in sections.items() for r in results]
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nTotal time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
