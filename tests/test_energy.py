"""Energy tool (energy-spec): spike monitor, MAC counts, Eq. (6) energy, ANN-twin energy, report files."""

import csv
import json

import pytest
import torch
from torch import nn

from ems_yolo.cfg import load_model_yaml
from ems_yolo.energy.monitor import SpikeMonitor
from ems_yolo.energy.report import ENERGY_PRESETS, energy_constants, energy_report
from ems_yolo.nn import LIF, EMSDetectionModel, SiLUNeuron
from ems_yolo.nn.blocks import EMSBlock1, EMSBlock2, MSBlock
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import EncodingConv, spike_conv
from ems_yolo.nn.model import ann_twin

T_HAND = 3


class TwoLayer(nn.Module):
    """Encoding-style 1x1 conv (real input, 3 -> 4) tiled over T, LIF, spike-fed 1x1 conv (4 -> 2).

    Only input channel 0 is used, with gains (1.0, 0.45, 0.0, 0.45): on a constant input of 1 the LIF channels
    fire (1,1,1), (0,1,0), (0,0,0), (0,1,0) over T=3 (model-spec §2.3 worked example for 0.45).
    """

    def __init__(self):
        super().__init__()
        self.enc = spike_conv(3, 4, 1, 1, spike_input=False)
        self.lif = LIF(T_HAND)
        self.conv = spike_conv(4, 2, 1, 1)
        with torch.no_grad():
            self.enc.weight.zero_()
            self.enc.weight[:, 0, 0, 0] = torch.tensor([1.0, 0.45, 0.0, 0.45])
            self.conv.weight.fill_(0.1)

    def forward(self, x):
        return self.conv(self.lif(self.enc(x).repeat(T_HAND, 1, 1, 1)))


def tiny(tiny_cfg, name="ems-res10.yaml", **kw):
    return EMSDetectionModel(tiny_cfg(name, width=0.25, nc=2, **kw), verbose=False)


def independent_macs(model: EMSDetectionModel, size: int) -> tuple[int, int]:
    """(spike-fed, real-input) MACs per step, walking the rows with their strides and the spec's classification."""

    def macs(conv: nn.Conv2d, hw: int) -> int:
        return conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * hw * hw

    res, ac, mac = [], 0, 0
    for m in model.model:
        r_in = size if not res else res[m.f] if isinstance(m.f, int) else [res[j] for j in m.f]
        if isinstance(m, EncodingConv):
            r_out = r_in // m.conv.stride[0]
            mac += macs(m.conv, r_out)
        elif isinstance(m, (EMSBlock1, EMSBlock2, MSBlock)):
            r_out = r_in // m.residual[0].conv.stride[0]
            ac += sum(macs(lcb.conv, r_out) for lcb in m.residual)
            if isinstance(m, EMSBlock2) and m.new is not None:
                ac += macs(m.new.conv, r_in)  # pool order "last": shortcut conv at input resolution
            elif isinstance(m, EMSBlock1) and not isinstance(m.shortcut, nn.Identity):
                ac += macs(m.shortcut[1].conv, r_out)  # MaxPool -> LCB (LIF -> conv -> tdBN)
            elif isinstance(m, MSBlock) and not isinstance(m.shortcut, nn.Identity):
                mac += macs(m.shortcut[1], r_out)  # MaxPool -> conv on the real-valued input
        elif isinstance(m, nn.Upsample):
            r_out = r_in * 2
        elif isinstance(m, EMSDetect):
            mac += sum(macs(conv, r) for conv, r in zip(m.m, r_in))
            r_out = None
        else:  # Concat
            r_out = r_in[0]
        res.append(r_out)
    return ac, mac


def test_presets():
    assert energy_constants("fp32") == (4.6, 0.9) == ENERGY_PRESETS["fp32"]
    assert energy_constants("INT8") == (0.23, 0.03)
    with pytest.raises(ValueError, match="fp16"):
        energy_constants("bf16")


def test_mac_counts_match_independent_count():
    """EMS-Res10 at 320x320, nc=2 (energy-spec §4): 1.463 G MACs per step, 1.382 G fed by spikes."""
    model = EMSDetectionModel("ems-res10.yaml", nc=2, time_steps=1, verbose=False)
    rep = energy_report(model, [torch.rand(1, 3, 64, 64)], 320)  # rates from a small batch, MACs at 320x320
    ac, mac = independent_macs(model, 320)
    assert (rep.op_ac, rep.op_mac) == (ac, mac)
    assert rep.ann_macs == ac + mac  # frame model: the ANN twin has the same convs
    assert (ac + mac) / 1e9 == pytest.approx(1.463, abs=6e-4)
    assert ac / 1e9 == pytest.approx(1.382, abs=6e-4)
    enc = next(r for r in rep.layers if r.name == "model.0.conv")
    assert (enc.kind, enc.macs, enc.firing_rate) == ("MAC", 3 * 32 * 9 * 160 * 160, None)


