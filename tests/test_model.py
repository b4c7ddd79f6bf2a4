"""EMS-ResNet models built from the YAMLs: parameter counts, shapes, spike-only convs, tdBN init, training."""

import pytest
import torch
from torch import nn

from ems_yolo.nn import EMSDetectionModel, EncodingConv, TDBatchNorm2d
from ems_yolo.nn.blocks import EMSBlock1, EMSBlock2, MSBlock
from ems_yolo.nn.flops import conv_ops


@pytest.mark.parametrize(
    "name, nc, params",
    [
        ("ems-res10.yaml", 2, 6_207_050),
        ("ems-res18.yaml", 2, 9_343_370),
        ("ems-res34.yaml", 2, 14_399_306),
        ("ems-res34-coco.yaml", 80, 25_449_022),
    ],
)
def test_paper_parameter_counts(name, nc, params):
    model = EMSDetectionModel(name, nc=nc, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.stride.tolist() == [16.0, 32.0]


def test_frame_forward_shapes():
    model = EMSDetectionModel("ems-res10.yaml", nc=2, time_steps=4, verbose=False).eval()
    with torch.no_grad():
        y, raw = model(torch.rand(2, 3, 320, 320))
    assert y.shape == (2, 4 + 2, 3 * (20 * 20 + 10 * 10))
    assert [tuple(r.shape) for r in raw] == [(2, 3, 20, 20, 7), (2, 3, 10, 10, 7)]
    assert (y[:, 4:] >= 0).all() and (y[:, 4:] <= 1).all()
    model.train()
    out = model(torch.rand(2, 3, 320, 320))
    assert isinstance(out, list) and [tuple(r.shape) for r in out] == [(2, 3, 20, 20, 7), (2, 3, 10, 10, 7)]


def test_event_forward_shapes(tiny_cfg):
    """T=5 bins x 3 channels, a 240x304 Gen1 frame letterboxed by Ultralytics to 256x320."""
    cfg = tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=5, input="events")
    model = EMSDetectionModel(cfg, ch=15, verbose=False).eval()
    with torch.no_grad():
        y, _ = model(torch.rand(2, 15, 256, 320))
    assert y.shape == (2, 6, 3 * (16 * 20 + 8 * 10))
    with pytest.raises(ValueError, match=r"\[B, 15, H, W\]"):
        model(torch.rand(2, 3, 256, 320))


def test_event_channels_must_split_into_bins(tiny_cfg):
    with pytest.raises(ValueError, match="not a multiple of time_steps"):
        EMSDetectionModel(tiny_cfg(time_steps=5, input="events"), ch=12, verbose=False)


def test_event_bins_feed_their_time_step():
    """Channel t*C + c of the model input reaches step t of the network."""
    enc = EncodingConv(6, 4, 3, 2, time_steps=3, input_kind="events").eval()
    x = torch.zeros(1, 6, 8, 8)
    x[:, 2:4] = 1.0  # bin 1 only
    y = enc(x).view(3, 1, 4, 4, 4)
    base = enc(torch.zeros(1, 6, 8, 8)).view(3, 1, 4, 4, 4)
    changed = [(y[t] - base[t]).abs().sum().item() > 0 for t in range(3)]
    assert changed == [False, True, False]


def test_frame_encoding_broadcast_equals_per_step():
    """Encoding once and tiling equals encoding the repeated input (train mode, BN batch statistics)."""
    T = 3
    enc = EncodingConv(3, 8, 3, 2, time_steps=T).train()
    x = torch.randn(2, 3, 16, 16)
    fast = enc(x)
    slow = enc.bn(enc.conv(x.repeat(T, 1, 1, 1)))
    assert torch.allclose(fast, slow, atol=1e-5)


