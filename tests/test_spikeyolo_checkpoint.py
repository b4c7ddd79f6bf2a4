"""Checkpoints written by SpikeYOLO's code (issue 24 item 4): read without executing them, mapped one-to-one, and
giving that code's own outputs (../shared/data/checkpoints/spikeyolo, made by running it unmodified: s scale, random
weights, T=1, D=4). float64 is the reference; float32 is compared layer by layer (teacher-forced), since one spike
rounding differently in float32 snowballs (the fixture's README)."""

import sys
from copy import deepcopy

import pytest
import torch

from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.inert_pickle import inert_class
from ems_yolo.nn.spikeyolo import SpikeDetect
from ems_yolo.nn.spikeyolo_checkpoint import load_into, load_spikeyolo, model_from_spikeyolo, read_spikeyolo
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


@pytest.mark.slow
def test_float32_layer_by_layer_against_the_intermediates(converted, reference):
    """Each layer fed the original's stored float32 input: every neuron fires the same spikes (per-level counts of all
    88 neurons that run equal the original's) and every layer output is within a few float32 ulps."""
    model = deepcopy(converted[0]).float().eval()
    stored = torch.load(FIXTURE / "spikeyolo-s-coco-T1D4.intermediates-fp32.pt", weights_only=True)
    outputs = [stored[f"fp32.layer.{i:02d}.output"] for i in range(27)]
    outputs = [o.flatten(0, 1) if o.dim() == 5 else o for o in outputs]  # [T=1, B, ...] -> time-folded
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, ILIF):
            m.register_forward_hook(lambda m, i, out, name=name: counts.__setitem__(
                name, torch.bincount(out.flatten().long(), minlength=5)))
    with torch.no_grad():
        for layer in model.model:
            i = layer.i
            if i == 0:
                x = stored["input"]
            else:
                x = [outputs[j if j >= 0 else i - 1] for j in ([layer.f] if isinstance(layer.f, int) else layer.f)]
                x = x[0] if isinstance(layer.f, int) else x
            out = layer(x)
            out = out[0] if i == 26 else out
            assert out.shape == outputs[i].shape, i
            assert (out - outputs[i]).abs().max().item() < 1e-5, i
    assert len(counts) == 88
    for name, hist in counts.items():
        assert torch.equal(hist, reference[f"fp32.lif.{name}.hist"]), name


def _damaged(edit):
    sy = read_spikeyolo(CKPT)
    edit(sy)
    return sy


def _rename_class(sy, path: str, name: str):
    """The module at `path` pickled as another class."""
    module = inert_class(name)()
    module.state = sy.modules[path].state
    sy.modules[path] = module


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.tensors.pop("model.6.0.conv1.body.0.weight"),
         r"no tensor for ems-yolo's 'model\.6\.0\.conv1\.body\.0\.weight'"),
        (lambda s: s.tensors.__setitem__("model.6.0.extra.weight", torch.zeros(1)),
         r"tensor 'model\.6\.0\.extra\.weight' has no ems-yolo counterpart"),
        (lambda s: s.tensors.__setitem__("model.10.conv.weight", torch.zeros(256, 512, 3, 3)),
         r"tensor 'model\.10\.conv\.weight' has shape \[256, 512, 3, 3\], ems-yolo's 'model\.10\.conv\.weight' "
         r"needs \[256, 512, 1, 1\]"),
        (lambda s: _rename_class(s, "model.8.Conv.pwconv3", "ultralytics.nn.modules.yolo_spikformer.MS_Attention"),
         r"model row 8 \(MS_ConvBlock\): module class ultralytics\.nn\.modules\.yolo_spikformer\.MS_Attention "
         r"\(at 'model\.8\.Conv\.pwconv3'\) has no ems-yolo counterpart"),
        (lambda s: s.yaml["head"].__setitem__(0, [-1, 1, "MS_Block", [512]]),
         r"model row 10 uses SpikeYOLO's module 'MS_Block', which has no ems-yolo counterpart"),
    ],
    ids=["missing", "extra", "shape", "unknown-class", "unknown-row"],
)
def test_mapping_errors_name_the_file_and_the_first_offending_key(edit, message, converted):
    sy = _damaged(edit)
    with pytest.raises(ValueError, match=message) as e:
        if "MS_Block" in str(sy.yaml["head"][0]):
            model_from_spikeyolo(sy)  # refused while translating the rows, before anything is built
        else:
            load_into(sy, deepcopy(converted[0]))
    assert str(e.value).startswith(f"{CKPT}: ") and "\n" not in str(e.value)
