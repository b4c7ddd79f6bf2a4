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
