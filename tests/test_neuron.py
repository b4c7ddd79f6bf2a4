"""LIF dynamics, surrogate gradients and the traceable inference path."""

import pytest
import torch

from ems_yolo.nn import LIF, NeuronConfig, SiLUNeuron
from ems_yolo.nn.surrogate import ATan, Rectangle, Sigmoid


def reference_lif(x: torch.Tensor, T: int, tau=0.25, vth=0.5, width=1.0):
    """Per-element, per-step evaluation of model-spec §2 with the rectangular surrogate (independent code)."""

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u > vth).float()

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            return g * ((u - vth).abs() < width / 2).float() / width

    xs = x.view(T, -1, *x.shape[1:])
    u_prev = torch.zeros_like(xs[0])
    s_prev = torch.zeros_like(xs[0])
    out = []
    for t in range(T):
        u = tau * u_prev * (1 - s_prev.detach()) + xs[t]
        s = Step.apply(u)
        out.append(s)
        u_prev, s_prev = u, s
    return torch.cat(out)


def test_worked_example():
    """Constant input 0.45 over 5 steps: u = .45, .5625, .45, .5625, .45; spikes 0 1 0 1 0 (model-spec §2.3)."""
    lif = LIF(time_steps=5)
    s = lif(torch.full((5, 1), 0.45))
    assert s.flatten().tolist() == [0, 1, 0, 1, 0]


