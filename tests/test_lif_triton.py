"""The Triton LIF kernels against the torch path, run by Triton's interpreter on the CPU (no GPU needed).

The interpreter is chosen when triton is first imported, so the comparison runs in a subprocess with
TRITON_INTERPRET=1: identical spikes and backward codes (float32), input gradients within 1e-6, for the LIF alone
and for LCB's fused LIF + conv node, in both activation layouts.
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
    from ems_yolo.nn import lif_triton
    from ems_yolo.nn.layers import LCB
    from ems_yolo.nn.neuron import LIF, NeuronConfig, lif_forward

    assert lif_triton.INTERPRETING
    torch.manual_seed(0)
    checked = 0
    for T in (1, 2, 3):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(T * 2, 5, 6, 7) * 0.6 + 0.4).contiguous(memory_format=layout)
            fast, ref = LIF(T, backend="triton").train(), LIF(T).train()
            cur = x.view(T, -1, *x.shape[1:])
            assert lif_triton.usable(cur)
            (s1, (c1,)), (s2, (c2,)) = lif_forward(cur, fast), lif_forward(cur, ref)
            assert torch.equal(s1, s2) and torch.equal(c1, c2), (T, layout)
            assert lif_triton.usable(c1)  # the backward takes the kernel too
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
    print("checked", checked)
    """
)


def test_triton_kernels_equal_torch_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked 6" in run.stdout


def test_unknown_backend_is_rejected():
    from ems_yolo.nn import LIF, NeuronConfig

    with pytest.raises(ValueError, match="neuron.backend: expected 'torch' or 'triton'"):
        NeuronConfig.from_dict({"backend": "cuda"})
    with pytest.raises(ValueError, match="expected 'torch' or 'triton'"):
        LIF(2, backend="cutlass")


def test_triton_backend_dispatch(monkeypatch):
    """The triton backend calls the kernels exactly when they are usable (CUDA tensors, or the interpreter); CPU
    tensors take the torch path, and the torch backend never calls them."""
    import torch

    from ems_yolo.nn import LIF, lif_triton

    if not lif_triton.available():
        pytest.skip("triton not installed")
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape)
        raise RuntimeError("triton kernel called")

    monkeypatch.setattr(lif_triton, "forward", kernel)
    x = (torch.randn(6, 3, 4, 4) + 0.4).requires_grad_()
    expected = LIF(3).train()(x)
    assert torch.equal(LIF(3, backend="triton").train()(x), expected) and calls == []  # CPU: not usable
    monkeypatch.setattr(lif_triton, "usable", lambda tensor: True)
    assert torch.equal(LIF(3).train()(x), expected) and calls == []
    with pytest.raises(RuntimeError, match="triton kernel called"):
        LIF(3, backend="triton").train()(x)
    assert len(calls) == 1
