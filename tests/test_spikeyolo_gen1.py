"""Checkpoints of SpikeYOLO's Gen1 code (issue 24 item 7): read without executing them, neurons as I-LIF `charge: gen1`.

There is no fixture written by that code: these tests are against our reading of it (BICLab/SpikeYOLO,
`SpikeYOLO_for_Gen1/`). Its `yolo_spikformer.py` is the COCO code's module for module except that every `mem_update`
is SpikingJelly's `MultiStepLIFNode(detach_reset=True, v_reset=None, backend='torch')` (its shipped SpikingJelly
0.0.0.0.12 copy: tau 2, `surrogate.Sigmoid` firing `round(clamp(v, 0, 4))`, soft reset `v -= spike`, state reset
before and after each forward by its `tasks.py`), and its YAML differs in the scales and row 8 (`[-1, 1,
MS_ConvBlock, [2,7]]`), which at scale s builds the same layers. So the Gen1 file is made here from the COCO
checkpoint that SpikeYOLO's code wrote (../shared/data/checkpoints/spikeyolo): every `mem_update` becomes the Gen1
neuron as SpikingJelly pickles it (stand-in classes registered under SpikingJelly's module names only while
pickling), the YAML becomes the Gen1 one, nc=2 (Gen1: car, pedestrian), as their Gen1 trainer's
`save_model` + `strip_optimizer` would write it.
"""

import importlib
import sys
import types
from collections import OrderedDict
from copy import deepcopy

import numpy as np
import pytest
import torch
from torch import nn

from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.inert_pickle import InertObject, inert_load
from ems_yolo.nn.spikeyolo_checkpoint import load_spikeyolo, read_spikeyolo
from foreign_checkpoints import assert_one_line
from shared_data import SHARED_DATA

COCO = SHARED_DATA / "checkpoints" / "spikeyolo" / "spikeyolo-s-coco-T1D4.pt"
pytestmark = pytest.mark.skipif(not COCO.exists(), reason="shared SpikeYOLO checkpoint not available")

FORK = "ultralytics.nn.modules.yolo_spikformer"
NEURON = "spikingjelly.clock_driven.neuron.MultiStepLIFNode"
SURROGATE = "spikingjelly.clock_driven.surrogate.Sigmoid"
GEN1_SCALES = {"n": [0.33, 0.25, 1024], "s": [0.33, 0.50, 1024], "m": [0.67, 0.75, 768], "l": [1.00, 1.00, 512],
               "x": [1.00, 1.25, 512]}  # the Gen1 YAML's (YOLOv8's) scales
T = 2  # the released Gen1 checkpoint's


def _stand_in(global_name: str, cache: dict) -> type:
    """A plain class that pickles as `global_name` (its module is registered while pickling)."""
    if global_name not in cache:
        module, name = global_name.rsplit(".", 1)
        cache[global_name] = type(name, (), {"__module__": module, "__qualname__": name})
    return cache[global_name]


def _gen1_neuron(mem_update: InertObject, cache: dict, neuron: str = NEURON, **changes) -> object:
    """SpikingJelly's MultiStepLIFNode as `MultiStepLIFNode(detach_reset=True, v_reset=None, backend='torch')`
    leaves it after `functional.reset_net`: nn.Module's fields, its memories and attributes, a Sigmoid surrogate."""
    module_fields = {k: v for k, v in mem_update.state.items() if k != "act"}
    surrogate = _stand_in(SURROGATE, cache)()
    surrogate.__dict__.update({**module_fields, "_modules": OrderedDict(), "alpha": 4.0, "spiking": True})
    memories = {"v": 0.0, "v_threshold": 1.0, "v_reset": None, "v_seq": None}
    memories.update({k: v for k, v in changes.items() if k in memories})
    node = _stand_in(neuron, cache)()
    node.__dict__.update({**module_fields, "_modules": OrderedDict(surrogate_function=surrogate),
                          "_memories": memories, "_memories_rv": dict(memories), "detach_reset": True, "tau": 2.0,
                          "decay_input": True, "cupy_fp32_inference": False, "backend": "torch",
                          "lava_s_cale": 64, "lava_neuron": None})
    node.__dict__.update({k: v for k, v in changes.items() if k not in memories})
    return node


