"""The Triton kernels (`ems_yolo/nn/ops`) against their torch references, run by Triton's interpreter on the CPU.

The interpreter is chosen when triton is first imported, so the comparison runs in a subprocess with
TRITON_INTERPRET=1: identical spikes and backward codes (float32), input gradients within 1e-6, for the LIF alone
and for LCB's fused LIF + conv node, in both activation layouts; the fused tdBN + LIF kernel against the unfused
layers (identical spikes, every gradient within 1e-5, running statistics within 1e-6); the spike decoder; the 2x2
max-pool with its 1-byte argmax against max_pool2d (identical values and gradients).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from ems_yolo.nn.layers import LCB
    from ems_yolo.nn.neuron import LIF, NeuronConfig, lif_forward
    from ems_yolo.nn.ops import runtime

    assert runtime.INTERPRETING
    torch.manual_seed(0)
    checked = 0
    for T in (1, 2, 3):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(T * 2, 5, 6, 7) * 0.6 + 0.4).contiguous(memory_format=layout)
            fast, ref = LIF(T, backend="triton").train(), LIF(T, backend="auto").train()  # auto: CPU takes torch
            cur = x.view(T, -1, *x.shape[1:])
            assert runtime.use_kernels("triton", cur) and not runtime.use_kernels("auto", cur)
            (s1, (c1,)), (s2, (c2,)) = lif_forward(cur, fast), lif_forward(cur, ref)
            assert torch.equal(s1, s2) and torch.equal(c1, c2), (T, layout)
            assert runtime.usable(c1)  # the backward takes the kernel too
            assert s1.stride() == cur.stride() and 0 < s1.sum() < s1.numel()
            g = torch.randn_like(x)
            grads = []
            for lif in (fast, ref):
                xi = x.clone().requires_grad_()
                y = lif(xi)
                (y * g).sum().backward()
                grads.append(xi.grad)
            assert torch.equal(*[lif(x) for lif in (fast, ref)])
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
            # LCB: the fused LIF + conv node on the triton backend
            outs = []
            for backend in ("triton", "torch"):
                torch.manual_seed(1)
                lcb = LCB(5, 4, 3, 1, time_steps=T, neuron=NeuronConfig(backend=backend)).train()
                xi = x.clone().requires_grad_()
                out = lcb(xi)
                (out * out.detach()).sum().backward()
                outs.append((out.detach(), xi.grad, lcb.conv.weight.grad))
            assert torch.equal(outs[0][0], outs[1][0])
            for a, b in zip(outs[0][1:], outs[1][1:]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            checked += 1
    # tdBN -> LIF fused in the kernel vs the unfused layers (torch path)
    from ems_yolo.nn.layers import LCB, TDBatchNorm2d, configure_kernels, lcb_chain
    from ems_yolo.nn.ops import bn_lif, lif
    from ems_yolo.nn.ops.bn_lif import reference as bn_lif_reference
    import copy
    for T in (1, 3):
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(2)
            pair = torch.nn.Sequential(LCB(5, 6, 3, 2, 1.0, T, NeuronConfig(backend="triton")),
                                       LCB(6, 4, 3, 1, 0.2, T, NeuronConfig(backend="triton"))).train()
            for m in pair.modules():
                if isinstance(m, TDBatchNorm2d):
                    m.weight.data.uniform_(0.5, 1.5)
                    m.bias.data.uniform_(-0.2, 0.6)
            ref = configure_kernels(copy.deepcopy(pair), backend="torch", fuse_bn=False)
            x = (torch.randn(T * 2, 5, 9, 10) * 0.8 + 0.5).contiguous(memory_format=layout)
            res = []
            for m in (pair, ref):
                xi = x.clone().requires_grad_()
                y = lcb_chain(m, xi)
                assert ("BNLIFConv" in type(y.grad_fn.next_functions[0][0]).__name__) == (m is pair)
                g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)) * 0.01
                (y * g).sum().backward()
                res.append((y.detach(), xi.grad, [p.grad for p in m.parameters()], list(m.buffers())))
            (y1, g1, p1, b1), (y2, g2, p2, b2) = res
            assert torch.equal(y1, y2), (T, layout)  # identical spikes into identical convs
            torch.testing.assert_close(g1, g2, rtol=0, atol=1e-5)
            for a, b in zip(p1, p2):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            for a, b in zip(b1, b2):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            # the op alone: kernel and reference, spikes and codes
            z = (torch.randn(T * 2, 6, 5, 4) * 0.8 + 0.5).contiguous(memory_format=layout)
            w, b = torch.rand(6) + 0.5, torch.rand(6) - 0.2
            out_k = bn_lif.forward(z, w, b, 1e-5, T, 0.25, 0.5, 1.0, True)
            out_r = bn_lif_reference.forward(z, w, b, 1e-5, T, 0.25, 0.5, 1.0)
            assert torch.equal(out_k[0], out_r[0]) and torch.equal(out_k[1], out_r[1])
            assert out_k[1].stride() == z.stride() and 0 < out_k[0].sum() < out_k[0].numel()
            for a, b in zip(out_k[2:], out_r[2:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            assert torch.equal(lif.decode(out_k[1], torch.float16, True), (out_k[1] >> 1).half())
            checked += 1
    # 2x2 max-pool with a 1-byte argmax: values and gradients of max_pool2d (ties of binary inputs included)
    import torch.nn.functional as F
    from ems_yolo.nn.layers import MaxPool
    from ems_yolo.nn.ops.max_pool2 import reference as pool_reference, triton as pool_kernels
    for shape in ((2, 3, 8, 8), (1, 2, 7, 9)):
        for layout in (torch.contiguous_format, torch.channels_last):
            for binary in (False, True):
                x = (torch.rand(shape) > 0.5).float() if binary else torch.randn(shape)
                x = x.contiguous(memory_format=layout)
                xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
                y, yr = MaxPool(2, "triton")(xi), F.max_pool2d(xr, 2, 2)
                assert "max_pool2" in type(y.grad_fn).__name__
                g = torch.randn_like(yr)
                (y * g).sum().backward()
                (yr * g).sum().backward()
                assert torch.equal(y, yr) and torch.equal(xi.grad, xr.grad), (shape, layout, binary)
                assert y.is_contiguous(memory_format=layout) and xi.grad.is_contiguous(memory_format=layout)
                (o1, a1), (o2, a2) = pool_kernels.forward(x), pool_reference.forward(x)
                assert torch.equal(o1, o2) and torch.equal(a1, a2) and a1.dtype == torch.uint8
                assert torch.equal(pool_kernels.backward(g, a1, *shape[2:]), pool_reference.backward(g, a1, *shape[2:]))
                checked += 1
    print("checked", checked)
    """
)


