"""Each hook of ems_yolo.ultralytics_compat still matches the Ultralytics internal it replaces.

These fail loudly on an Ultralytics release that changes one of them, naming the hook to revisit.
"""

import inspect
import logging
import re

import pytest
import torch
import ultralytics.engine.trainer as ul_trainer
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.nn import tasks
from ultralytics.nn.modules import Detect

from ems_yolo import ultralytics_compat as compat
from ems_yolo.nn import EMSDetect, EMSDetectionModel


def _source(*objects) -> str:
    return "\n".join(inspect.getsource(o) for o in objects)


def test_hook1_parser_channel_rules_match_ultralytics_signatures():
    for name in compat.UL_CHANNEL_MODULES | compat.UL_REPEAT_MODULES:
        params = list(inspect.signature(getattr(tasks, name).__init__).parameters)[1:]
        assert params[:2] == ["c1", "c2"], f"{name}{params}: no longer (c1, c2, ...)"
        if name in compat.UL_REPEAT_MODULES:
            assert params[2] == "n", f"{name}{params}: repeat count no longer the third argument"


def test_hook2_model_sets_every_attribute_detection_model_init_sets(tiny_cfg):
    helpers = [getattr(tasks, n) for n in ("_initialize_yolo_model",) if hasattr(tasks, n)]
    src = _source(tasks.DetectionModel.__init__, *helpers)
    assert "parse_model(" in src  # the reason for the bypass: it builds with the stock parser
    set_by_ultralytics = set(re.findall(r"(?:self|model)\.(\w+)\s*=(?!=)", src))
    assert set_by_ultralytics <= set(compat.DETECTION_MODEL_ATTRIBUTES), set_by_ultralytics
    model = EMSDetectionModel(tiny_cfg(nc=2, time_steps=1), verbose=False)
    for name in compat.DETECTION_MODEL_ATTRIBUTES:
        assert hasattr(model, name), name
    assert torch.equal(model.stride, torch.tensor([16.0, 32.0]))


def test_hook3_head_defines_what_detect_init_defines():
    set_by_detect = set(re.findall(r"self\.(\w+)\s*=(?!=)", inspect.getsource(Detect.__init__)))
    head = EMSDetect(2, [[10, 14, 23, 27], [37, 58, 81, 82]], [8, 16])
    missing = sorted(a for a in set_by_detect if not hasattr(head, a))
    assert missing == []


def test_hook4_amp_check_is_the_module_global_used_by_setup_train():
    assert "check_amp(" in inspect.getsource(BaseTrainer._setup_train)
    real = ul_trainer.check_amp
    with compat.offline_amp_check(lambda model: "ours"):
        assert ul_trainer.check_amp(None) == "ours"
    assert ul_trainer.check_amp is real


def test_hook5_checkpoints_are_written_with_write_bytes(tmp_path):
    src = inspect.getsource(BaseTrainer.save_model)
    assert src.count(".write_bytes(") >= 3 and "self.wdir /" in src  # last, best, epoch<N> via wdir
    p = compat.AtomicPath(tmp_path / "w") / "epoch3.pt"
    assert isinstance(p, compat.AtomicPath)
    assert p.write_bytes(b"abc") == 3 and p.read_bytes() == b"abc"
    assert [f.name for f in p.parent.iterdir()] == ["epoch3.pt"]


def test_hook6_layer_routing_is_what_the_checkpointing_loop_repeats(tiny_cfg):
    from ultralytics.nn.tasks import BaseModel

    src = inspect.getsource(BaseModel._predict_once)
    assert "m.f" in src and "m.i in self.save" in src and "x = m(x)" in src
    torch.manual_seed(0)
    plain = EMSDetectionModel(tiny_cfg(nc=2, time_steps=2), verbose=False)
    ckpt = EMSDetectionModel({**tiny_cfg(nc=2, time_steps=2), "checkpoint": True}, verbose=False)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(plain.train()(x), ckpt.train()(x)):
        assert torch.equal(a, b)


def test_hook7_every_checkpoint_read_goes_through_torch_safe_load(tmp_path):
    import ems_yolo.engine.checkpoints  # noqa: F401  (routes the loader)
    assert "torch_safe_load(" in inspect.getsource(tasks.load_checkpoint)
    assert "load_checkpoint(" in _source(BaseTrainer.setup_model, BaseTrainer.check_resume)
    bad = tmp_path / "x.pt"
    torch.save({"model": None, "payload": print}, bad)  # builtins.print: not an allowed class
    with pytest.raises(ValueError, match="needs builtins.print to load"):
        tasks.load_checkpoint(bad)


def test_hook8_exporter_logs_the_commands_it_rewrites(caplog):
    from ultralytics.engine.exporter import Exporter
    from ultralytics.utils import LOGGER

    from ems_yolo.ultralytics_compat import ems_yolo_hints

    assert re.search(r"yolo predict task=\{", inspect.getsource(Exporter.__call__))
    with caplog.at_level(logging.INFO), ems_yolo_hints():
        LOGGER.info("Predict:         yolo predict task=detect model=a.onnx imgsz=64")
    assert "Predict:         ems-yolo predict model=a.onnx imgsz=64" in caplog.text


def test_hook9_setup_train_wraps_ddp_with_the_device_index_that_cpu_ddp_maps():
    import torch

    assert "DistributedDataParallel(" in inspect.getsource(BaseTrainer._setup_train)
    assert "device_ids=[self.device.index]" in inspect.getsource(BaseTrainer._setup_train)
    real = torch.nn.parallel.DistributedDataParallel
    with compat.cpu_ddp():
        patched = torch.nn.parallel.DistributedDataParallel
        assert issubclass(patched, real) and patched is not real
    assert torch.nn.parallel.DistributedDataParallel is real


def test_hook10_parse_model_reads_safe_load_from_its_module_globals():
    assert tasks.SAFE_LOAD is True and tasks._SafeLoad.restricted()
    assert "SAFE_LOAD" in inspect.getsource(tasks._SafeLoad.restricted)
    assert "_SafeLoad.activation(act) if restricted else eval(act)" in inspect.getsource(tasks.parse_model)
    with pytest.raises(TypeError, match="unsupported activation"):
        tasks.parse_model({"nc": 1, "activation": "print('x') or nn.SiLU()", "backbone": [], "head": []}, ch=3,
                          verbose=False)


def test_hook11_ultralytics_settings_banner_is_the_message_the_filter_drops():
    from ultralytics.utils import SettingsManager

    src = _source(SettingsManager.__init__)
    assert "'yolo settings" in src, "hook 11: the settings banner no longer names 'yolo settings'"
    record = logging.LogRecord("ultralytics", logging.INFO, "", 0, "View Ultralytics Settings with 'yolo settings'",
                               None, None)
    assert not compat._NoUltralyticsSettingsBanner().filter(record)


def test_hook12_tuner_trains_through_the_multitrainer_it_imports_from_the_trainer_module():
    from ultralytics.engine.tuner import Tuner

    src = _source(Tuner.__call__)
    assert "from ultralytics.engine.trainer import MultiTrainer" in src and "MultiTrainer(None," in src, \
        "hook 12: Tuner no longer builds MultiTrainer(None, ...) from ultralytics.engine.trainer"
    assert list(inspect.signature(ul_trainer.MultiTrainer.__init__).parameters)[1:4] == ["trainer", "args", "model"]
    with compat.in_process_tuning(BaseTrainer):
        assert ul_trainer.MultiTrainer(None, {}, None).trainer is BaseTrainer
    assert ul_trainer.MultiTrainer(None, {}, None).trainer is None