def test_tdbn_init_and_untouched_hyperparameters():
    model = EMSDetectionModel("ems-res18.yaml", nc=2, verbose=False)
    for m in model.modules():
        if isinstance(m, (EMSBlock1, EMSBlock2, MSBlock)):
            assert torch.all(m.residual[0].bn.weight == 0.5)
            assert torch.allclose(m.residual[-1].bn.weight, torch.tensor(0.1))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, TDBatchNorm2d) and m.eps == 1e-5 and m.momentum == 0.1 for m in bns)
    assert torch.all(model.model[0].bn.weight == 0.5)


@pytest.mark.parametrize("name", ["ems-res18.yaml", "ems-res34-coco.yaml"])
def test_convs_read_spikes_except_documented_real_inputs(tiny_cfg, name):
    """Forward hooks: every conv tagged spike_input sees only {0, 1}; the others (encoding, MS projection,
    SiLU conv, detection) see real values."""
    model = EMSDetectionModel(tiny_cfg(name, width=0.25, nc=3, time_steps=2), verbose=False).train()
    seen = {}
    for name_, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out, n=name_: seen.__setitem__(n, (mod.spike_input, inp[0])))
    model(torch.rand(2, 3, 64, 64))
    assert len(seen) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    real = []
    for n, (spiking, x) in seen.items():
        binary = bool(((x == 0) | (x == 1)).all())
        assert binary == spiking, n
        if not spiking:
            real.append(n)
    assert "model.0.conv" in real and any(n.startswith("model.15.m") for n in real)


def test_head_average_before_or_after_conv():
    model = EMSDetectionModel("ems-res10.yaml", nc=2, time_steps=3, verbose=False).eval()
    head = model.model[-1]
    feats = [torch.rand(3 * 2, 256, 4, 4), torch.rand(3 * 2, 512, 2, 2)]
    _, raw = head(feats)
    for i, f in enumerate(feats):
        h, w = f.shape[-2:]
        per_step = head.m[i](f).view(3, 2, 3, 7, h, w).mean(0)  # conv at each step, then average the logits
        per_step = per_step.permute(0, 1, 3, 4, 2)
        assert torch.allclose(per_step, raw[i], atol=1e-5)


def test_bias_init():
    model = EMSDetectionModel("ems-res10.yaml", nc=2, verbose=False)
    fresh = torch.nn.Conv2d(256, 21, 1)
    bound = 1 / 256**0.5  # default conv bias init is U(-bound, bound)
    b = model.model[-1].m[0].bias.view(3, 7)
    assert torch.all((b[:, 4] + 5.2983).abs() <= bound + 1e-4)
    assert torch.all((b[:, 5:] + 0.5208).abs() <= bound + 1e-4)
    assert fresh.bias.abs().max() <= bound


def test_mac_counts_match_model_spec():
    """Per-step conv MACs at 320x320 (energy-spec §4): EMS-Res10 1.463 G in total, 1.382 G fed by spikes."""
    model = EMSDetectionModel("ems-res10.yaml", nc=2, verbose=False)
    ops = conv_ops(model, 320)
    total = sum(o.macs for o in ops)
    spiking = sum(o.macs for o in ops if o.spike_input)
    assert total / 1e9 == pytest.approx(1.463, abs=0.0006)
    assert spiking / 1e9 == pytest.approx(1.382, abs=0.0006)
    enc = next(o for o in ops if o.name == "model.0.conv")
    assert enc.macs == 3 * 32 * 9 * 160 * 160


def test_training_steps_lower_the_loss(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=2), verbose=False).train()
    imgs = torch.rand(2, 3, 64, 64)
    batch = {
        "img": imgs,
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]]),
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, items = model.loss(batch)
        assert set(items) == {"box_loss", "obj_loss", "cls_loss"}
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        losses.append(loss.sum().item())
    assert losses[-1] < 0.65 * losses[0]


def test_bf16_autocast_training_step(tiny_cfg):
    """Mixed precision: under bf16 autocast the LIF still emits {0, 1} and the loss and gradients are finite."""
    model = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=2), verbose=False).train()
    seen = []
    model.model[1].residual[0].conv.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.3, 0.5]])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(batch)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(seen[0].unique().tolist()) <= {0.0, 1.0}


