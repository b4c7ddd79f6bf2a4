"""Checkpoints written by the original EMS-YOLO code: read without executing them, converted one-to-one, and giving
the original code's own outputs (../shared/data/checkpoints, made by running the original code unmodified)."""

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ems_yolo import EMSYOLO
from ems_yolo.cli import app
from ems_yolo.engine.checkpoints import convert_original
from ems_yolo.nn.original import is_original_checkpoint, model_from_original, read_original
from foreign_checkpoints import assert_one_line, damaged, tensor_edits
from shared_data import SHARED_DATA

ORIGINAL = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
REFERENCE = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.reference.pt"
pytestmark = pytest.mark.skipif(not ORIGINAL.exists(), reason="shared original checkpoint not available")


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def assert_original_outputs(model: torch.nn.Module, reference: dict) -> None:
    """Raw head outputs within 1e-9 (float64) and 1e-4 (float32) of the original code's; decoded boxes and
    obj * cls scores likewise (the original returns obj and cls separately)."""
    for dtype, name, atol in ((torch.float64, "float64", 1e-9), (torch.float32, "float32", 1e-4)):
        m = model.to(dtype).eval()
        with torch.no_grad():
            decoded, raw = m(reference["input"].to(dtype))
        assert len(raw) == len(reference[f"raw_{name}"]) == 2
        for ours, theirs in zip(raw, reference[f"raw_{name}"]):
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max().item() < atol
        ref = reference[f"decoded_{name}"]
        ours = decoded.transpose(1, 2)
        assert ours.shape[:2] == ref.shape[:2] == (2, 1500)
        assert torch.allclose(ours[..., :4], ref[..., :4], rtol=atol, atol=atol * 320)  # pixels
        assert (ours[..., 4:] - ref[..., 4:5] * ref[..., 5:]).abs().max().item() < atol
    model.float()


def test_reads_the_original_file_as_data():
    orig = read_original(ORIGINAL)
    assert is_original_checkpoint(ORIGINAL)
    assert orig.source == "model"  # strip_optimizer: the EMA weights went to 'model', 'ema' is None
    assert len(orig.tensors) == 155
    assert {t.dtype for k, t in orig.tensors.items() if "num_batches" not in k} == {torch.float16}
    assert orig.modules["model.1"].global_name == "models.common.ConcatBlock_ms"
    assert orig.names == {0: "class0", 1: "class1"} and orig.stride == [16.0, 32.0]


def test_converted_model_gives_the_original_outputs(reference):
    orig = read_original(ORIGINAL)
    model = model_from_original(orig, time_steps=int(reference["time_steps"]))
    assert model.yaml["nc"] == 2 and model.time_steps == 5
    assert model.yaml["anchors"] == [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169, 216, 269]]  # as trained (Gen1)
    assert sum(p.numel() for p in model.parameters()) == 6_207_050  # model-spec: EMS-ResNet10 at nc=2
    assert_original_outputs(model, reference)


def test_convert_command_and_the_converted_checkpoint_round_trip(reference, tmp_path):
    out = tmp_path / "converted.pt"
    r = CliRunner().invoke(app, ["convert", f"source={ORIGINAL}", f"out={out}"])
    assert r.exit_code == 0, r.output
    assert f"-> {out}" in r.output
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["converted_from"]["weights"] == "model" and ckpt["converted_from"]["time_steps"] == 5
    assert ckpt["epoch"] == -1 and next(ckpt["model"].parameters()).dtype == torch.float16
    loaded = EMSYOLO(out)  # Ultralytics' own checkpoint loader (it sets every `inplace` flag)
    assert loaded.time_steps == 5 and loaded.model.names == {0: "class0", 1: "class1"}
    assert_original_outputs(loaded.model, reference)


def test_original_file_is_a_model_argument_with_time_steps(reference):
    model = EMSYOLO(ORIGINAL)
    assert model.time_steps == 5 and model.ckpt["converted_from"]["file"] == str(ORIGINAL)
    assert_original_outputs(model.model, reference)
    four = EMSYOLO(ORIGINAL, time_steps=4)
    assert four.time_steps == 4 and all(m.time_steps == 4 for m in four.model.modules() if hasattr(m, "tau"))


