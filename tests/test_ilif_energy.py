"""Energy of integer spikes (issue 24 item 6): an I-LIF spike of value k is k additions, firing rates per level."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ems_yolo.cli import app
from ems_yolo.energy.monitor import SpikeMonitor
from ems_yolo.energy.report import energy_report
from ems_yolo.nn import EMSDetectionModel
from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.layers import spike_conv


class TwoLayerILIF(nn.Module):
    """Real-input 1x1 conv (3 -> 4) tiled over T=2, I-LIF (D=4), integer-spike-fed 1x1 conv (4 -> 2).

    On a constant input of 1 the channel currents are (1.0, 2.6, 0.3, 5.0): u_0 = I gives spikes (1, 3, 0, 4);
    u_1 = (u_0 - s_0) / 4 + I = (1, 2.5, 0.375, 5.25) gives (1, 2, 0, 4) (2.5 rounds to even).
    """

    def __init__(self):
        super().__init__()
        self.enc = spike_conv(3, 4, 1, 1, spike_input=False)
        self.ilif = ILIF(2, 4)
        self.conv = spike_conv(4, 2, 1, 1, binary=False)
        with torch.no_grad():
            self.enc.weight.zero_()
            self.enc.weight[:, 0, 0, 0] = torch.tensor([1.0, 2.6, 0.3, 5.0])
            self.conv.weight.fill_(0.1)

    def forward(self, x):
        return self.conv(self.ilif(self.enc(x).repeat(2, 1, 1, 1)))


def test_hand_built_integer_energy():
    """SOPs = MACs x (mean spike value per step): 512 x (8/4 + 7/4); per-level rates over 8 neuron-steps."""
    rep = energy_report(TwoLayerILIF(), [torch.ones(2, 3, 8, 8)], 8)
    enc, conv = rep.layers
    assert (enc.kind, conv.kind, conv.macs, conv.source) == ("MAC", "AC", 4 * 2 * 64, "ilif")
    assert conv.step_rates == [2.0, 1.75] and conv.firing_rate == pytest.approx(15 / 8)
    assert conv.sops == pytest.approx(512 * 3.75)
    assert rep.e_snn_mj == pytest.approx((4.6 * 768 * 2 + 0.9 * 512 * 3.75) * 1e-9, rel=1e-12)
    assert rep.e_ann_mj == pytest.approx(4.6 * (768 + 512) * 1e-9, rel=1e-12) and rep.levels == 4
    (neuron,) = rep.neurons
    assert neuron.levels == [256, 128, 128, 256] and neuron.level_rates == [0.25, 0.25, 0.125, 0.125, 0.25]
    table = rep.table()
    assert "a spike of value k is k additions" in table and "0.2500 0.2500 0.1250 0.1250 0.2500" in table


def test_ilif_model_counts_spike_values(tiny_cfg):
    """A tiny EMS-ResNet10 with I-LIF neurons: every spike-fed conv reads integers 0..4, the monitor's rate is
    the mean spike value seen by independent hooks, and SOPs are MACs x those rates."""
    model = EMSDetectionModel(tiny_cfg(width=0.25, nc=2, time_steps=2, neuron={"kind": "ilif", "levels": 4}),
                              verbose=False).train()  # batch statistics: a random-init model fires
    convs = {n: m for n, m in model.named_modules() if getattr(m, "spike_input", False)}
    assert len(convs) > 10 and all(type(m) is nn.Conv2d for m in convs.values())  # no bool-saving SpikeConv2d
    seen = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].clone()))
               for n, m in convs.items()]
    x = torch.rand(2, 3, 32, 32)
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert mon.levels == 4
    above_one = 0
    for name, spikes in seen.items():
        s = spikes.reshape(2, -1).double()
        assert ((s == s.round()) & (s >= 0) & (s <= 4)).all()
        c = mon.conv_counts[name]
        assert c.step_rates == pytest.approx(s.mean(1).tolist(), abs=1e-12) and c.source is not None
        assert sum(c.levels) == s.count_nonzero()
        above_one += (s > 1).any().item()
    assert above_one  # integer spikes above 1 occur, and count as several additions
    model.eval()
    rep = energy_report(model, [x], 32)
    assert rep.levels == 4 and len(rep.neurons) == sum(isinstance(m, ILIF) for m in model.modules())


def test_energy_cli_on_ilif_model(tmp_path):
    """`ems-yolo energy` on an I-LIF model: integer-spike convention stated, per-level rates in energy.json."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.data.shapes import make_shapes_dataset
    from ems_yolo.engine.model import derive_model_yaml

    d = load_model_yaml("ems-res10.yaml")
    d.update(width_multiple=0.25, time_steps=2, neuron={"kind": "ilif", "levels": 4})
    data = make_shapes_dataset(n_train=4, n_val=2, imgsz=64)
    r = CliRunner().invoke(app, ["energy", f"model={derive_model_yaml(d)}", f"data={data}", "imgsz=64", "batch=2",
                                 "max_batches=1", f"project={tmp_path}", "name=e"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e" / "energy.json").read_text())
    assert rep["levels"] == 4 and any("k additions" in c for c in rep["conventions"])
    assert all(len(n["levels"]) == 4 for n in rep["neurons"])


def test_spikeyolo_convs_reading_spikes_are_found(tiny_cfg):
    """SpikeYOLO's blocks carry no tags: every conv that reads an I-LIF output is found while running and counted
    as additions (AC), the image-reading conv and the convs after BatchNorm inside the separable convs as MACs."""
    model = EMSDetectionModel(tiny_cfg("spikeyolo-n.yaml", width=0.125, nc=2), verbose=False).train()
    rep = energy_report(model, [torch.rand(1, 3, 32, 32)], 32)
    kinds = {r.name: (r.kind, r.source) for r in rep.layers}
    assert kinds["model.1.encode_conv"] == ("MAC", None)
    assert kinds["model.3.encode_conv"] == ("AC", "model.3.encode_lif")
    assert kinds["model.2.Conv.pwconv3.body.1.0"] == ("MAC", None)  # reads BN(spikes) padded, real values
    assert kinds["model.26.cv3.0.2.conv"] == ("AC", "model.26.cv3.0.2.lif")
    assert sum(k == "AC" for k, _ in kinds.values()) > 50 and rep.levels == 4
