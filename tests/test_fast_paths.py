"""Fast paths against their plain PyTorch references (issue 6): identical values, gradients within 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from ems_yolo.nn.layers import LCB, LIFConvFunction, MaxPool, SpikeConv2d, TDBatchNorm2d
from ems_yolo.nn.neuron import NeuronConfig


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


def saved_bytes(fn) -> dict[torch.dtype, int]:
    """Bytes of the distinct storages that autograd saves while `fn()` runs, by dtype (parameters excluded)."""
    seen, total = set(), {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[t.dtype] = total.get(t.dtype, 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


CL = torch.channels_last


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape, s", [((2, 3, 8, 8), 2), ((1, 2, 7, 9), 2), ((3, 4, 5, 4), 2), ((2, 2, 9, 10), 3)])
def test_max_pool_equals_max_pool2d(shape, s, layout):
    """Values and gradients of both paths equal max_pool2d's, odd sizes (floor mode) included; the gradient keeps
    the input's layout; autograd keeps only int32 indices (4 bytes per output)."""
    x = torch.randn(*shape).contiguous(memory_format=layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.no_grad():
        assert torch.equal(MaxPool(s)(x), F.max_pool2d(x, s, s))
    y, y_ref = MaxPool(s)(x), F.max_pool2d(x_ref, s, s)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert x.grad.is_contiguous(memory_format=layout)
    assert saved_bytes(lambda: MaxPool(s)(x)) == {torch.int32: 4 * y.numel()}


def test_max_pool_gradient_goes_to_the_first_maximum():
    """Binary spikes tie all the time: the gradient goes where max_pool2d sends it (first maximum, row-major)."""
    x = (torch.rand(2, 3, 8, 8) > 0.5).float().contiguous(memory_format=CL).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, 4, 4)
    (MaxPool(2)(x) * g).sum().backward()
    (F.max_pool2d(x_ref, 2, 2) * g).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("surrogate", ["rectangle", "sigmoid"])