def test_target_yaml_must_match_the_checkpoint_rows(tmp_path):
    out = convert_original(ORIGINAL, tmp_path / "a.pt", model="ems-res10.yaml", time_steps=5)
    assert torch.load(out, weights_only=False)["model"].yaml["loss"]["anchor_t"] == 4.0  # taken from ems-res10.yaml
    with pytest.raises(ValueError, match=r"model row \d+: the checkpoint has .*, but ems-res34.yaml has"):
        convert_original(ORIGINAL, tmp_path / "b.pt", model="ems-res34.yaml")


def _poisoned_copy(path: Path, marker: Path) -> Path:
    """The original checkpoint with one more dict entry whose unpickling calls exec() to write `marker`."""
    code = f"open({str(marker)!r}, 'w').write('pwned')".encode()
    evil = (b"X" + (6).to_bytes(4, "little") + b"poison" + b"cbuiltins\nexec\n"
            + b"X" + len(code).to_bytes(4, "little") + code + b"\x85R" + b"s.")  # key, exec(code), SETITEM, STOP
    with zipfile.ZipFile(ORIGINAL) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = data[:-1] + evil
            zout.writestr(info.filename, data)
    return path


def test_a_poisoned_copy_runs_nothing(tmp_path, reference):
    marker = tmp_path / "pwned.txt"
    poisoned = _poisoned_copy(tmp_path / "poisoned.pt", marker)

    class Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    class Permissive(pickle.Unpickler):  # an ordinary unpickler, with the model and tensor classes stubbed out
        def find_class(self, module, name):
            return Anything if module.startswith(("models", "torch")) else super().find_class(module, name)

        def persistent_load(self, pid):
            return None

    with zipfile.ZipFile(poisoned) as z:
        Permissive(io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))).load()
    assert marker.read_text() == "pwned"  # the poison is real: an ordinary unpickler executes it
    marker.unlink()

    model = EMSYOLO(poisoned)
    out = convert_original(poisoned, tmp_path / "converted.pt")
    assert not marker.exists()
    assert_original_outputs(model.model, reference)
    assert torch.load(out, weights_only=False)["converted_from"]["file"] == str(poisoned)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        *tensor_edits("model.6.shortcut.1.weight", "model.6.extra.weight",
                      ("model.3.residual_function.1.weight", (64, 128, 3, 3)),
                      (r"no tensor for ems-yolo's 'model\.6\.new\.conv\.weight'",
                       r"tensor 'model\.6\.extra\.weight' of row 6 \(ConcatBlock_ms\) has no ems-yolo counterpart",
                       r"tensor 'model\.3\.residual_function\.1\.weight' has shape \[64, 128, 3, 3\], ems-yolo's "
                       r"'model\.3\.residual\.0\.conv\.weight' needs \[128, 128, 3, 3\]")),
        (lambda o: o.yaml["head"].__setitem__(0, [-1, 1, "Bottleneck", [256]]), r"model row 5 uses the original "
         r"module 'Bottleneck', which has no ems-yolo counterpart"),
        (lambda o: o.yaml["head"].__setitem__(0, [-1, 1, "BasicBlock_2", [256, 3, 1]]),
         r"model row 5 names BasicBlock_2, but the pickled layer 5 is models\.common\.BasicBlock_ms"),
    ],
    ids=["missing", "extra", "shape", "unknown-module", "row-vs-layer"],
)
def test_mapping_errors_name_the_file_and_the_first_offending_key(edit, message):
    with pytest.raises(ValueError, match=message) as e:
        model_from_original(damaged(read_original, ORIGINAL, edit))
    assert_one_line(e.value, ORIGINAL)


def test_unreadable_and_foreign_files_are_one_line_errors(tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ORIGINAL.read_bytes()[: ORIGINAL.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "epoch": 3}, foreign)
    for path, message in ((truncated, "cannot be read as a PyTorch checkpoint"),
                          (foreign, "'model' is dict, expected the original code's models.yolo.Model")):
        r = CliRunner().invoke(app, ["convert", f"source={path}", f"out={tmp_path / 'x.pt'}"])
        assert r.exit_code != 0 and isinstance(r.exception, ValueError)
        assert str(r.exception).startswith(f"{path}: ") and message in str(r.exception)
        assert "\n" not in str(r.exception)
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def original_copy(tmp_path_factory):
    """The shared checkpoint in a writable folder (export writes beside its model)."""
    path = tmp_path_factory.mktemp("original") / "original.pt"
    shutil.copy(ORIGINAL, path)
    return path