def test_ann_energy_res34():
    """E_ANN of EMS-Res34 at 320x320, nc=2 = 4.294 G x 4.6 pJ = 19.75 mJ (energy-spec §6.1), frames or events."""
    for kw in ({}, {"input": "events", "time_steps": 5}):
        model = EMSDetectionModel({**load_model_yaml("ems-res34.yaml"), "nc": 2, **kw}, ch=15 if kw else 3,
                                  verbose=False)
        rep = energy_report(model, [torch.rand(1, 15 if kw else 3, 320, 320)], 320)
        assert rep.e_ann_mj == pytest.approx(19.75, abs=0.01)
        assert rep.ann_macs == rep.op_ac + rep.op_mac  # the ANN twin runs the same convs once


def test_firing_rates_equal_independent_hooks(tiny_cfg):
    model = tiny(tiny_cfg, time_steps=3).train()  # batch statistics: a random-init model fires (eval: silent)
    T = 3
    seen: dict[str, list[torch.Tensor]] = {}
    convs = {n: m for n, m in model.named_modules() if getattr(m, "spike_input", False)}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].clone()))
        for n, m in convs.items()
    ]
    batches = [torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64)]
    with SpikeMonitor(model) as mon, torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    counts = mon.conv_counts
    assert set(counts) == set(convs) and len(convs) > 10
    rates = []
    for name, xs in seen.items():
        spikes = torch.cat([x.reshape(T, -1) for x in xs], 1).double()
        assert ((spikes == 0) | (spikes == 1)).all()
        c = counts[name]
        assert c.elements == spikes.shape[1]
        assert c.step_rates == pytest.approx(spikes.mean(1).tolist(), abs=1e-12)
        assert c.rate == pytest.approx(spikes.mean().item(), abs=1e-12)
        assert 0 <= c.rate <= 1
        rates.append(c.rate)
        # every spike-fed conv reads a LIF output, whose own rate is the same
        assert c.source is not None and mon.neuron_counts[c.source].spikes == c.spikes
    assert 0 < min(rates) and max(rates) < 1


def test_hand_built_energy():
    """E = E_MAC * 768 MACs * T + E_AC * 512 MACs * (1/4 + 3/4 + 1/4), per sample."""
    model = TwoLayer()
    ones = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    rep = energy_report(model, [{"img": ones}, torch.ones(3, 3, 8, 8)], 8)
    enc, conv = rep.layers
    assert (enc.kind, enc.macs, conv.kind, conv.macs) == ("MAC", 3 * 4 * 64, "AC", 4 * 2 * 64)
    assert conv.step_rates == [0.25, 0.75, 0.25] and conv.firing_rate == pytest.approx(5 / 12)
    assert conv.source == "lif" and rep.samples == 5 and rep.time_steps == 3
    assert conv.sops == pytest.approx(512 * 5 / 4)
    assert rep.e_snn_mj == pytest.approx((4.6 * 768 * 3 + 0.9 * 640) * 1e-9, rel=1e-12)
    assert rep.e_ann_mj == pytest.approx(4.6 * (768 + 512) * 1e-9, rel=1e-12)
    assert rep.ratio == pytest.approx(5888 / 11174.4)
    assert [n.name for n in rep.neurons] == ["lif"] and rep.neurons[0].rate == pytest.approx(5 / 12)
    int8 = energy_report(model, [torch.ones(1, 3, 8, 8)], 8, preset="int8")
    assert int8.e_snn_mj == pytest.approx((0.23 * 768 * 3 + 0.03 * 640) * 1e-9) and int8.preset == "int8"


