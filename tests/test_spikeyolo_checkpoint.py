"""Checkpoints written by SpikeYOLO's code (issue 24 item 4): read without executing them, mapped one-to-one, and
giving that code's own outputs (../shared/data/checkpoints/spikeyolo, made by running it unmodified: s scale, random
weights, T=1, D=4). float64 is the reference; float32 is compared layer by layer (teacher-forced), since one spike
rounding differently in float32 snowballs (the fixture's README)."""

import sys
from copy import deepcopy
from pathlib import Path

import pytest
import torch

from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.inert_pickle import inert_class
from ems_yolo.nn.spikeyolo import SpikeDetect
from ems_yolo.nn.spikeyolo_checkpoint import load_into, load_spikeyolo, model_from_spikeyolo, read_spikeyolo
from foreign_checkpoints import assert_one_line, damaged, tensor_edits
from shared_data import SHARED_DATA

FIXTURE = SHARED_DATA / "checkpoints" / "spikeyolo"
CKPT = FIXTURE / "spikeyolo-s-coco-T1D4.pt"
pytestmark = pytest.mark.skipif(not CKPT.exists(), reason="shared SpikeYOLO checkpoint not available")


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "spikeyolo-s-coco-T1D4.reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted():
    """(model, checkpoint data) of the shared file (copy the model before changing it)."""
    return load_spikeyolo(CKPT)


def assert_fp64_outputs(model: torch.nn.Module, reference: dict, item: int) -> None:
    """Raw head outputs within 1e-6 of the original's float64 ones, decoded boxes and scores likewise; one batch item
    (the README: an item alone gives the same float64 outputs as the batch of 2)."""
    m = deepcopy(model).double().eval()
    with torch.no_grad():
        decoded, preds = m(reference["input"][item : item + 1].double())
    for level in range(3):
        theirs = reference[f"fp64.raw.{level}"][item : item + 1]
        assert preds["feats"][level].shape == theirs.shape
        assert (preds["feats"][level] - theirs).abs().max().item() <= 1e-6
    assert decoded.shape == (1, 84, 1344)
    assert (decoded - reference["fp64.decoded"][item : item + 1]).abs().max().item() <= 1e-6


def test_reads_the_file_as_data():
    sy = read_spikeyolo(CKPT)
    assert "ultralytics.nn.modules.yolo_spikformer" not in sys.modules  # nothing of the fork is imported
    assert sy.source == "model" and sy.epoch == -1  # strip_optimizer: the EMA weights went to 'model'
    assert len(sy.tensors) == 755 and sy.time_steps == 1 and sy.levels == 4
    assert {t.dtype for k, t in sy.tensors.items() if "num_batches" not in k} == {torch.float16}
    assert sy.modules["model.26"].global_name == "ultralytics.nn.modules.yolo_spikformer.SpikeDetect"
    assert sy.names[0] == "person" and len(sy.names) == 80 and sy.stride == [8.0, 16.0, 32.0]


@pytest.mark.slow
def test_model_and_float64_outputs_of_the_original(converted, reference):
    model, _ = converted
    assert sum(p.numel() for p in model.parameters()) == 23_153_024
    assert isinstance(model.model[-1], SpikeDetect) and model.time_steps == 1
    neurons = [m for m in model.modules() if isinstance(m, ILIF)]
    assert len(neurons) == 88  # theirs: 89, one (the DFL's) never called
    assert all(m.levels == 4 and m.tau == 0.25 for m in neurons)
    assert_fp64_outputs(model, reference, item=0)