def test_triton_kernels_equal_torch_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked 18" in run.stdout


def test_unknown_backend_is_rejected():
    from ems_yolo.nn import LIF, NeuronConfig

    with pytest.raises(ValueError, match="neuron.backend: expected 'auto', 'torch' or 'triton'"):
        NeuronConfig.from_dict({"backend": "cuda"})
    with pytest.raises(ValueError, match="expected 'auto', 'torch' or 'triton'"):
        LIF(2, backend="cutlass")


def test_backend_dispatch(monkeypatch):
    """'triton' calls the kernels exactly when they are usable (CUDA tensors, or the interpreter), 'auto' only on
    CUDA tensors they support, 'torch' never; CPU tensors take the torch path. 'auto' is every model's default."""
    import torch

    from ems_yolo.nn import LIF, NeuronConfig
    from ems_yolo.nn.ops import runtime
    from ems_yolo.nn.ops.lif import triton as kernels

    if not runtime.available():
        pytest.skip("triton not installed")
    assert NeuronConfig().backend == LIF(2).backend == "auto"
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape)
        raise RuntimeError("triton kernel called")

    monkeypatch.setattr(kernels, "forward", kernel)
    x = (torch.randn(6, 3, 4, 4) + 0.4).requires_grad_()
    expected = LIF(3, backend="torch").train()(x)
    for backend in ("triton", "auto"):  # CPU: not usable
        assert torch.equal(LIF(3, backend=backend).train()(x), expected) and calls == []
    monkeypatch.setattr(runtime, "usable", lambda tensor, steps=True: True)
    for backend in ("torch", "auto"):  # auto: a CPU tensor is never sent to the interpreter
        assert torch.equal(LIF(3, backend=backend).train()(x), expected) and calls == []
    with pytest.raises(RuntimeError, match="triton kernel called"):
        LIF(3, backend="triton").train()(x)
    assert len(calls) == 1
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="triton kernel called"):  # auto on a (pretend) CUDA tensor
        LIF(3, backend="auto").train()(x)
    assert len(calls) == 2