@pytest.mark.parametrize("T", [1, 3])
def test_all_firing_gives_eq6(tiny_cfg, T):
    """Every LIF firing (fr = 1): E_SNN = T * (E_AC * OP_AC + E_MAC * OP_MAC) (energy-spec §6.2 for T = 1)."""
    model = tiny(tiny_cfg, time_steps=T)
    for m in model.modules():
        if isinstance(m, LIF):
            m.vth = float("-inf")
    rep = energy_report(model, [torch.rand(2, 3, 64, 64)], 64)
    assert all(r.firing_rate == 1 for r in rep.layers if r.kind == "AC")
    assert rep.mean_firing_rate == 1
    assert rep.e_snn_mj == pytest.approx(T * (0.9 * rep.op_ac + 4.6 * rep.op_mac) * 1e-9, rel=1e-12)


def test_silu_pseudo_neuron_never_reported(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg("ems-res34-coco.yaml", width=0.25, time_steps=2), verbose=False)
    silu = [n for n, m in model.named_modules() if isinstance(m, SiLUNeuron)]
    assert silu
    rep = energy_report(model, [torch.rand(1, 3, 64, 64)], 64)
    table = rep.table()
    assert not any(n in table for n in silu)
    assert not {n.name for n in rep.neurons} & set(silu)
    assert {n.name for n in rep.neurons} == {n for n, m in model.named_modules() if isinstance(m, LIF)}
    for row in rep.layers:  # convs reading SiLU outputs or producing SiLU inputs are MAC layers without a rate
        if row.name.startswith(("model.10.", "model.14.", "model.15.")):
            assert row.kind == "MAC" and row.firing_rate is None
    assert "E_ANN" in table and "Caveats" in table and "counted T=2 times" in table


def test_nonbinary_input_is_caught(tiny_cfg):
    """A conv tagged as spike-fed that receives real values (its LIF removed) is reported, not counted."""
    model = tiny(tiny_cfg).eval()
    model.model[1].residual[0].lif = nn.Identity()
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="non-binary"), torch.no_grad(), SpikeMonitor(model):
        model(x)
    with SpikeMonitor(model, strict=False) as mon, torch.no_grad():
        model(x)
    assert mon.nonbinary == {"model.1.residual.0.conv"}
    with pytest.raises(ValueError, match="non-binary"):
        energy_report(model, [x], 64)


def test_ann_twin_is_all_mac(tiny_cfg):
    """Every conv of the ANN twin reads real values: E_SNN of the twin is E_ANN (ratio 1)."""
    twin = EMSDetectionModel(ann_twin(tiny_cfg("ems-res10.yaml", width=0.25, nc=2)), verbose=False)
    assert not any(getattr(m, "spike_input", False) for m in twin.modules())
    rep = energy_report(twin, [torch.rand(1, 3, 64, 64)], 64)
    assert rep.op_ac == 0 and rep.e_snn_mj == pytest.approx(rep.e_ann_mj) and rep.ratio == pytest.approx(1.0)


def test_hooks_off_leave_training_unchanged(tiny_cfg):
    model = tiny(tiny_cfg, time_steps=2).train()
    x = torch.rand(2, 3, 64, 64)

    def step():
        model.zero_grad()
        out = model(x)
        sum((o * torch.arange(o.numel()).view_as(o).sin()).sum() for o in out).backward()
        return [o.detach().clone() for o in out], [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grad = step()
    mon = SpikeMonitor(model)
    with_out, with_grad = step()
    assert mon.conv_counts and mon.neuron_counts
    mon.remove()
    mon.remove()  # idempotent
    after_out, after_grad = step()
    for outs, grads in ((with_out, with_grad), (after_out, after_grad)):
        assert all(torch.equal(a, b) for a, b in zip(ref_out, outs))
        assert all(torch.equal(a, b) for a, b in zip(ref_grad, grads))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_report_files(tmp_path):
    rep = energy_report(TwoLayer(), [torch.ones(1, 3, 8, 8)], 8)
    csv_path, json_path, png_path = (tmp_path / "out" / f"energy.{e}" for e in ("csv", "json", "png"))
    assert rep.to_csv(csv_path) == csv_path
    rep.to_json(json_path)
    rep.plot_firing_rates(png_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == ["enc", "conv"]
    assert rows[0]["firing_rate"] == "" and float(rows[1]["fr_t1"]) == 0.75 and rows[1]["source"] == "lif"
    assert float(rows[1]["energy_mj"]) == pytest.approx(0.9 * 640 * 1e-9)
    data = json.loads(json_path.read_text())
    assert data["e_snn_mj"] == pytest.approx(rep.e_snn_mj) and data["ratio"] == pytest.approx(rep.ratio)
    assert data["preset"] == "fp32" and data["time_steps"] == 3 and len(data["layers"]) == 2
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["energy.csv", "energy.json", "energy.png"]
