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
    monkeypatch.setattr(runtime, "usable", lambda tensor: True)
    for backend in ("torch", "auto"):  # auto: a CPU tensor is never sent to the interpreter
        assert torch.equal(LIF(3, backend=backend).train()(x), expected) and calls == []
    with pytest.raises(RuntimeError, match="triton kernel called"):
        LIF(3, backend="triton").train()(x)
    assert len(calls) == 1
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="triton kernel called"):  # auto on a (pretend) CUDA tensor
        LIF(3, backend="auto").train()(x)
    assert len(calls) == 2