def _rebuilt(obj, cache: dict, neuron_changes: dict):
    """The inert tree as picklable objects: real torch / Ultralytics classes where they exist, stand-ins for the
    fork's, the Gen1 neuron for every `mem_update`."""
    if isinstance(obj, InertObject):
        if obj.global_name == f"{FORK}.mem_update":
            return _gen1_neuron(obj, cache, **neuron_changes)
        module, name = obj.global_name.rsplit(".", 1)
        if module.startswith((FORK, "spikingjelly")):
            cls = _stand_in(obj.global_name, cache)
        else:
            cls = getattr(importlib.import_module(module), name)
        new = cls.__new__(cls)
        new.__dict__.update(_rebuilt(obj.state, cache, neuron_changes))
        return new
    if isinstance(obj, (dict, OrderedDict)):
        return type(obj)((k, _rebuilt(v, cache, neuron_changes)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuilt(v, cache, neuron_changes) for v in obj)
    return obj


def write_gen1_checkpoint(path, **neuron_changes):
    """The Gen1 checkpoint (s scale, nc=2) as their Gen1 trainer writes it; `neuron_changes` alter every neuron."""
    ckpt = inert_load(COCO)
    model = ckpt["model"]
    cfg = model.attr("yaml")
    cfg.update(nc=2, scales=GEN1_SCALES)
    cfg["backbone"][8] = [-1, 1, "MS_ConvBlock", [2, 7]]
    model.state.update(nc=2, names={0: "car", 1: "pedestrian"})
    head = model.state["_modules"]["model"].state["_modules"]["26"]
    head.state.update(nc=2, no=2 + 64)
    for branch in head.state["_modules"]["cv3"].state["_modules"].values():
        conv = branch.state["_modules"]["2"].state["_modules"]["conv"].state  # SpikeConvWithoutBN's conv
        conv["_parameters"] = OrderedDict((k, nn.Parameter(v[:2], requires_grad=False))
                                          for k, v in conv["_parameters"].items())
        conv["out_channels"] = 2
    cache: dict[str, type] = {}
    rebuilt = _rebuilt(ckpt, cache, neuron_changes)
    fake = {}
    for name in {c.__module__ for c in cache.values()}:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            fake.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for cls in cache.values():
        setattr(fake[cls.__module__], cls.__qualname__, cls)
    added = [name for name in fake if name not in sys.modules]
    sys.modules.update({name: fake[name] for name in added})
    try:
        torch.save(rebuilt, path)
    finally:
        for name in added:
            del sys.modules[name]
    return path


@pytest.fixture(scope="module")
def gen1_file(tmp_path_factory):
    return write_gen1_checkpoint(tmp_path_factory.mktemp("gen1") / "spikeyolo-s-gen1.pt")


@pytest.fixture(scope="module")
def loaded(gen1_file):
    """(model, checkpoint data) of the Gen1 file (copy the model before changing it)."""
    return load_spikeyolo(gen1_file)


class TheirGen1Neuron(nn.Module):
    """Our reading of the Gen1 code's neuron, written out independently of ems-yolo's I-LIF: SpikingJelly's
    MultiStepLIFNode (tau=2, decay_input, v_reset=None) with the shipped Sigmoid surrogate, from v = 0 each pass:
    v = v + (x - v) / 2 (= 0.5 v + 0.5 x); s = round(clamp(v, 0, 4)); v = v - s. Input time-folded [T*B, ...]."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps, self.fired = time_steps, torch.zeros(5, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, spikes = 0.0, []
        for x_t in x.view(self.time_steps, -1, *x.shape[1:]):
            v = v + (x_t - v) / 2.0
            s = torch.round(torch.clamp(v, min=0, max=4))
            v = v - s
            spikes.append(s)
        out = torch.stack(spikes).flatten(0, 1)
        self.fired += torch.bincount(out.flatten().long(), minlength=5)
        return out


def _event_frames(time_steps: int, size: int = 32) -> torch.Tensor:
    """Gen1 input as their pre_gen1.py draws it: per step a grey frame (127) with ON (255) and OFF (0) pixels, 3
    identical channels, /255; time-major channels `[1, 3*T, H, W]` (their `[B, T, 3, H, W]`)."""
    levels = torch.tensor([0.0, 127.0, 255.0], dtype=torch.float64) / 255
    frames = levels[torch.multinomial(torch.tensor([0.2, 0.6, 0.2]), time_steps * size * size, replacement=True)]
    return frames.view(time_steps, 1, size, size).expand(time_steps, 3, size, size).reshape(1, -1, size, size)


def _raw(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.double().eval()(x)[1]["feats"]


def test_reads_the_gen1_file_as_data(gen1_file):
    sy = read_spikeyolo(gen1_file)
    assert not any(name.startswith("spikingjelly") for name in sys.modules)  # registered only while pickling
    assert (sy.charge, sy.levels, sy.time_steps) == ("gen1", 4, T)
    assert sy.modules["model.2.Conv.lif1"].global_name == NEURON and sy.names == {0: "car", 1: "pedestrian"}
    assert len(sy.tensors) == 755


@pytest.mark.slow
def test_gen1_neurons_and_float64_outputs_of_their_neuron(loaded):
    """Loaded one-to-one; every neuron an I-LIF with charge gen1 (D=4, tau 0.5); raw head outputs in float64 equal
    those of the same network with each neuron replaced by `TheirGen1Neuron`, which fires every level 0..4; the
    COCO charge gives other outputs (the check is not blind to the neuron)."""
    model, sy = loaded
    assert model.yaml["input"] == "events" and model.yaml["channels"] == 3 * T and model.time_steps == T
    assert model.yaml["neuron"] == {"kind": "ilif", "levels": 4, "charge": "gen1"}
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for k, t in sy.tensors.items()
                                                             if "running" not in k and "num_batches" not in k)
    neurons = [m for m in model.modules() if isinstance(m, ILIF)]
    assert len(neurons) == 88 and all((m.charge, m.levels, m.tau) == ("gen1", 4, 0.5) for m in neurons)

    x = _event_frames(T)
    ours = _raw(deepcopy(model), x)
    theirs_model = deepcopy(model)
    for name, m in list(theirs_model.named_modules()):
        if isinstance(m, ILIF):
            parent, leaf = name.rsplit(".", 1)
            setattr(theirs_model.get_submodule(parent), leaf, TheirGen1Neuron(T))
    theirs = _raw(theirs_model, x)
    assert [o.shape[-1] for o in ours] == [4, 2, 1] and ours[0].shape[1] == 4 * 16 + 2
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-9
    fired = sum(m.fired for m in theirs_model.modules() if isinstance(m, TheirGen1Neuron))
    assert (fired > 0).all(), fired
    leak = deepcopy(model)
    for m in leak.modules():
        if isinstance(m, ILIF):
            m.charge, m.tau = "leak", 0.25
    assert max((a - b).abs().max().item() for a, b in zip(_raw(leak, x), ours)) > 1e-3


@pytest.mark.slow
def test_convert_command_and_emsyolo_on_the_gen1_file(gen1_file, loaded, gen1_synth, gen1_cache, tmp_path):
    """`ems-yolo convert source=<Gen1 .pt>` writes an ems-yolo checkpoint with the same outputs, recording pre_gen1.py's
    input (the 250 ms before the label in T ems_frames bins); EMSYOLO(<Gen1 .pt>) reads it directly, here with T from
    `time_steps=` (3 event frames: 9 input channels), validates on event caches of 3 bins of ems_frames (at its own
    T=2 they are one line) and predicts along a Gen1 recording."""
    from typer.testing import CliRunner

    from ems_yolo import EMSYOLO
    from ems_yolo.cli import app
    from ems_yolo.engine.checkpoints import load_checkpoint_file, spikeyolo_summary
    from ems_yolo.events.automotive import find_recordings

    r = CliRunner().invoke(app, ["convert", f"source={gen1_file}", f"out={tmp_path / 'g.pt'}"])
    assert r.exit_code == 0, r.output
    note = spikeyolo_summary(*loaded, None)  # what convert prints: T is not in the file
    assert "T=2 (the released Gen1 checkpoint's T; set time_steps= for another)" in note
    assert note.endswith("\n  input ems_frames: 2 bins of the 250 ms before each window end at 304x240 (as their "
                         "pre_gen1.py makes it)")
    converted = load_checkpoint_file(tmp_path / "g.pt")["model"]
    assert converted.yaml["neuron"] == {"kind": "ilif", "levels": 4, "charge": "gen1"} and converted.names[1] == \
        "pedestrian"
    assert converted.yaml["events"] == {"name": "ems_frames", "bins": 2, "window_us": 250_000, "height": 240,
                                        "width": 304, "cutoff": 10}
    x = _event_frames(T)
    for a, b in zip(_raw(converted, x), _raw(deepcopy(loaded[0]), x)):
        assert torch.equal(a, b)
    three = EMSYOLO(gen1_file, time_steps=3)
    assert three.time_steps == 3 and three.model.yaml["channels"] == 9
    assert three.ckpt["converted_from"]["file"] == str(gen1_file)
    assert len(_raw(three.model, _event_frames(3))) == 3
    data = tmp_path / "gen1.yaml"
    data.write_text(f"path: {gen1_cache}\ntrain: train.h5\nval: val.h5\nnames: [car, pedestrian]\n")
    val = dict(data=str(data), imgsz=64, batch=2, plots=False, project=str(tmp_path / "runs"))
    assert 0 <= three.val(**val).box.map50 <= 1
    with pytest.raises(ValueError, match=r"val\.h5: 9 input channels \(3 bins x 3 of ems_frames\), but the model "
                                         r"\S+ reads 6 \(T=2 x 3\); expected data of 6 channels"):
        EMSYOLO(gen1_file).val(**val)
    td = find_recordings(gen1_synth / "val")[0][1]  # a 2 s _td.dat recording
    results = three.predict(td, stride_ms=500, imgsz=64, conf=0.001, save=False)
    ends = [int(r.path.rsplit("@", 1)[1].removesuffix("us")) for r in results]
    assert len(ends) >= 3 and set(np.diff(ends)) == {500_000}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"v_reset": 0.0}, r"neuron 'model\.2\.Conv\.lif1' \(spikingjelly\.clock_driven\.neuron\.MultiStepLIFNode\) "
                           r"has v_reset=0\.0, expected None"),
        ({"tau": 3.0}, r"neuron 'model\.2\.Conv\.lif1' .* has tau=3\.0, expected 2\.0"),
        ({"neuron": "spikingjelly.clock_driven.neuron.MultiStepParametricLIFNode"},
         r"module class spikingjelly\.clock_driven\.neuron\.MultiStepParametricLIFNode \(at 'model\.2\.Conv\.lif1'\) "
         r"has no ems-yolo counterpart"),
    ],
    ids=["hard-reset", "tau", "unknown-class"],
)
def test_a_gen1_neuron_built_otherwise_is_one_line(changes, message, tmp_path):
    """A neuron the mapping does not know, or the Gen1 neuron with other settings: one line naming the row (the
    first neuron is in row 2), the neuron and what differs."""
    path = write_gen1_checkpoint(tmp_path / "other.pt", **changes)
    with pytest.raises(ValueError, match=r"model row 2 \(MS_AllConvBlock\): " + message) as e:
        read_spikeyolo(path)
    assert_one_line(e.value, path)


def test_the_gen1_rows_build_the_layers_of_spikeyolo_s(gen1_file):
    """Their Gen1 YAML at scale s (other scales, row 8 `[-1, 1, MS_ConvBlock, [2,7]]`) builds the layers of
    spikeyolo-s.yaml, argument for argument; only the neuron, the event input and nc differ (meta device)."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.nn.parser import parse_model
    from ems_yolo.nn.spikeyolo_checkpoint import ems_model_yaml

    gen1 = ems_model_yaml(read_spikeyolo(gen1_file))
    coco = {**load_model_yaml("spikeyolo-s.yaml"), **{k: gen1[k] for k in ("nc", "time_steps", "channels", "input")}}
    with torch.device("meta"):
        theirs, _ = parse_model(gen1, 3 * T)
        ours, _ = parse_model(coco, 3 * T)
    assert [(m.type, m.n, m.f, m.args) for m in theirs] == [(m.type, m.n, m.f, m.args) for m in ours]