def test_every_mode_runs_on_the_original_checkpoint(original_copy, tmp_path):
    from ems_yolo.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(n_train=4, n_val=4, imgsz=64)
    image = sorted((data.parent / "images" / "val").glob("*.png"))[0]
    model = EMSYOLO(original_copy, time_steps=2)
    results = model.predict(str(image), imgsz=64, conf=0.0, verbose=False)
    assert results[0].names == {0: "class0", 1: "class1"}
    assert len(results[0].boxes) > 0 and results[0].boxes.cls.max() <= 1  # the checkpoint's two classes
    metrics = model.val(data=str(data), imgsz=64, batch=4, project=str(tmp_path), plots=False)
    assert metrics.names == {0: "class0", 1: "class1"} and metrics.box.nc == 2
    onnx = model.export(format="onnx", imgsz=64)
    import onnxruntime

    x = torch.rand(1, 3, 64, 64)
    sess = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    ref = model.model.float().eval()(x)[0].detach()
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-4)
    report = model.energy(data=str(data), imgsz=64, batch=2, max_batches=1, project=str(tmp_path))
    assert report.time_steps == 2 and report.samples == 2
    assert 0.05 < report.mean_firing_rate < 0.8  # random weights drawn to fire at 15-50% (shared README)


# The released COCO model of the original code (its models/resnet34-cat.yaml at nc=80), as its Model pickles it.
RESNET34_CAT_ROWS = [
    [-1, 1, "Conv_1", [64, 7, 2]], [-1, 1, "BasicBlock_2", [64, 3, 2]], [-1, 2, "BasicBlock_2", [64, 3, 1]],
    [-1, 1, "Concat_res2", [128, 3, 2]], [-1, 3, "BasicBlock_2", [128, 3, 1]], [-1, 1, "Concat_res2", [256, 3, 2]],
    [-1, 5, "BasicBlock_2", [256, 3, 1]], [-1, 1, "Concat_res2", [512, 3, 2]], [-1, 2, "BasicBlock_2", [512, 3, 1]],
    [-1, 1, "BasicBlock_2", [256, 3, 1]], [-1, 1, "Conv", [512, 3, 1]], [-2, 1, "BasicBlock_2", [128, 1, 1]],
    [-1, 1, "Sample", ["None", 2, "nearest"]], [[-1, 6], 1, "Concat", [2]], [-1, 1, "Conv", [256, 3, 1]],
    [[14, 10], 1, "Detect", ["nc", "anchors"]],
]


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}{k}": torch.randn(c) for k in ("weight", "bias", "running_mean")} | {
        f"{prefix}running_var": torch.rand(c) + 0.5, f"{prefix}num_batches_tracked": torch.tensor(7)}


def _original_tensors(rows: list, nc: int, ch: int = 3) -> tuple[dict, dict]:
    """State dict and module classes of the original code's Model for `rows`, named as its modules name them
    (common.py: Conv_1 = conv + batch_norm_2d(bn); BasicBlock_2 / Concat_res2 = residual_function (LIF, conv, BN,
    LIF, conv, BN) + shortcut (MaxPool, LIF, conv, BN / LIF, conv, BN); yolo.py: Detect.anchors, Detect.m)."""
    from ems_yolo.nn.inert_pickle import inert_class

    tensors, modules, chs = {}, {"": inert_class("models.yolo.Model")()}, []
    for i, (f, n, name, args) in enumerate(rows):
        c1 = ch if i == 0 else (chs[f] if isinstance(f, int) else None)
        cls = "torch.nn.modules.container.Sequential" if n > 1 else f"models.common.{name}"
        modules[f"model.{i}"] = inert_class(cls if name != "Detect" else "models.yolo.Detect")()
        if name == "Concat":
            chs.append(sum(chs[x] for x in f))
            continue
        if name == "Sample":
            chs.append(c1)
            continue
        if name == "Detect":
            tensors[f"model.{i}.anchors"] = torch.rand(2, 3, 2) * 5
            for j, x in enumerate(f):
                tensors[f"model.{i}.m.{j}.weight"] = torch.randn(3 * (nc + 5), chs[x], 1, 1)
                tensors[f"model.{i}.m.{j}.bias"] = torch.randn(3 * (nc + 5))
            continue
        c2, k, s = args
        for j in range(n):
            p = f"model.{i}." + (f"{j}." if n > 1 else "")
            if name in ("Conv_1", "Conv"):
                tensors[f"{p}conv.weight"] = torch.randn(c2, c1, k, k) * 0.05
                tensors.update(_bn(f"{p}bn.bn.", c2))
                continue
            tensors[f"{p}residual_function.1.weight"] = torch.randn(c2, c1, k, k) * 0.05
            tensors.update(_bn(f"{p}residual_function.2.bn.", c2))
            tensors[f"{p}residual_function.4.weight"] = torch.randn(c2, c2, k, k) * 0.05
            tensors.update(_bn(f"{p}residual_function.5.bn.", c2))
            if name == "Concat_res2":
                tensors[f"{p}shortcut.1.weight"] = torch.randn(c2 - c1, c1, 1, 1) * 0.05
                tensors.update(_bn(f"{p}shortcut.2.bn.", c2 - c1))
            elif s != 1 or c1 != c2:
                tensors[f"{p}shortcut.2.weight"] = torch.randn(c2, c1, 1, 1) * 0.05
                tensors.update(_bn(f"{p}shortcut.3.bn.", c2))
        chs.append(c2)
    return tensors, modules