@pytest.mark.parametrize("k, s", [(3, 1), (3, 2), (1, 1)])
def test_fused_lcb_equals_lif_then_conv(k, s, surrogate):
    """LCB's training node (LIF + conv in one autograd node) against the separate LIF and plain conv2d: identical
    output, gradients within 1e-5; for the rectangle it saves one byte per spike (the separate pair saves three)."""
    T = 3
    lcb = LCB(6, 5, k, s, time_steps=T, neuron=NeuronConfig(surrogate=surrogate)).train()
    x = (torch.randn(T * 2, 6, 9, 10) * 0.6 + 0.4).contiguous(memory_format=CL).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    assert lcb._fused()
    out = LIFConvFunction.apply(x, lcb.conv.weight, lcb.lif, lcb.conv.stride, lcb.conv.padding)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    w_grad = lcb.conv.weight.grad.clone()
    lcb.conv.weight.grad = None
    spikes = lcb.lif(x_ref)
    ref = F.conv2d(spikes, lcb.conv.weight, None, s, k // 2)
    (ref * g).sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_grad, lcb.conv.weight.grad, rtol=0, atol=1e-5)
    assert x.grad.is_contiguous(memory_format=CL)
    if surrogate == "rectangle":
        fused = saved_bytes(lambda: LIFConvFunction.apply(x, lcb.conv.weight, lcb.lif, (s, s), (k // 2, k // 2)))
        assert fused == {torch.uint8: x.numel()}
        lcb.conv.register_forward_pre_hook(lambda *_: None)  # hooks must see the modules: separate path
        assert not lcb._fused()
        separate = saved_bytes(lambda: lcb(x))
        assert separate[torch.uint8] + separate[torch.bool] == 2 * x.numel()


def test_fused_lcb_under_bf16_autocast():
    lcb = LCB(4, 4, 3, 1, time_steps=2).train()
    x = (torch.randn(4, 4, 8, 8) + 0.5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lcb(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lcb.conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_model_keeps_channels_last(tiny_cfg):
    """The encoding layer switches to channels_last and every tdBN input stays in it, and so does every gradient
    down to stride 8 (BatchNorm's CPU backward is several times slower on mixed layouts; the small stride 16/32
    maps get theirs through the head's mean over T and concat slices)."""
    from ems_yolo.nn import EMSDetectionModel

    model = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=2), verbose=False).train()
    inputs, grads = [], []
    for m in model.modules():
        if isinstance(m, TDBatchNorm2d):
            m.register_forward_hook(lambda _m, a, _o: inputs.append(a[0].is_contiguous(memory_format=CL)))
            m.register_full_backward_hook(
                lambda _m, _gi, go: grads.append(go[0].is_contiguous(memory_format=CL) or go[0].shape[-1] < 16)
            )
    sum(r.sum() for r in model(torch.rand(2, 3, 128, 128))).backward()
    assert len(inputs) == len(grads) > 20
    assert all(inputs) and all(grads)


def test_dynamo_traces_the_training_model_in_one_graph(tiny_cfg):
    """torch.compile sees the whole training forward, custom autograd nodes included, without graph breaks."""
    from ems_yolo.nn import EMSDetectionModel

    model = EMSDetectionModel(tiny_cfg("ems-res10.yaml", width=0.25, nc=2, time_steps=2), verbose=False).train()
    explained = torch._dynamo.explain(model)(torch.rand(2, 3, 64, 64))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _lcb_pair(T: int, backend: str) -> torch.nn.Sequential:
    from ems_yolo.nn.layers import LCB

    torch.manual_seed(0)
    pair = torch.nn.Sequential(LCB(5, 6, 3, 2, 1.0, T, NeuronConfig(backend=backend)),
                               LCB(6, 4, 3, 1, 0.2, T, NeuronConfig(backend=backend))).train()
    for m in pair.modules():  # away from the init, so that the affine map matters
        if isinstance(m, TDBatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.6)
    return pair


def fused_and_unfused(pair: torch.nn.Sequential, x: torch.Tensor) -> list[tuple]:
    """(output, input gradient, parameter gradients, buffers) of one training step of `pair` with the tdBN that
    feeds the second LIF fused into it, then of a copy with fusion off."""
    import copy

    from ems_yolo.nn.layers import configure_kernels, lcb_chain

    unfused = configure_kernels(copy.deepcopy(pair), fuse_bn=False)
    assert pair[1].fuses(pair[0].bn) and not unfused[1].fuses(unfused[0].bn)
    results = []
    for m in (pair, unfused):
        xi = x.clone().requires_grad_()
        y = lcb_chain(m, xi)
        node = type(y.grad_fn.next_functions[0][0]).__name__  # under the last tdBN
        assert ("BNLIFConv" in node) == (m is pair), node
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)) * 0.01
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in m.parameters()], list(m.buffers())))
    return results


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_fused_tdbn_lif_equals_unfused_layers(layout):
    """On the torch backend the fused tdBN -> LIF -> conv node gives exactly the unfused layers' outputs and
    gradients (BatchNorm weight, bias and the gradient through the batch statistics included); running statistics
    within 1e-6 (updated from the batch (mean, 1/std) instead of BatchNorm's own arithmetic)."""
    pair = _lcb_pair(3, "torch")
    x = (torch.randn(6, 5, 9, 10) * 0.8 + 0.5).contiguous(memory_format=layout)
    (y1, g1, p1, b1), (y2, g2, p2, b2) = fused_and_unfused(pair, x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2) and all(map(torch.equal, p1, p2))
    assert y1.is_contiguous(memory_format=layout)
    assert [int(b.sum()) for b in b1 if b.dtype == torch.long] == [1, 1]  # num_batches_tracked
    for a, b in zip(b1, b2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(b1[0], torch.zeros_like(b1[0]))  # the running mean moved


def test_fusion_only_in_training_and_without_hooks():
    """Eval, no-grad and hooked tdBNs (the energy monitor's) take the unfused layers."""
    pair = _lcb_pair(2, "auto")
    assert pair[1].fuses(pair[0].bn)
    handle = pair[0].bn.register_forward_hook(lambda *a: None)
    assert not pair[1].fuses(pair[0].bn)
    handle.remove()
    pair.eval()
    assert not pair[1].fuses(pair[0].bn)