def test_surrogate_window():
    u = torch.tensor([0.45, 1.2, -0.1, 0.999, 0.001, 0.0, 1.0], requires_grad=True)
    Rectangle.apply(u - 0.5, 1.0).sum().backward()
    assert u.grad.tolist() == [1, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("T", [1, 2, 3])
def test_matches_per_step_reference(T):
    x = torch.randn(T * 4, 3, 5, 6) * 0.8 + 0.3
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    lif = LIF(time_steps=T).train()
    s1, s2 = lif(x1), reference_lif(x2, T)
    assert torch.equal(s1, s2)
    assert s1.unique().tolist() in ([0.0, 1.0], [0.0], [1.0])
    w = torch.randn_like(s1)
    (s1 * w).sum().backward()
    (s2 * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert x1.grad.abs().sum() > 0


def test_stateless_and_batch_time_layout():
    """Time-major folding: sample b at step t is row t*B + b; two calls give the same result (no kept state)."""
    T, B = 3, 2
    lif = LIF(time_steps=T)
    x = torch.rand(T * B, 4)
    a, b = lif(x), lif(x)
    assert torch.equal(a, b)
    single = lif(x.view(T, B, 4)[:, 1])  # sample 1 alone
    assert torch.equal(a.view(T, B, 4)[:, 1], single)


def test_settable_decay_threshold_and_surrogates():
    x = torch.full((4, 1), 0.3)
    assert LIF(4, tau=1.0, vth=0.5)(x).flatten().tolist() == [0, 1, 0, 1]  # no leak: 0.3, 0.6 -> reset, ...
    assert LIF(4, tau=0.25, vth=0.2)(x).flatten().tolist() == [1, 1, 1, 1]
    u = torch.linspace(-1, 2, 31, requires_grad=True)
    for fn, alpha in ((Sigmoid, 4.0), (ATan, 2.0)):
        u.grad = None
        fn.apply(u - 0.5, alpha).sum().backward()
        assert u.grad.argmax().item() == 15  # peak at u = V_th
        assert (u.grad > 0).all()
    lif = LIF(2, surrogate="atan")
    assert lif.alpha == 2.0
    with pytest.raises(ValueError, match="unknown surrogate"):
        LIF(2, surrogate="triangle")
    with pytest.raises(ValueError, match="unknown key"):
        NeuronConfig.from_dict({"tua": 0.3})


def test_eval_path_traces_without_autograd_function():
    lif = LIF(time_steps=3).eval()
    x = torch.randn(6, 2, 4, 4)
    traced = torch.jit.trace(lif, x)
    assert "Python" not in str(traced.graph)  # no PythonOp from an autograd.Function
    assert torch.equal(traced(x), lif(x))
    lif.train()
    with torch.no_grad():
        assert torch.equal(lif(x), traced(x))


def test_silu_pseudo_neuron_carries_its_output_as_membrane():
    """The original `mem_update(act=True)` ran SiLU in place on the membrane, so the next step reads SiLU(u):
    o_t = SiLU(0.25 * o_{t-1} * (1 - o_{t-1}) + I_t). Emulated here with an in-place SiLU, as that code ran it."""
    T, x = 4, torch.randn(4 * 3, 8)
    ref, mem_old, spike = [], None, None
    for t, xt in enumerate(x.view(T, 3, 8)):
        mem = xt.clone() if t == 0 else mem_old * 0.25 * (1 - spike) + xt
        spike = torch.nn.SiLU(inplace=True)(mem)  # overwrites mem
        mem_old = mem.clone()
        ref.append(spike.clone())
    y = SiLUNeuron(time_steps=T)(x)
    assert torch.allclose(y, torch.cat(ref), atol=1e-6)
    plain = [torch.nn.functional.silu(x.view(T, 3, 8)[0])]  # the non-in-place recurrence differs
    u = x.view(T, 3, 8)[0]
    for t in range(1, T):
        u = 0.25 * u * (1 - plain[-1]) + x.view(T, 3, 8)[t]
        plain.append(torch.nn.functional.silu(u))
    assert not torch.allclose(y, torch.cat(plain), atol=1e-3)
    assert not set(y.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("surrogate", ["rectangle", "sigmoid", "atan"])
def test_fused_training_path_equals_step_by_step_graph(surrogate):
    """The fused node (training: the custom op `ems_yolo::lif_forward` for the rectangle, MultiStepLIF for the other
    surrogates) gives the spikes and gradients of the per-step autograd graph."""
    T = 4
    lif = LIF(time_steps=T, surrogate=surrogate).train()
    x = (torch.randn(T * 3, 8, 6, 6) * 0.7 + 0.4).requires_grad_()
    y = lif(x)
    node = type(y.grad_fn.next_functions[0][0]).__name__  # the fused node, under the fold view
    assert ("ems_yolo_lif_forward" if surrogate == "rectangle" else "MultiStepLIF") in node
    w = torch.randn_like(y)
    (y * w).sum().backward()

    ref_x = x.detach().clone().requires_grad_()
    fn, alpha = lif._spike_fn, lif.alpha
    xs = ref_x.view(T, -1, 8, 6, 6)
    u, s, out = xs[0], None, []
    for t in range(T):
        if t:
            u = 0.25 * u * (1 - s.detach()) + xs[t]
        s = fn.apply(u - 0.5, alpha)
        out.append(s)
    ref = torch.cat(out)
    (ref * w).sum().backward()
    assert torch.equal(y, ref)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)


def test_lif_from_an_older_checkpoint_unpickles():
    """Checkpoints pickle whole models: a LIF saved before `backend`/`rectangular` existed still trains, and one
    saved while 'torch' was the default backend loads with today's default 'auto' (an explicit 'triton' stays)."""
    import pickle

    lif = LIF(time_steps=2)
    del lif.__dict__["backend"], lif.__dict__["rectangular"], lif.__dict__["schema"]
    old = pickle.loads(pickle.dumps(lif)).train()
    assert (old.backend, old.rectangular, old.schema) == ("auto", True, 2)
    x = (torch.randn(4, 3) + 0.5).requires_grad_()
    old(x).sum().backward()
    assert x.grad is not None
    for saved, loaded in (("torch", "auto"), ("triton", "triton")):
        lif = LIF(time_steps=2, backend=saved)
        del lif.__dict__["schema"]
        assert pickle.loads(pickle.dumps(lif)).backend == loaded
    assert pickle.loads(pickle.dumps(LIF(time_steps=2, backend="torch"))).backend == "torch"  # chosen today
