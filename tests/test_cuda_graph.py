"""CUDA-graph prediction (`cuda_graph`): the capture / replay / fallback logic on the CPU, with a stand-in for CUDA
graphs that replays by re-running the captured function into the captured output tensors (what a graph does)."""

import logging

import numpy as np
import pytest
import torch

from ems_yolo.cli import run
from ems_yolo.engine import predictor as predictor_module
from ems_yolo.engine.cuda_graph import GraphedCall
from ems_yolo.engine.model import EMSYOLO
from ems_yolo.nn.model import EMSDetectionModel


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of a nest of lists and tuples, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in tensors(o)]


class RerunGraphs:
    """Captures by running `fn` once; a replay runs it again and writes the results into the captured tensors, so
    that a caller who forgets to refresh the static input, or hands out the static outputs, gets wrong results."""

    def __init__(self, fail: bool = False):
        self.captures, self.replays, self.fail = 0, 0, fail

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.captures += 1
        out = fn()

        def replay():
            self.replays += 1
            for static, new in zip(tensors(out), tensors(fn())):
                static.copy_(new)

        return replay, out


@pytest.fixture
def eval_model(tiny_cfg):
    return EMSDetectionModel(tiny_cfg(nc=3), time_steps=2, verbose=False).eval()


def test_replays_equal_the_eager_model_and_a_new_shape_gets_its_own_graph(eval_model):
    runner = RerunGraphs()
    graphed = GraphedCall(eval_model, runner, max_graphs=2)
    shapes = [(64, 64)] * 4 + [(64, 96)] * 3 + [(96, 64)] * 2  # the third shape finds no room: eager
    returned = []
    with torch.inference_mode():
        for h, w in shapes:
            x = torch.rand(1, 3, h, w)
            out, ref = graphed(x), eval_model(x)
            assert all(torch.equal(a, b) for a, b in zip(tensors(out), tensors(ref)))
            returned.append((out, [t.clone() for t in tensors(out)]))
    assert runner.captures == 2 and runner.replays == 3 + 2  # captured at the 2nd call of a shape, replayed after
    assert [s[0] for s in graphed.graphs] == [(1, 3, 64, 64), (1, 3, 64, 96)]
    for out, copy in returned:  # later replays left the outputs already handed out as they were
        assert all(torch.equal(a, b) for a, b in zip(tensors(out), copy))


def test_gradients_enabled_or_a_failed_capture_run_eagerly(eval_model, caplog):
    x = torch.rand(1, 3, 64, 64)
    runner = RerunGraphs()
    graphed = GraphedCall(eval_model, runner)
    for _ in range(3):
        graphed(x)  # grad mode: the graph would not record the backward
    assert runner.captures == 0
    failing = RerunGraphs(fail=True)
    graphed = GraphedCall(eval_model, failing)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        outs = [graphed(x) for _ in range(4)]
        ref = eval_model(x)
    assert not graphed.enabled and all(torch.equal(o[0], ref[0]) for o in outs)
    warnings = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith(
        "cuda_graph: capture failed (operation not permitted when stream is capturing); predicting without a CUDA "
        "graph")


def test_predict_through_the_graph_equals_eager_and_keeps_its_predictor(tiny_yaml_file, monkeypatch, tmp_path):
    """The predictor's forward pass (Ultralytics' AutoBackend) through GraphedCall, as on CUDA."""
    runner = RerunGraphs()
    monkeypatch.setattr(predictor_module, "CUDAGraphRunner", lambda: runner)
    monkeypatch.setattr(predictor_module, "use_cuda_graph", lambda setting, device, pytorch: setting is not False)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    model = EMSYOLO(tiny_yaml_file())
    settings = {"imgsz": 64, "conf": 0.001, "save": False, "verbose": False, "project": str(tmp_path)}
    eager = [model.predict(f, cuda_graph=False, **settings)[0].boxes.data for f in frames]
    graphed = [model.predict(f, **settings)[0].boxes.data for f in frames]
    first = model.predictor
    assert runner.captures == 1 and runner.replays == 3 and model.predictor is first
    assert len(eager[0]) and all(torch.equal(a, b) for a, b in zip(eager, graphed))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_graph_true_without_cuda_is_one_line(capsys):
    assert run(["predict", "source=missing.jpg", "cuda_graph=True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ems-yolo: error: cuda_graph=True: CUDA graphs need a CUDA device, got device=cpu (predict with "
                   "device=0, or leave cuda_graph unset)"]
    assert run(["train", "cuda_graph=False"]) == 2
    assert "'cuda_graph' applies to 'predict' only" in capsys.readouterr().err