def test_released_coco_model_layout_maps_one_to_one_onto_ems_res34_coco():
    """The 275 tensors of resnet34-cat (nc=80) fill ems-res34-coco.yaml exactly, row for row."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.nn.original import OriginalCheckpoint, ems_model_yaml

    tensors, modules = _original_tensors(RESNET34_CAT_ROWS, nc=80)
    orig = OriginalCheckpoint(
        path=Path("resnet34-cat.pt"), yaml={"nc": 80, "anchors": [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169,
        344, 319]], "backbone": RESNET34_CAT_ROWS[:9], "head": RESNET34_CAT_ROWS[9:], "ch": 3},
        yaml_file="resnet34-cat.yaml", tensors=tensors, modules=modules, names={i: str(i) for i in range(80)},
        stride=[16.0, 32.0], epoch=149, date=None, source="model")
    assert len(tensors) == 275
    cfg = ems_model_yaml(orig, 4, base=load_model_yaml("ems-res34-coco.yaml"))  # raises on any row difference
    assert [r[2] for r in cfg["head"]] == ["EMSBlock1", "SiLUConv", "EMSBlock1", "nn.Upsample", "Concat", "SiLUConv",
                                           "EMSDetect"]
    model = model_from_original(orig, 4, base=load_model_yaml("ems-res34-coco.yaml"))
    state = model.state_dict()
    assert len(state) == 275 and sum(p.numel() for p in model.parameters()) == 25_449_022
    assert torch.equal(state["model.1.shortcut.1.conv.weight"], tensors["model.1.shortcut.2.weight"])
    assert torch.equal(state["model.3.new.bn.running_var"], tensors["model.3.shortcut.2.bn.running_var"])
    assert torch.equal(state["model.10.bn.bias"], tensors["model.10.bn.bn.bias"])
    assert torch.equal(state["model.6.4.residual.1.conv.weight"], tensors["model.6.4.residual_function.4.weight"])
    assert torch.allclose(state["model.15.anchor_grid"], tensors["model.15.anchors"])


@pytest.mark.slow
def test_fine_tuning_from_the_original_checkpoint_keeps_all_but_the_head(original_copy, tmp_path, caplog):
    """`ems-yolo train model=<original .pt> data=<5 classes>`: the head is re-initialised, every other tensor
    starts from the checkpoint (as Ultralytics does for a pretrained model with another nc)."""
    import logging

    from ems_yolo.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    with caplog.at_level(logging.INFO):
        r = CliRunner().invoke(app, ["train", f"model={original_copy}", f"data={data}", "epochs=1", "imgsz=64",
                                     "batch=4", "workers=0", "plots=False", "time_steps=1", f"project={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert "Transferred 151/155 items from pretrained weights" in caplog.text  # all but the 4 head conv tensors
    tuned = torch.load(tmp_path / "train" / "weights" / "last.pt", weights_only=False)["model"]
    assert tuned.yaml["nc"] == 5 and tuned.time_steps == 1
    assert tuned.yaml["anchors"] == [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169, 216, 269]]


def test_validation_uses_the_original_nms_iou(original_copy, tmp_path):
    """val defaults to the original's NMS IoU 0.6; the README's reproduction command passes 0.65 (its COCO score)."""
    seen = []
    model = EMSYOLO(original_copy, time_steps=1)
    model.add_callback("on_val_start", lambda validator: seen.append(validator.args.iou))
    for extra in ({}, {"iou": 0.65}):
        metrics = model.val(data="coco8.yaml", imgsz=64, batch=4, project=str(tmp_path), plots=False, **extra)
        assert metrics.names == {0: "class0", 1: "class1"}
    assert seen == [0.6, 0.65]
