"""Fast paths against their plain PyTorch references (issue 6): identical values, gradients within 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from ems_yolo.nn.layers import MaxPool, SpikeConv2d


@pytest.mark.parametrize("k, s", [(3, 1), (3, 2), (1, 1)])
def test_spike_conv_matches_conv2d(k, s):
    conv = SpikeConv2d(6, 5, k, s, k // 2, bias=False).train()
    x = (torch.rand(4, 6, 9, 10) > 0.7).float().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 5, *conv(x).shape[-2:])
    conv.weight.grad = None
    y = conv(x)
    (y * g).sum().backward()
    w_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    y_ref = F.conv2d(x_ref, conv.weight, None, s, k // 2)
    (y_ref * g).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(w_grad, conv.weight.grad, atol=1e-5)


def test_spike_conv_under_bf16_autocast():
    conv = SpikeConv2d(4, 4, 3, 1, 1, bias=False).train()
    x = (torch.rand(2, 4, 8, 8) > 0.5).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 5, 4)])
def test_inference_max_pool_is_exact(shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(MaxPool(2)(x), F.max_pool2d(x, 2, 2))
    x.requires_grad_()
    assert torch.equal(MaxPool(2)(x), F.max_pool2d(x, 2, 2))  # training path is max_pool2d itself


def test_activation_checkpointing_is_exact(tiny_cfg):
    """checkpoint: true recomputes activations in backward: same loss, gradients and BN running statistics."""
    from copy import deepcopy

    from ems_yolo.nn import EMSDetectionModel

    base = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=3), verbose=False).train()
    ckpt = deepcopy(base)
    ckpt.yaml["checkpoint"] = True
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [1.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.3, 0.5]])}
    losses = []
    for m in (base, ckpt):
        loss, _ = m.loss(batch)
        loss.sum().backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (n, a), b in zip(base.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n
    for (n, a), b in zip(base.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), n  # running statistics updated once, not twice
