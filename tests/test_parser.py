"""YAML parser: row validation, module resolution order, string args, width scaling, clear errors."""

import pytest
import torch
from torch import nn

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn import EMSDetectionModel, parse_model
from ems_yolo.nn.blocks import MSBlock
from ems_yolo.nn.neuron import ReLUNeuron


def _rows(backbone, head=None, **extra):
    return {"nc": 2, "time_steps": 2, "anchors": [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169, 344, 319]],
            "backbone": backbone, "head": head or [], **extra}


def test_unknown_module_names_row_and_lists_known():
    d = _rows([[-1, 1, "EncodingConv", [8, 3, 2]], [-1, 1, "EMSBlockX", [16, 3, 2]]])
    with pytest.raises(ValueError) as e:
        parse_model(d, ch=3)
    msg = str(e.value)
    assert "row 1" in msg and "EMSBlockX" in msg and "EMSBlock2" in msg and "MSBlock" in msg


@pytest.mark.parametrize(
    "row, match",
    [
        ([-1, 1, "MSBlock"], "expected \\[from, repeats, module, args\\]"),
        ([-1, 0, "MSBlock", [8]], "repeats must be a positive integer"),
        ([5, 1, "MSBlock", [8]], "'from' must be -1 or indices of earlier rows"),
        ([-1, 1, "MSBlock", 8], "args must be a list"),
        ([-1, 1, "EMSBlock2", [4, 3, 1]], "cannot build EMSBlock2.*c1 <= c2"),
    ],
)
def test_bad_rows(row, match):
    d = _rows([[-1, 1, "EncodingConv", [8, 3, 2]], row])
    with pytest.raises(ValueError, match=match):
        parse_model(d, ch=3)


def test_fallback_to_ultralytics_and_torch_modules():
    d = _rows([
        [-1, 1, "EncodingConv", [8, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],          # ultralytics Conv(c1, c2, k, s)
        [-1, 1, "nn.MaxPool2d", [2, 2]],      # torch, channel preserving
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
        [[-1, 1], 1, "Concat", [1]],
        [-1, 2, "MSBlock", [24, 3, 1]],
    ])
    layers, save = parse_model(d, ch=3)
    assert [m.type for m in layers] == ["EncodingConv", "Conv", "nn.MaxPool2d", "nn.Upsample", "Concat", "MSBlock"]
    assert save == [1]
    assert isinstance(layers[5], nn.Sequential) and len(layers[5]) == 2
    assert layers[5][0].residual[0].conv.in_channels == 32 and layers[5][1].residual[0].conv.in_channels == 24
    assert isinstance(layers[5][1].shortcut, nn.Identity)  # repeats map c2 -> c2


def test_width_and_depth_multiples_and_string_args():
    d = load_model_yaml("ems-res34.yaml")
    d.update(width_multiple=0.25, depth_multiple=0.5, nc=3)
    model = EMSDetectionModel(d, verbose=False)
    assert model.model[0].conv.out_channels == 8
    stage = model.model[6]  # 5 x MSBlock at depth 0.5 -> round(2.5) = 2
    assert isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[0], MSBlock)
    head = model.model[-1]
    assert head.nc == 3 and head.m[0].out_channels == 3 * 8
    assert head.m[0].in_channels == 64 and head.m[1].in_channels == 128


def test_neuron_settings_reach_every_neuron():
    from ems_yolo.nn import LIF

    d = load_model_yaml("ems-res10.yaml")
    d["neuron"] = {"tau": 0.5, "vth": 0.3, "surrogate": "sigmoid"}
    d["time_steps"] = 3
    model = EMSDetectionModel(d, nc=2, verbose=False)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert lifs and all(m.tau == 0.5 and m.vth == 0.3 and m.surrogate == "sigmoid" and m.time_steps == 3 for m in lifs)
    assert torch.allclose(model.model[0].bn.weight, torch.tensor(0.3))  # tdBN gamma = alpha * Vth


def test_relu_neuron_builds_ann_twin():
    d = load_model_yaml("ems-res10.yaml")
    d.update(neuron={"kind": "relu"}, time_steps=1, width_multiple=0.25)
    model = EMSDetectionModel(d, nc=2, verbose=False)
    from ems_yolo.nn import LIF

    assert not any(isinstance(m, LIF) for m in model.modules())
    assert any(isinstance(m, ReLUNeuron) for m in model.modules())
    y, _ = model.eval()(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 6, 3 * (16 + 4))


def test_model_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in models: .*ems-res10.yaml"):
        load_model_yaml("no-such-model.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: 2\nbackbone: []\n")
    with pytest.raises(ValueError, match="missing required key 'head'"):
        load_model_yaml(bad)
    bad.write_text("nc: 2\nbackbone: [\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_model_yaml(bad)
    d = load_model_yaml("ems-res10.yaml")
    d["neuron"] = {"kind": "izhikevich"}
    with pytest.raises(ValueError, match="neuron.kind"):
        EMSDetectionModel(d, verbose=False)
