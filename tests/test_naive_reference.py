"""The naive per-step reference of tools/naive_reference.py computes exactly what our time-folded model computes.

Both sides start from deep copies of one model (BatchNorm running statistics change on every training forward),
run the same input, and must agree on eval outputs, training outputs and parameter gradients. They run in float64:
our model computes in channels_last and the reference in NCHW, whose float32 convolutions round differently, and a
membrane within float32 rounding of the threshold then spikes on one side only (a few models in a hundred). In
float64 that cannot happen at these sizes, so spikes must be identical. The float32 fast paths are checked one by
one against their references in test_fast_paths.py and test_neuron.py.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from ems_yolo.nn import EMSDetectionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from naive_reference import NaiveEMS

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _set_rows(cfg: dict, rows: dict[int, list]) -> dict:
    """Replace model rows by index (backbone rows first, then head rows)."""
    nb = len(cfg["backbone"])
    for i, row in rows.items():
        (cfg["backbone"] if i < nb else cfg["head"])[i if i < nb else i - nb] = row
    return cfg


def _pool_first(cfg: dict) -> dict:
    """Every EMS-Block2 with the paper figure's pooling order."""
    for row in cfg["backbone"] + cfg["head"]:
        if row[2] == "EMSBlock2":
            row[3] = [*row[3], "first"]
    return cfg


def _with_ems_block1(cfg: dict) -> dict:
    """EMS-Block1 with projection shortcuts in place of two EMS-Block2 (downsampling and widening)."""
    return _set_rows(cfg, {1: [-1, 1, "EMSBlock1", [64, 3, 2]], 6: [-1, 1, "EMSBlock1", [512, 3, 1]]})


CASES = {
    "res10-pool-last-T2": ("ems-res10.yaml", 2, lambda c: c),
    "res10-pool-first-T3": ("ems-res10.yaml", 3, _pool_first),
    "res10-ems-block1-T2": ("ems-res10.yaml", 2, _with_ems_block1),
    "res18-repeats-T3": ("ems-res18.yaml", 3, lambda c: c),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pair(request, tiny_cfg):
    """(ours, naive, naive's underlying model) built from identical copies of one reduced-width model."""
    name, T, edit = CASES[request.param]
    ours = EMSDetectionModel(edit(tiny_cfg(name, width=0.25, nc=2, time_steps=T)), verbose=False).double()
    twin = copy.deepcopy(ours)
    return ours, NaiveEMS(twin), twin


def test_eval_outputs_match(pair):
    ours, naive, _ = pair
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    ours.eval(), naive.eval()
    with torch.no_grad():
        (y_ours, raw_ours), (y_naive, raw_naive) = ours(x), naive(x)
    assert y_ours.shape == (2, 4 + 2, 3 * (4 * 4 + 2 * 2))
    torch.testing.assert_close(y_naive, y_ours, **TOL)
    for a, b in zip(raw_naive, raw_ours):
        torch.testing.assert_close(a, b, **TOL)


def test_train_outputs_match(pair):
    ours, naive, _ = pair
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    ours.train(), naive.train()
    raw_ours, raw_naive = ours(x), naive(x)
    assert [r.shape for r in raw_naive] == [r.shape for r in raw_ours] == [(2, 3, 4, 4, 7), (2, 3, 2, 2, 7)]
    for a, b in zip(raw_naive, raw_ours):
        torch.testing.assert_close(a, b, **TOL)


def test_gradients_match(pair):
    """Parameter gradients of a random linear loss on the raw outputs, element-wise within 1e-5."""
    ours, naive, twin = pair
    ours.train(), naive.train()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    raw_ours, raw_naive = ours(x), naive(x)
    weights = [torch.randn_like(r) for r in raw_ours]
    sum((r * w).sum() for r, w in zip(raw_ours, weights)).backward()
    sum((r * w).sum() for r, w in zip(raw_naive, weights)).backward()
    for (name, p_ours), p_naive in zip(ours.named_parameters(), twin.parameters()):
        g_ours, g_naive = p_ours.grad, p_naive.grad
        assert g_ours is not None and g_naive is not None, name
        torch.testing.assert_close(g_naive, g_ours, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_batch_statistics_match(pair):
    """One training forward moves the running statistics identically (the encoding BN's running variance uses
    the n/(n-1) factor of B*H*W samples in our model and of T*B*H*W in the per-step reference: model-spec §4)."""
    ours, naive, twin = pair
    ours.train(), naive.train()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    ours(x), naive(x)
    theirs = twin.state_dict()
    for k, v in ours.state_dict().items():
        tol = {"rtol": 1e-3, "atol": 1e-5} if k == "model.0.bn.running_var" else TOL
        torch.testing.assert_close(theirs[k], v, **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_event_input_matches(tiny_cfg):
    ours = EMSDetectionModel(tiny_cfg(width=0.25, nc=2, time_steps=3, input="events"), ch=9, verbose=False)
    ours = ours.double().eval()
    naive = NaiveEMS(copy.deepcopy(ours)).eval()
    x = torch.rand(1, 9, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(naive(x)[0], ours(x)[0], **TOL)


def test_unsupported_module_is_named(tiny_cfg):
    model = EMSDetectionModel(tiny_cfg("ems-res34-coco.yaml", width=0.25, time_steps=2), verbose=False).eval()
    with pytest.raises(NotImplementedError, match="SiLUConv"), torch.no_grad():
        NaiveEMS(model)(torch.rand(1, 3, 64, 64))
