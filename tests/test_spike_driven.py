"""Spike-driven inference (issue 24 item 5): an I-LIF model rewritten as a binary-spike model at T x D sub-steps
gives the integer model's outputs (float64), every spike-fed conv reads 0/1 spikes, and the energy report of the
binary model counts the same additions."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ems_yolo.cli import app
from ems_yolo.cli import run as cli_run
from ems_yolo.energy.monitor import SpikeMonitor
from ems_yolo.energy.report import energy_report
from ems_yolo.nn import EMSDetectionModel
from ems_yolo.nn.spike_driven import ThermometerILIF, fold_rep_conv, to_spike_driven
from ems_yolo.nn.spikeyolo import RepConv, SepRepConv

ILIF4 = {"kind": "ilif", "levels": 4}


def _firing(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affines, so that inference fires at every level 0..4."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2.5)
                m.bias.uniform_(-0.5, 1.5)
    return model.double().eval()


def _compare(model: nn.Module, x: torch.Tensor) -> nn.Module:
    binary = to_spike_driven(model)
    with torch.no_grad(), SpikeMonitor(model) as integer_spikes:
        y, raw = model(x)
    with torch.no_grad(), SpikeMonitor(binary) as binary_spikes:  # strict: every spike-fed conv reads 0/1
        yb, rawb = binary(x)
    torch.testing.assert_close(yb, y, rtol=1e-10, atol=1e-9)
    raw, rawb = (r["feats"] if isinstance(r, dict) else r for r in (raw, rawb))
    for a, b in zip(raw, rawb):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-9)
    levels = np.sum([n.levels for n in integer_spikes.neuron_counts.values()], 0)
    assert integer_spikes.levels == 4 and (levels > 0).all()  # integer spikes 1, 2, 3 and 4 all occur
    assert binary_spikes.levels == 1 and binary_spikes.time_steps == 4 * integer_spikes.time_steps
    # the binary spikes of each neuron sum to its integer spikes: same spike totals
    assert [n.spikes for n in integer_spikes.neuron_counts.values()] == [
        list(np.reshape(n.spikes, (-1, 4)).sum(1)) for n in binary_spikes.neuron_counts.values()]
    return binary


def test_ems_ilif_model_equals_its_binary_form(tiny_cfg):
    model = _firing(EMSDetectionModel(tiny_cfg(width=0.25, nc=2, time_steps=2, neuron=ILIF4), verbose=False))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    binary = _compare(model, x)
    assert sum(isinstance(m, ThermometerILIF) for m in binary.modules()) > 10
    # energy: the binary model's spike-fed convs add the same number of times as the integer model's
    rep_int, rep_bin = (energy_report(m, [x], 32) for m in (model, binary))
    assert [r.kind for r in rep_int.layers] == [r.kind for r in rep_bin.layers]
    assert rep_bin.sops == pytest.approx(rep_int.sops, rel=1e-12) and rep_bin.e_snn_mj == pytest.approx(
        rep_int.e_snn_mj, rel=1e-12)
    assert all(r.firing_rate <= 1 for r in rep_bin.layers if r.kind == "AC") and rep_bin.levels == 1
    assert any(r.firing_rate > 1 for r in rep_int.layers if r.kind == "AC")
    assert "spike-driven model: T x D = 8 binary sub-steps (D = 4)" in rep_bin.table()


def test_spikeyolo_equals_its_binary_form(tiny_cfg):
    """spikeyolo-s as shipped (nc=2) at 32x32: its re-parameterisable chains fold into one conv each, so every conv
    after the image-reading one reads binary spikes (additions only), except the DFL integral after the mean."""
    model = _firing(EMSDetectionModel(tiny_cfg("spikeyolo-s.yaml", width=0.5, nc=2), verbose=False))
    binary = _compare(model, torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert not any(isinstance(m, (RepConv, SepRepConv)) for m in binary.modules())
    rep = energy_report(binary, [torch.rand(1, 3, 32, 32, dtype=torch.float64)], 32)
    assert [r.name for r in rep.layers if r.kind == "MAC"] == ["model.1.module.encode_conv", "model.26.dfl.conv"]


@pytest.mark.parametrize("cls", [RepConv, SepRepConv])
def test_rep_conv_folds_exactly(cls):
    torch.manual_seed(1)
    m = _firing(cls(6, 5))
    x = torch.randint(0, 5, (2, 6, 9, 9)).double()
    with torch.no_grad():
        torch.testing.assert_close(fold_rep_conv(m)(x), m(x), rtol=1e-12, atol=1e-12)


def test_refused_without_ilif(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg(width=0.25, nc=2), verbose=False)
    with pytest.raises(ValueError, match=r"^spike_driven=True needs a model with I-LIF neurons \(neuron: \{kind: "
                                         r"ilif\}\), got one with LIF"):
        to_spike_driven(model)


def test_export_and_energy_cli(tmp_path, capsys):
    """`ems-yolo export ... spike_driven=True` writes an ONNX model of the binary form that gives the integer
    model's outputs; `ems-yolo energy ... spike_driven=True` reports it; a LIF model is one line, exit 2."""
    import onnxruntime

    from ems_yolo import EMSYOLO
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.engine.model import derive_model_yaml

    d = load_model_yaml("ems-res10.yaml")
    d.update(width_multiple=0.25, time_steps=2, nc=2, neuron=ILIF4)
    yaml_file = derive_model_yaml(d)
    pt = tmp_path / "ilif.pt"
    model = EMSYOLO(yaml_file)
    _firing(model.model).float()
    model.save(pt)
    run = CliRunner().invoke(app, ["export", f"model={pt}", "format=onnx", "imgsz=64", "spike_driven=True"])
    assert run.exit_code == 0, run.output
    onnx_file = pt.with_suffix(".onnx")
    x = torch.rand(1, 3, 64, 64)
    session = onnxruntime.InferenceSession(str(onnx_file))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    with torch.no_grad():
        ref = EMSYOLO(pt).model.eval()(x)[0]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-3)
    run = CliRunner().invoke(app, ["energy", f"model={pt}", "data=shapes", "imgsz=64", "max_batches=1",
                                   "spike_driven=True", f"project={tmp_path}", "name=e"])  # as the README shows
    assert run.exit_code == 0, run.output
    assert "spike-driven model: T x D = 8 binary sub-steps" in (tmp_path / "e" / "energy.json").read_text()
    lif = load_model_yaml("ems-res10.yaml")
    lif.update(width_multiple=0.25)
    code = cli_run(["export", f"model={derive_model_yaml(lif)}", "format=onnx", "imgsz=64", "spike_driven=True"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error: spike_driven=True needs a model with I-LIF neurons" in err[0]
