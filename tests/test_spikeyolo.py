"""SpikeYOLO's blocks, head and model YAMLs (issue 24 items 2 and 3): parameter counts equal to the original code's,
time-folded blocks, the anchor-free SpikeDetect head trained with Ultralytics' v8 loss."""

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn import EMSDetectionModel
from ems_yolo.nn.dry_run import dry_run
from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.spikeyolo import BNAndPad, SpikeDetect

# the original code's counts for nc=80 (its parse_model on snn_yolov8.yaml; the -paper YAMLs apply the YAML's own
# comment on layer 25: MS_ConvBlock [2, 7])
ORIGINAL_PARAMS = {
    "spikeyolo-n.yaml": 13_271_632,
    "spikeyolo-s.yaml": 23_153_024,
    "spikeyolo-m.yaml": 45_784_256,
    "spikeyolo-l.yaml": 65_517_760,
    "spikeyolo-m-paper.yaml": 47_841_856,
    "spikeyolo-l-paper.yaml": 68_478_400,
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_parameter_counts_equal_the_original(name):
    """Built and run on the meta device (no allocation): every row builds and runs, and the counts match."""
    sizes = dry_run(load_model_yaml(name), 3, (256, 256))
    assert sizes.params == ORIGINAL_PARAMS[name]


@pytest.fixture(scope="module")
def tiny_model() -> EMSDetectionModel:
    """spikeyolo-n at 1/8 of its width, 2 classes (copy it before changing it)."""
    d = load_model_yaml("spikeyolo-n.yaml")
    d.update(width_multiple=0.125, nc=2)
    return EMSDetectionModel(d, verbose=False)


def test_tiny_model_outputs_and_neurons(tiny_model):
    model = deepcopy(tiny_model).eval()
    head = model.model[-1]
    assert isinstance(head, SpikeDetect) and head.reg_max == 16 and model.stride.tolist() == [8, 16, 32]
    neurons = [m for m in model.modules() if isinstance(m, ILIF)]
    assert neurons and all(m.levels == 4 and m.tau == 0.25 for m in neurons)
    with torch.no_grad():
        y, preds = model(torch.rand(2, 3, 64, 96))
    n = 8 * 12 + 4 * 6 + 2 * 3
    assert y.shape == (2, 4 + 2, n)
    assert [tuple(f.shape) for f in preds["feats"]] == [(2, 64 + 2, 8, 12), (2, 66, 4, 6), (2, 66, 2, 3)]
    # decoded = DFL expectation of the raw box logits around each anchor, scores = sigmoid of the class logits
    raw0 = preds["feats"][0]
    assert torch.allclose(y[:, 4:, : 8 * 12], raw0[:, 64:].flatten(2).sigmoid())
    dist = raw0[:, :64].view(2, 4, 16, -1).softmax(2).mul(torch.arange(16.0).view(1, 1, 16, 1)).sum(2)
    cx = (torch.arange(12.0) + 0.5).repeat(8)
    w = dist[:, 0] + dist[:, 2]
    assert torch.allclose(y[:, 2, : 8 * 12], w * 8, atol=1e-5)
    assert torch.allclose(y[:, 0, : 8 * 12], (cx + (dist[:, 2] - dist[:, 0]) / 2) * 8, atol=1e-4)


def test_time_steps_fold_into_the_batch(tiny_model):
    """T=2: each sample's output does not depend on the other samples of the batch (time-major folding)."""
    model = deepcopy(tiny_model).eval()
    model.set_time_steps(2)
    assert all(m.time_steps == 2 for m in model.modules() if isinstance(m, ILIF))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        both = model(x)[0]
        alone = torch.cat([model(x[i : i + 1])[0] for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


def test_v8_loss_from_the_head_and_backward(tiny_model):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    model = deepcopy(tiny_model).train()
    model.args = get_cfg()
    assert isinstance(model.init_criterion(), v8DetectionLoss)
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [1.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5]])}
    loss, items = model.loss(batch)
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss"} and all(v > 0 for v in items.values())
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and grads[0].abs().sum() > 0  # reaches the first conv through I-LIFs


