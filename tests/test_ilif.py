"""The I-LIF neuron against SpikeYOLO's recurrence written step by step with autograd (`mem_update` + `MultiSpike4`
as the issue and the fixture README state them), and its config checks."""

import pytest
import torch

from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.neuron import NeuronConfig, make_neuron


class _Quant(torch.autograd.Function):
    """round(clip(u, 0, D)), gradient straight through on [0, D]."""

    @staticmethod
    def forward(ctx, u, levels):
        ctx.save_for_backward(u)
        ctx.levels = levels
        return torch.round(torch.clamp(u, 0, levels))

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * ((u >= 0) & (u <= ctx.levels)), None


def _stepwise(currents, levels, tau=0.25):
    out, s, u = [], None, None
    for t in range(currents.shape[0]):
        u = currents[t] if t == 0 else (u - s.detach()) * tau + currents[t]
        s = _Quant.apply(u, levels)
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("T,levels", [(1, 4), (4, 4), (3, 2), (5, 8)])
def test_ilif_equals_the_stepwise_recurrence_in_float32(T, levels):
    torch.manual_seed(T * 10 + levels)
    x = (torch.randn(T, 3, 5, 7, 7) * 3).requires_grad_()
    ref = _stepwise(x, levels)
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    neuron = ILIF(T, levels)
    y = neuron(x.flatten(0, 1))
    (gx,) = torch.autograd.grad(y, x, g.flatten(0, 1))
    assert torch.equal(y.view_as(ref), ref)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert set(y.unique().tolist()) <= set(range(levels + 1)) and y.max() == levels and y.min() == 0
    with torch.no_grad():
        assert torch.equal(neuron(x.flatten(0, 1)), y)
    assert torch.equal(torch.jit.trace(neuron.eval(), x.detach().flatten(0, 1))(x.detach().flatten(0, 1)), y)


def test_halves_round_to_even_and_the_reset_is_soft():
    x = torch.tensor([[0.5], [1.5], [2.5], [0.0]]).view(4, 1)  # T=4, one neuron
    y = ILIF(4, 4)(x).view(-1)
    # u: 0.5 -> s 0 (half to even); u = (0.5 - 0) * .25 + 1.5 = 1.625 -> 2; u = (1.625 - 2) * .25 + 2.5 = 2.40625 -> 2
    assert y.tolist() == [0.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("levels", [0, 2.5, True, "4", 256])
def test_bad_levels_are_one_line(levels):
    with pytest.raises(ValueError, match=r"neuron\.levels: expected an integer in 1\.\.255"):
        NeuronConfig.from_dict({"kind": "ilif", "levels": levels})


def test_config_builds_the_ilif():
    neuron = make_neuron(NeuronConfig.from_dict({"kind": "ilif", "levels": 4}), 2)
    assert isinstance(neuron, ILIF) and neuron.levels == 4 and neuron.tau == 0.25 and neuron.time_steps == 2


def _spikingjelly_gen1(x_seq, levels=4):
    """SpikeYOLO_for_Gen1's neuron written out from its vendored SpikingJelly 0.0.0.0.12, step by step:
    `MultiStepLIFNode(tau=2., decay_input=True, v_reset=None, detach_reset=True)` whose surrogate `Sigmoid` fires
    `quant4`: v starts at 0.; neuronal_charge v = v + (x - v) / tau; spike = round(clamp(v, 0, 4)) (gradient straight
    through on [0, 4]); soft reset v = v - spike.detach() (no threshold factor)."""
    v, out = 0.0, []
    for t in range(x_seq.shape[0]):
        v = v + (x_seq[t] - v) / 2.0
        spike = _Quant.apply(v, levels)
        v = v - spike.detach()
        out.append(spike)
    return torch.stack(out)


@pytest.mark.parametrize("T", [1, 3, 5])
def test_gen1_charge_equals_spikingjelly_reading(T):
    torch.manual_seed(T)
    x = (torch.randn(T, 2, 4, 6, 6) * 4).requires_grad_()
    ref = _spikingjelly_gen1(x)
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    neuron = make_neuron(NeuronConfig.from_dict({"kind": "ilif", "charge": "gen1"}), T)
    assert neuron.tau == 0.5 and neuron.charge == "gen1"
    y = neuron(x.flatten(0, 1))
    (gx,) = torch.autograd.grad(y, x, g.flatten(0, 1))
    assert torch.equal(y.view_as(ref), ref) and 0 < y.count_nonzero() < y.numel() and y.max() == 4
    torch.testing.assert_close(gx.view_as(gx_ref), gx_ref, rtol=0, atol=1e-6)
    traced = torch.jit.trace(neuron.eval(), x.detach().flatten(0, 1))
    assert torch.equal(traced(x.detach().flatten(0, 1)), y)


def test_charge_checks_are_one_line():
    with pytest.raises(ValueError, match=r"neuron\.charge: expected 'leak' or 'gen1', got 'coco'"):
        NeuronConfig.from_dict({"kind": "ilif", "charge": "coco"})
    with pytest.raises(ValueError, match=r"neuron\.charge: 'gen1' is a charge of kind 'ilif', got kind 'lif'"):
        NeuronConfig.from_dict({"charge": "gen1"})


KERNEL_SCRIPT = """
import torch
from ems_yolo.nn.ilif import ILIF, ilif_forward
from ems_yolo.nn.ops import runtime

assert runtime.INTERPRETING
torch.manual_seed(0)
checked = 0
for charge in ("leak", "gen1"):
    for T, levels in ((1, 4), (3, 4), (4, 2)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(T * 2, 5, 6, 7) * 3).contiguous(memory_format=layout)
            x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.0])  # halves round to even
            fast = ILIF(T, levels, 0.5 if charge == "gen1" else 0.25, charge, backend="triton")
            ref = ILIF(T, levels, fast.tau, charge, backend="auto")  # auto: a CPU tensor takes torch
            cur = x.view(T, -1, *x.shape[1:])
            assert runtime.use_kernels("triton", cur) and not runtime.use_kernels("auto", cur)
            (s1, w1), (s2, w2) = ilif_forward(cur, fast), ilif_forward(cur, ref)
            assert torch.equal(s1, s2) and torch.equal(w1, w2), (charge, T, layout)
            assert s1.stride() == cur.stride() and s1.max() == levels and 0 < w1.sum() < w1.numel()
            g = torch.randn_like(x)
            grads = []
            for neuron in (fast, ref):
                xi = x.clone().requires_grad_()
                (neuron(xi) * g).sum().backward()
                grads.append(xi.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)
            checked += 1
print("checked", checked)
"""


def test_ilif_triton_kernels_equal_torch_path():
    """The I-LIF Triton kernels against the torch reference through Triton's interpreter (a subprocess: it is chosen
    at the first import of triton): identical spikes and windows in float32, input gradients within 1e-5."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked 12" in run.stdout