def teacher_forced(model: torch.nn.Module, dtype: torch.dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Run each layer on the original's stored float32 inputs (cast to `dtype`): each layer's largest difference to
    the stored output, and the spike counts per level of every neuron."""
    model = deepcopy(model).to(dtype).eval()
    stored = torch.load(FIXTURE / "spikeyolo-s-coco-T1D4.intermediates-fp32.pt", weights_only=True)
    outputs = [stored[f"fp32.layer.{i:02d}.output"] for i in range(27)]
    outputs = [o.flatten(0, 1) if o.dim() == 5 else o for o in outputs]  # [T=1, B, ...] -> time-folded
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, ILIF):
            m.register_forward_hook(lambda m, i, out, name=name: counts.__setitem__(
                name, torch.bincount(out.flatten().long(), minlength=5)))
    diffs = []
    with torch.no_grad():
        for layer in model.model:
            i = layer.i
            sources = [outputs[j if j >= 0 else i - 1] for j in ([layer.f] if isinstance(layer.f, int) else layer.f)]
            x = stored["input"] if i == 0 else sources[0] if isinstance(layer.f, int) else sources
            x = x.to(dtype) if isinstance(x, torch.Tensor) else [t.to(dtype) for t in x]
            out = layer(x)
            out = out[0] if i == 26 else out
            assert out.shape == outputs[i].shape, i
            diffs.append((out.double() - outputs[i].double()).abs().max().item())
    return diffs, counts


@pytest.mark.slow
def test_layer_by_layer_against_the_float32_intermediates(converted, reference):
    """Each layer fed the original's stored float32 input: every neuron fires the same spikes (per-level counts of all
    88 neurons that run equal the original's float32 ones), in float64 and in float32. float32 convolution sums
    depend on how oneDNN splits them over threads: with 2 threads (this machine's cores) layer
    outputs are within 2e-6 and no spike differs; with 1 thread 270 spikes flip, starting at model.6.1.lif1 (the
    neuron the fixture's README names as the first float32/float64 flip), so the float32 run pins 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fp32 = teacher_forced(converted[0], torch.float32)
    finally:
        torch.set_num_threads(threads)
    for dtype, (diffs, counts), atol in ((torch.float64, teacher_forced(converted[0], torch.float64), 1e-3),
                                         (torch.float32, fp32, 1e-5)):
        assert max(diffs) < atol, (dtype, diffs)
        assert len(counts) == 88
        for name, hist in counts.items():
            assert torch.equal(hist, reference[f"fp32.lif.{name}.hist"]), (dtype, name)


def _rename_class(sy, path: str, name: str):
    """The module at `path` pickled as another class."""
    module = inert_class(name)()
    module.state = sy.modules[path].state
    sy.modules[path] = module


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        *tensor_edits("model.6.0.conv1.body.0.weight", "model.6.0.extra.weight",
                      ("model.10.conv.weight", (256, 512, 3, 3)),
                      (r"no tensor for ems-yolo's 'model\.6\.0\.conv1\.body\.0\.weight'",
                       r"tensor 'model\.6\.0\.extra\.weight' has no ems-yolo counterpart",
                       r"tensor 'model\.10\.conv\.weight' has shape \[256, 512, 3, 3\], ems-yolo's "
                       r"'model\.10\.conv\.weight' needs \[256, 512, 1, 1\]")),
        (lambda s: _rename_class(s, "model.8.Conv.pwconv3", "torch.nn.modules.conv.Conv2d"),
         r"model row 8 \(MS_ConvBlock\): 'model\.8\.Conv\.pwconv3' is a torch\.nn\.modules\.conv\.Conv2d, the "
         r"ems-yolo model has SepRepConv there"),
        (lambda s: s.yaml["head"].__setitem__(0, [-1, 1, "MS_Block", [512]]),
         r"model row 10 uses SpikeYOLO's module 'MS_Block', which has no ems-yolo counterpart"),
    ],
    ids=["missing", "extra", "shape", "other-class", "unknown-row"],
)
def test_mapping_errors_name_the_file_and_the_first_offending_key(edit, message, converted):
    sy = damaged(read_spikeyolo, CKPT, edit)
    with pytest.raises(ValueError, match=message) as e:
        if "MS_Block" in str(sy.yaml["head"][0]):
            model_from_spikeyolo(sy)  # refused while translating the rows, before anything is built
        else:
            load_into(sy, deepcopy(converted[0]))
    assert_one_line(e.value, CKPT)


@pytest.mark.slow
def test_convert_command_and_the_converted_checkpoint(reference, tmp_path):
    """`ems-yolo convert source=<SpikeYOLO .pt>` writes an ems-yolo checkpoint that gives the same float64 outputs."""
    from typer.testing import CliRunner

    from ems_yolo.cli import app
    from ems_yolo.engine.checkpoints import SPIKEYOLO_FORMAT, load_checkpoint_file

    r = CliRunner().invoke(app, ["convert", f"source={CKPT}", f"out={tmp_path / 's.pt'}"])
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint_file(tmp_path / "s.pt")
    assert ckpt["converted_from"]["format"] == SPIKEYOLO_FORMAT and ckpt["converted_from"]["time_steps"] == 1
    model = ckpt["model"].float()
    assert model.names[0] == "person" and model.yaml["neuron"] == {"kind": "ilif", "levels": 4, "tau": 0.25}
    assert_fp64_outputs(model, reference, item=1)


@pytest.fixture(scope="module")
def spikeyolo_copy(tmp_path_factory):
    """The shared checkpoint in a writable folder (export and training write beside or from their model)."""
    import shutil

    path = tmp_path_factory.mktemp("spikeyolo") / "spikeyolo-s.pt"
    shutil.copy(CKPT, path)
    return path


@pytest.mark.slow
def test_every_mode_runs_on_the_spikeyolo_checkpoint(spikeyolo_copy, tmp_path):
    """EMSYOLO(<SpikeYOLO .pt>): predict on the pedestrian video (a few frames), val on COCO8, energy, ONNX equal to
    PyTorch, and a 1-epoch fine-tuning on the built-in data (another nc: the class convs are re-initialised, the
    rest loaded)."""
    import onnxruntime

    from ems_yolo import EMSYOLO
    from ems_yolo.data.shapes import make_shapes_dataset

    model = EMSYOLO(spikeyolo_copy)
    video = SHARED_DATA / "videos" / "pedestrians.avi"
    if video.exists():
        results = list(model.predict(str(video), stream=True, vid_stride=200, imgsz=128, conf=0.0, verbose=False))
        assert results and results[0].orig_shape == (720, 1280) and len(results[0].boxes) > 0
        assert results[0].boxes.cls.max() < 80
    coco8 = SHARED_DATA / "coco8"
    if coco8.is_dir():
        metrics = model.val(data="coco8.yaml", imgsz=128, batch=2, workers=0, plots=False, project=str(tmp_path))
        assert metrics.box.nc == 80 and metrics.names[0] == "person"
    data = make_shapes_dataset(n_train=4, n_val=4, imgsz=64)
    report = model.energy(data=str(data), imgsz=64, batch=2, max_batches=1, project=str(tmp_path))
    assert report.time_steps == 1 and report.samples == 2
    onnx = model.export(format="onnx", imgsz=128)  # the whole s model (755 tensors), fixed batch of 1
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    sess = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = deepcopy(model.model).float().eval()(x)[0]
    assert out.shape == ref.shape == (1, 84, 336)
    assert (out - ref).abs().max().item() < 1e-3  # measured 1.2e-4 (boxes in pixels, scores)
    model.train(data=str(data), epochs=1, imgsz=64, batch=2, workers=0, plots=False, project=str(tmp_path),
                name="ft")
    tuned = torch.load(tmp_path / "ft" / "weights" / "last.pt", weights_only=False)["model"]
    head = tuned.model[-1]
    assert tuned.yaml["nc"] == head.nc == 5 and head.cv3[0][2].conv.weight.shape[0] == 5


def test_an_unknown_module_class_is_one_line_from_the_command(tmp_path):
    """A file whose pickled tree holds a class the mapping does not know: `ems-yolo convert` exits 2 with one line
    naming the class and the row, before any model is built, and writes nothing."""
    import os
    import subprocess
    import zipfile

    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(CKPT) as zin, zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):  # same length: the pickle stays well-formed
                data = data.replace(b"\nSepRepConv\n", b"\nSepRepConX\n")
            zout.writestr(info.filename, data)
    exe = Path(sys.executable).parent / "ems-yolo"
    r = subprocess.run([str(exe), "convert", f"source={damaged}", f"out={tmp_path / 'x.pt'}"], capture_output=True,
                       text=True, env=os.environ.copy(), timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and str(damaged) in line and "Traceback" not in line
    assert ("model row 2 (MS_AllConvBlock): module class ultralytics.nn.modules.yolo_spikformer.SepRepConX (at "
            "'model.2.Conv.pwconv3') has no ems-yolo counterpart") in line
    assert not (tmp_path / "x.pt").exists()


def test_the_file_rows_are_those_of_the_shipped_yaml():
    """The pickled snn_yolov8s rows, translated with the fork's channel and depth rules, build the layers of
    spikeyolo-s.yaml, argument for argument (built on the meta device: no memory)."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.nn.parser import parse_model
    from ems_yolo.nn.spikeyolo_checkpoint import ems_model_yaml

    with torch.device("meta"):
        theirs, _ = parse_model(ems_model_yaml(read_spikeyolo(CKPT)), 3)
        ours, _ = parse_model(load_model_yaml("spikeyolo-s.yaml"), 3)
    assert [(m.type, m.n, m.f, m.args) for m in theirs] == [(m.type, m.n, m.f, m.args) for m in ours]


def test_a_yaml_of_another_scale_is_refused_at_the_first_misshapen_tensor():
    """`convert model=spikeyolo-n.yaml` on the s checkpoint: one line naming the first tensor whose shape differs."""
    from ems_yolo.cfg import load_model_yaml

    with pytest.raises(ValueError, match=r"tensor 'model\.1\.encode_conv\.weight' has shape \[64, 3, 7, 7\], "
                                         r"ems-yolo's 'model\.1\.encode_conv\.weight' needs \[48, 3, 7, 7\]"):
        model_from_spikeyolo(read_spikeyolo(CKPT), base=load_model_yaml("spikeyolo-n.yaml"))