def test_bn_and_pad_border_is_bn_of_zero():
    """BNAndPad: BN inside, and a border holding BN(0), so 1x1 -> BNAndPad -> unpadded 3x3 equals the padded chain
    with the 1x1 conv's zero padding seen through BN."""
    layer = BNAndPad(1, 4)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 2)
        layer.bn.bias.uniform_(-1, 1)
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
    layer.eval()
    x = torch.randn(2, 4, 5, 6)
    y = layer(x)
    assert y.shape == (2, 4, 7, 8)
    assert torch.equal(y[:, :, 1:-1, 1:-1], layer.bn(x))
    zero = layer.bn(torch.zeros(1, 4, 1, 1)).view(1, 4, 1)
    for border in (y[:, :, 0], y[:, :, -1], y[:, :, :, 0], y[:, :, :, -1]):
        assert torch.allclose(border, zero.expand_as(border), atol=1e-6)
    w = torch.randn(3, 4, 3, 3)
    padded_input = F.pad(x, [1] * 4)  # BN of the padded input = the border of BN(0)
    assert torch.allclose(F.conv2d(y, w), F.conv2d(layer.bn(padded_input), w), atol=1e-5)


def test_spike_detect_refuses_a_yolov5_loss_section(tiny_cfg):
    with pytest.raises(ValueError, match="v8 loss.*box=, cls= and dfl="):
        EMSDetectionModel(tiny_cfg("spikeyolo-n.yaml", width=0.125, loss={"box": 0.05}), verbose=False)


def test_info_prints_the_original_count():
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "ems-yolo"
    r = subprocess.run([str(exe), "info", "model=spikeyolo-s.yaml"], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SpikeConvBlock" in out and "SpikeDetect" in out
    summary = [line for line in out.splitlines() if "summary:" in line][-1]
    assert "23,153,024 parameters" in summary and "121.1 GFLOPs per time step" in summary  # README: SpikeYOLO


@pytest.mark.slow
def test_tiny_model_exports_to_onnx_equal_to_pytorch(tmp_path):
    """ONNX export through the engine (I-LIF's traceable loop, BNAndPad's border as Pad + Where): ONNX == PyTorch."""
    import onnxruntime

    from ems_yolo import EMSYOLO
    from ems_yolo.engine.model import derive_model_yaml

    d = load_model_yaml("spikeyolo-n.yaml")
    d.update(width_multiple=0.125, nc=2)
    model = EMSYOLO(str(derive_model_yaml(d)))
    for m in model.model.modules():  # statistics that make the neurons fire at every level
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 1.0)
    onnx = model.export(format="onnx", imgsz=64)
    x = torch.rand(1, 3, 64, 64)  # exported with a fixed batch of 1
    sess = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model.model.float().eval()(x)[0]
    assert out.shape == ref.shape == (1, 6, 84)
    assert torch.allclose(out, ref, atol=1e-3)


def test_time_repeat_frames_and_event_bins():
    """Frames: the image at each of the T steps (SpikeYOLO's MS_GetT); events: the T time-major bins of the
    channels, step t of the folded batch holding bin t."""
    from ems_yolo.nn.spikeyolo import TimeRepeat

    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(TimeRepeat(3, time_steps=3)(x), torch.cat([x, x, x]))
    assert TimeRepeat.out_channels(6, time_steps=3, input_kind="events") == 2
    events = torch.rand(2, 6, 8, 8)  # T=3 bins x 2 polarities
    out = TimeRepeat(6, time_steps=3, input_kind="events")(events)
    assert out.shape == (6, 2, 8, 8)
    assert torch.equal(out[1 * 2 + 0], events[0, 2:4]) and torch.equal(out[2 * 2 + 1], events[1, 4:6])
    with pytest.raises(ValueError, match="not a multiple of time_steps=4"):
        TimeRepeat(6, time_steps=4, input_kind="events")
