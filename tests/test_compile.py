"""torch.compile of the spiking model (issue 23 item 3): the LIF and fused tdBN + LIF run as `torch.library` custom
ops (opaque to inductor, with fake implementations), so dynamo traces a forward as one graph, compiled training
steps equal eager ones, and Ultralytics' `compile=True` trains, validates and predicts on the CPU.

`bash tools/compat.sh --torch` runs this file under the oldest torch setup.cfg allows."""

import pytest
import torch

from ems_yolo.cfg import load_model_yaml
from ems_yolo.nn import EMSDetectionModel
from ems_yolo.nn.ops import bn_lif, lif

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def small_cfg(time_steps: int = 2) -> dict:
    """ems-res10's stem, four blocks (both block kinds) and its head at 8-16 channels: what compiles fastest."""
    d = load_model_yaml("ems-res10.yaml")
    d.update(nc=2, time_steps=time_steps, autoanchor=False, width_multiple=1.0)
    d["backbone"] = [[-1, 1, "EncodingConv", [8, 3, 2]], [-1, 1, "EMSBlock2", [16, 3, 2, 0.5]],
                     [-1, 1, "EMSBlock2", [16, 3, 2, 0.5]], [-1, 1, "EMSBlock1", [16, 3, 2]],
                     [-1, 1, "EMSBlock1", [16, 3, 2]]]
    d["head"] = [[[3, 4], 1, "EMSDetect", ["nc", "anchors"]]]
    return d


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration of each op, checked by torch itself."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6) + 0.4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (torch.rand(3) + 0.5).requires_grad_(), (torch.rand(3) - 0.2).requires_grad_()
    currents = x.view(2, 2, 3, 5, 6)
    spikes, code = lif.forward(currents.detach(), 0.25, 0.5, 1.0, False)
    cases = [
        (torch.ops.ems_yolo.lif_forward.default, (currents, 0.25, 0.5, 1.0, False)),
        (torch.ops.ems_yolo.lif_backward.default, (torch.randn_like(spikes), code, 0.25, 1.0, False)),
        (torch.ops.ems_yolo.lif_decode.default, (code, torch.float16, False)),
        (torch.ops.ems_yolo.bn_lif_forward.default, (x, w, b, 1e-5, 2, 0.25, 0.5, 1.0, False)),
        (torch.ops.ems_yolo.max_pool2_forward.default, (x, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    assert bn_lif.forward(x, w, b, 1e-5, 2, 0.25, 0.5, 1.0, False)[0].shape == x.shape


def test_compiled_training_step_is_one_graph_and_equals_eager():
    """Dynamo traces the training forward as one graph (fullgraph) holding the custom ops as nodes, and AOTAutograd
    over it (fake tensors through the ops, their registered backward) gives eager's outputs and gradients. The
    aot_eager backend skips inductor's C++ build (minutes on a small CPU); `compile=True` below runs the engines."""
    model = EMSDetectionModel(small_cfg(), verbose=False).train()
    x = torch.rand(2, 3, 64, 64)
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    results = []
    for fn in (model, torch.compile(model, backend=backend, fullgraph=True)):
        model.zero_grad()
        out = fn(x)
        sum((o * o.detach()).sum() for o in out).backward()
        results.append(([o.detach() for o in out], [p.grad.clone() for p in model.parameters()]))
    assert len(graphs) == 1
    targets = {str(n.target) for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function"}
    assert {"ems_yolo.bn_lif_forward.default", "ems_yolo.lif_forward.default"} <= targets, sorted(targets)
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_key_trains_validates_and_predicts(tmp_path, monkeypatch, caplog):
    """Ultralytics' `compile=True` through ems-yolo's train, val and predict: every engine compiles its model and
    runs it (inductor swapped for aot_eager: its C++ build would take minutes here; `tools/compat.sh --torch`
    with EMS_YOLO_INDUCTOR=1 runs inductor itself)."""
    import os

    from ems_yolo import EMSYOLO
    from ems_yolo.data.shapes import make_shapes_dataset
    from ems_yolo.engine.model import derive_model_yaml

    compiled = []
    real = torch.compile
    if os.environ.get("EMS_YOLO_INDUCTOR") != "1":
        def fast_compile(model, *args, **kwargs):
            compiled.append(type(model).__name__)
            kwargs.pop("mode", None)
            return real(model, *args, **{**kwargs, "backend": "aot_eager"})

        monkeypatch.setattr(torch, "compile", fast_compile)
    data = make_shapes_dataset(n_train=8, n_val=4, imgsz=64)
    fast = dict(imgsz=64, batch=4, workers=0, plots=False, verbose=False, compile=True)
    EMSYOLO(derive_model_yaml(small_cfg(1))).train(data=str(data), epochs=1, project=str(tmp_path), name="t", **fast)
    best = tmp_path / "t" / "weights" / "best.pt"
    val = EMSYOLO(best).val(data=str(data), project=str(tmp_path), name="v", **fast)
    ref = EMSYOLO(best).val(data=str(data), project=str(tmp_path), name="v2", **{**fast, "compile": False})
    assert val.box.map == pytest.approx(ref.box.map, abs=1e-6)
    image = sorted((data.parent / "images" / "val").glob("*"))[0]
    got = EMSYOLO(best).predict(str(image), conf=0.001, **{k: v for k, v in fast.items() if k != "workers"})
    want = EMSYOLO(best).predict(str(image), conf=0.001, imgsz=64, verbose=False)
    torch.testing.assert_close(got[0].boxes.data, want[0].boxes.data, rtol=1e-4, atol=1e-3)
    assert "continuing uncompiled" not in caplog.text
    if compiled:
        assert compiled == ["EMSDetectionModel", "AutoBackend", "AutoBackend"], compiled  # train, val, predict