def test_wide_head_block_and_pool_orders():
    """Wide head block (1024-wide bottleneck, about 7.2 M parameters at 512 -> 256); EMS-Block2 pooling orders give
    the same shapes and parameters, and the identity half of the shortcut is MaxPool(x) in both."""
    from ems_yolo.nn import WideBlock

    wide = WideBlock(512, 256, 3, 1)
    assert sum(p.numel() for p in wide.parameters()) == 512 * 1024 * 9 + 2048 + 1024 * 256 * 9 + 512 + 512 * 256 + 512
    x = torch.randn(2, 8, 16, 16)
    last, first = EMSBlock2(8, 16, 3, 2, pool_order="last").eval(), EMSBlock2(8, 16, 3, 2, pool_order="first").eval()
    first.load_state_dict(last.state_dict())
    assert sum(p.numel() for p in last.parameters()) == sum(p.numel() for p in first.parameters())
    a, b = last.shortcut(x), first.shortcut(x)
    assert a.shape == b.shape == (2, 16, 8, 8)
    assert torch.equal(a[:, 8:], torch.nn.functional.max_pool2d(x, 2)) and torch.equal(b[:, 8:], a[:, 8:])
    with pytest.raises(ValueError, match="c1 <= c2"):
        EMSBlock2(16, 8)


def test_ann_twin_trains_after_ultralytics_checkpoint_loading(tiny_cfg, tmp_path):
    """Ultralytics' loader sets inplace=True on every module with the flag; the twin's ReLU must not be one of them
    (an in-place ReLU overwrites the tdBN output its backward needs)."""
    from ultralytics.nn.tasks import load_checkpoint

    import ems_yolo.engine.checkpoints  # noqa: F401  (routes the loader through ems-yolo's, as every command does)

    from ems_yolo.nn.model import ann_twin

    model = EMSDetectionModel(ann_twin(tiny_cfg(nc=2)), verbose=False)
    torch.save({"model": model}, tmp_path / "ann.pt")
    loaded, _ = load_checkpoint(tmp_path / "ann.pt")
    loaded.float().train()
    x = torch.rand(2, 3, 64, 64)
    out = loaded(x)
    sum(o.sum() for o in out).backward()
    assert all(torch.equal(a, b) for a, b in zip(out, model.train()(x)))
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["ems-res34-coco.yaml", "ems-res10.yaml"])
def test_outputs_identical_after_a_checkpoint_round_trip(name, tiny_cfg, tmp_path):
    """Ultralytics' loader sets `inplace=True` on every module with the flag; no layer may compute another function
    after it (the SiLU convs of the COCO model did)."""
    from ultralytics.nn.tasks import load_checkpoint

    import ems_yolo.engine.checkpoints  # noqa: F401  (routes the loader through ems-yolo's, as every command does)

    model = EMSDetectionModel(tiny_cfg(name, width=0.125, nc=3, time_steps=3), verbose=False).eval()
    for m in model.modules():  # trained-looking statistics, so that every layer is far from its init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    torch.save({"model": model}, tmp_path / "m.pt")
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))


def test_set_time_steps_changes_every_layer_and_refuses_event_models(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg(nc=2, time_steps=2), verbose=False)
    model.set_time_steps(4)
    holders = [m for m in model.modules() if "time_steps" in vars(m)]
    assert len(holders) > 3 and {m.time_steps for m in holders} == {4} and model.time_steps == 4
    assert model.eval()(torch.rand(1, 3, 64, 64))[0].shape[0] == 1
    with pytest.raises(ValueError, match="integer >= 1"):
        model.set_time_steps(0)
    events = EMSDetectionModel(tiny_cfg(nc=2, time_steps=3, input="events"), ch=9, verbose=False)
    with pytest.raises(ValueError, match="number of time bins"):
        events.set_time_steps(5)
