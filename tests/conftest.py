"""Shared test set-up: a private ems-yolo home (fonts, settings, generated data) and common fixtures."""

import os
import tempfile

if os.environ.get("PYTEST_XDIST_WORKER"):
    # a worker of `pytest -n N`: a home of its own (the controller's would be shared), one thread per worker
    os.environ["EMS_YOLO_HOME"] = tempfile.mkdtemp(prefix=f"ems-yolo-tests-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    os.environ.setdefault("EMS_YOLO_HOME", tempfile.mkdtemp(prefix="ems-yolo-tests-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic torch RNG in every test."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _empty_working_folder(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: nothing it reads or writes may resolve against the user's
    working folder (a dataset or runs/ folder there must not change a result)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def coco8():
    """The root of the shipped COCO8 as ems-yolo reads it: its copy in the test home (Ultralytics writes its label
    caches there, never into the package or ../shared)."""
    from pathlib import Path

    import yaml

    from ems_yolo.data.datasets import resolve_data

    return Path(yaml.safe_load(Path(resolve_data("coco8.yaml")).read_text())["path"])


@pytest.fixture
def tiny_cfg():
    """Factory: a built-in model YAML at reduced width with overrides (nc, time_steps, ...) applied."""
    from ems_yolo.cfg import load_model_yaml

    def make(name: str = "ems-res10.yaml", width: float = 0.25, **overrides) -> dict:
        d = load_model_yaml(name)
        d["width_multiple"] = width
        d.update(overrides)
        return d

    return make


@pytest.fixture(scope="session")
def tiny_yaml_file():
    """Factory: the path of ems-res10.yaml at reduced width, written as a derived YAML (the trainer rebuilds models
    from the file named in its arguments)."""
    from ems_yolo.cfg import load_model_yaml
    from ems_yolo.engine.model import derive_model_yaml

    def make(width: float = 0.25) -> str:
        d = load_model_yaml("ems-res10.yaml")
        d["width_multiple"] = width
        return str(derive_model_yaml(d))

    return make


@pytest.fixture(scope="session")
def gen1_synth(tmp_path_factory):
    """Synthetic Gen1 recordings (3 train, 1 val, 1 test of 2 s), shared read only: copy a file before changing it."""
    from ems_yolo.events.synthetic import make_synthetic_gen1

    return make_synthetic_gen1(tmp_path_factory.mktemp("gen1") / "raw", n_train=3, n_val=1, n_test=1, duration_s=2.0)


@pytest.fixture(scope="session")
def gen1_cache(gen1_synth, tmp_path_factory):
    """The split caches of `gen1_synth` in `event_data.GEN1_REP`, shared read only (as a reference to compare with)."""
    from event_data import GEN1_REP

    from ems_yolo.events.automotive import SPLITS, preprocess_dataset

    out = tmp_path_factory.mktemp("gen1-cache")
    assert preprocess_dataset(gen1_synth, out, "gen1", GEN1_REP, progress=False) == {s: out / f"{s}.h5" for s in SPLITS}
    return out
