"""Issue #21, part B: nothing of the user's is deleted or overwritten, and interrupted commands rerun to completion.

Each test reproduces one defect of defects-2026-12-04.md (D2, D4, D5, D8, D9, D16, D17) with real models, real
files and, where the defect is about other processes or signals, real processes.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from event_data import random_events, tiny_event_checkpoint
from shared_data import SHARED_DATA

from ems_yolo import EMSYOLO
from ems_yolo.cfg import DATASETS_DIR, load_model_yaml
from ems_yolo.cli import run
from ems_yolo.data.shapes import make_shapes_dataset
from ems_yolo.engine.checkpoints import load_checkpoint_file
from ems_yolo.engine.model import derive_model_yaml
from ems_yolo.events.io import EVENT_DTYPE, read_dat, write_dat
from ems_yolo.events.raw import write_raw_evt2
from ems_yolo.events.representations import EventRepresentation

COCO8_IMAGES = DATASETS_DIR / "coco8" / "images" / "val"  # the shipped COCO8, read only
EVT3 = SHARED_DATA / "events" / "evt3_sample.raw"
ORIGINAL = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
FAST = dict(workers=0, plots=False, batch=2, imgsz=64, device="cpu", verbose=False)


def cli(*args) -> int:
    return run([str(a) for a in args])


def ems_yolo_process(*args, **popen) -> subprocess.Popen:
    """`python -m ems_yolo <args>` in its own process (this checkout first on the path, one thread)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ems_yolo", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll until `condition()` holds; fails if the process ends first (its output is shown)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) first:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.2)


def written_by(path: Path, pid: int, suffix: str = "") -> Path:
    """A temporary of `path` named as process `pid` of this machine names it."""
    from ems_yolo.utils.files import temporary_sibling

    return path.with_name(temporary_sibling(path, suffix).name.replace(f".{os.getpid()}-", f".{pid}-"))


def dead_pid() -> int:
    """The pid of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny frame model YAML (width 0.125, T=1) and the built-in shapes data."""
    cfg = load_model_yaml("ems-res10.yaml")
    cfg.update(width_multiple=0.125, time_steps=1)
    return str(derive_model_yaml(cfg)), str(make_shapes_dataset(n_train=8, n_val=4, imgsz=64))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny):
    """The weights/last.pt (epoch 1 of 3 done) and results.csv of a run interrupted after its first epoch."""
    model_yaml, data = tiny
    project = tmp_path_factory.mktemp("interrupted")
    model = EMSYOLO(model_yaml)

    def stop(trainer):
        raise KeyboardInterrupt

    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=data, epochs=3, project=str(project), name="r", **FAST)
    run_dir = project / "r"
    assert load_checkpoint_file(run_dir / "weights" / "last.pt")["epoch"] == 0
    return run_dir


def copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    return dst


@pytest.fixture(scope="module")
def event_model(tmp_path_factory):
    """A tiny checkpoint of a model for event input (2 bins of 20 ms ems_frames, 64x48) and a 30 s recording."""
    d = tmp_path_factory.mktemp("evmodel")
    pt = tiny_event_checkpoint(d / "ev.pt", EventRepresentation(bins=2, window_us=20_000, height=48, width=64))
    ev = random_events(30_000, 30_000_000, 64, 48)
    ev["t"][[0, -1]] = 0, 29_999_999  # 30,000 windows of 1 ms
    raw = write_raw_evt2(d / "long.raw", ev, 64, 48)
    return pt, raw


# D2: a failing or interrupted command removes only what it created ------------------------------------------------

def test_interrupting_a_training_keeps_the_runs_other_processes_finished_meanwhile(tmp_path, tiny):
    model_yaml, data = tiny
    project = tmp_path / "shared"
    train = ems_yolo_process("train", f"model={model_yaml}", f"data={data}", "epochs=200", "imgsz=64", "batch=2",
                             "workers=0", "device=cpu", f"project={project}", "name=trainA", "plots=False")
    try:
        wait_for(lambda: (project / "trainA" / "args.yaml").exists(), train)
        for mode, extra in (("predict", f"source={COCO8_IMAGES}"), ("val", f"data={data}")):
            other = ems_yolo_process(mode, f"model={model_yaml}", extra, "imgsz=64", "batch=2", "workers=0",
                                     "device=cpu", f"project={project}", f"name={mode}B", "plots=False")
            out, _ = other.communicate(timeout=600)
            assert other.returncode == 0, out
        assert train.poll() is None, "the training ended before it could be interrupted"
        train.send_signal(signal.SIGINT)
        train.communicate(timeout=300)
    finally:
        train.kill()
    assert train.returncode != 0
    assert sorted(p.name for p in (project / "predictB").iterdir()) == sorted(p.name for p in COCO8_IMAGES.iterdir())
    assert (project / "valB").is_dir()
    train_dir = project / "trainA"
    assert not train_dir.exists() or list(train_dir.rglob("*.pt"))  # its own run: removed, or kept resumable


class Boom(RuntimeError):
    """The failure injected into a command."""


def _fail_making_a_neighbour(project: Path):
    """A callback that, as another process would, makes a run folder in the project, then fails the command."""

    def callback(*_):
        (project / "neighbour").mkdir()
        (project / "neighbour" / "result.txt").write_text("another command's result")
        raise Boom

    return callback


@pytest.mark.parametrize("point", ["train:on_pretrain_routine_start", "train:on_train_epoch_start",
                                   "val:on_val_start", "val:on_val_end", "predict:on_predict_start",
                                   "predict:on_predict_postprocess_end"])
def test_a_failing_command_removes_its_own_folder_only(tmp_path, tiny, point):
    model_yaml, data = tiny
    mode, event = point.split(":")
    project = tmp_path / "p"
    (project / "earlier").mkdir(parents=True)  # a run from before, without a checkpoint
    model = EMSYOLO(model_yaml)
    model.add_callback(event, _fail_making_a_neighbour(project))
    kwargs = dict(project=str(project), name="mine", **FAST)
    with pytest.raises(Boom):
        if mode == "train":
            model.train(data=data, epochs=1, **kwargs)
        elif mode == "val":
            model.val(data=data, **kwargs)
        else:
            model.predict(str(COCO8_IMAGES), save=True, **{k: v for k, v in kwargs.items() if k != "workers"})
    assert sorted(p.name for p in project.iterdir()) == ["earlier", "neighbour"]
    assert (project / "neighbour" / "result.txt").read_text() == "another command's result"


def test_a_failing_run_into_an_existing_folder_keeps_the_folder(tmp_path, tiny):
    model_yaml, data = tiny
    mine = tmp_path / "p" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    model = EMSYOLO(model_yaml)
    model.add_callback("on_val_start", _fail_making_a_neighbour(tmp_path / "p"))
    with pytest.raises(Boom):
        model.val(data=data, project=str(tmp_path / "p"), name="mine", exist_ok=True, **FAST)
    assert (mine / "notes.txt").read_text() == "mine"


# D4: an output is never one of the inputs ------------------------------------------------------------------------

def _same_file_spellings(src: Path) -> list[Path]:
    """Paths of `src` itself: as is, through `..`, a symbolic link and a hard link."""
    sym = src.with_name("sym" + src.suffix)
    sym.symlink_to(src)
    hard = src.with_name("hard" + src.suffix)
    os.link(src, hard)
    return [src, src.parent / ".." / src.parent.name / src.name, sym, hard]


@pytest.mark.parametrize("suffix", [".raw", ".dat"])
def test_events_out_equal_to_source_is_refused(tmp_path, capsys, suffix):
    src = tmp_path / f"rec{suffix}"
    if suffix == ".raw":
        shutil.copy(EVT3, src)
    else:
        assert cli("events", f"source={EVT3}", f"out={src}") == 0
    before = src.read_bytes()
    capsys.readouterr()
    for out in _same_file_spellings(src):
        assert cli("events", f"source={src}", f"out={out}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "same file as source=" in err[0] and f"out={out}" in err[0], err
        assert src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_events_simulation_out_equal_to_the_video_is_refused(tmp_path, capsys):
    video = tmp_path / "clip.avi"
    shutil.copy(SHARED_DATA / "videos" / "pedestrians.avi", video)
    before = video.read_bytes()
    assert cli("events", f"source={video}", f"out={video}", "max_frames=3") == 2
    assert "same file as source=" in capsys.readouterr().err
    assert video.read_bytes() == before


def test_convert_out_equal_to_source_is_refused(tmp_path, capsys):
    src = tmp_path / "orig.pt"
    shutil.copy(ORIGINAL, src)
    before = src.read_bytes()
    for out in _same_file_spellings(src):
        assert cli("convert", f"source={src}", f"out={out}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "same file as source=" in err[0], err
    assert src.read_bytes() == before


def test_predict_into_the_source_folder_is_refused(tmp_path, tiny, event_model, capsys):
    model_yaml, _ = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    image = folder / "000000000036.jpg"
    shutil.copy(COCO8_IMAGES / image.name, image)
    pt, raw = event_model
    rec = folder / "rec.raw"
    shutil.copy(raw, rec)
    (folder / "rec_bbox.npy").write_bytes(b"ground truth labels")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for model, source in ((model_yaml, image), (model_yaml, folder), (pt, rec)):
        capsys.readouterr()
        rc = cli("predict", f"model={model}", f"source={source}", f"project={tmp_path}", "name=imgs", "exist_ok=True",
                 "imgsz=64", "stride_ms=5000" if source == rec else "conf=0.25")
        assert rc == 2, capsys.readouterr()
        assert "is the folder of source=" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# D5: a checkpoint's recorded paths are never where a resume writes ------------------------------------------------

def _forged(interrupted: Path, victim: Path, **train_args) -> dict:
    ckpt = load_checkpoint_file(interrupted / "weights" / "last.pt")
    ckpt["train_args"].update(save_dir=str(victim), project=str(victim.parent), name=victim.name, epochs=2,
                              **train_args)
    return ckpt


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "results.csv").write_text("precious\n")
    return victim


def test_resume_of_a_loose_checkpoint_is_refused(tmp_path, interrupted, capsys):
    victim = _victim(tmp_path)
    evil = tmp_path / "evil" / "innocent.pt"
    evil.parent.mkdir()
    torch.save(_forged(interrupted, victim), evil)
    assert cli("train", f"model={evil}", "resume=True") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "<run>/weights/last.pt" in err[0], err
    assert sorted(p.name for p in victim.iterdir()) == ["results.csv"]
    assert (victim / "results.csv").read_text() == "precious\n"


@pytest.mark.parametrize("shape", ["save_dir", "project_name_only"])
def test_resume_writes_only_into_the_checkpoints_own_run(tmp_path, interrupted, shape):
    victim = _victim(tmp_path)
    run_dir = copy_run(interrupted, tmp_path / "runs" / "moved")
    ckpt = _forged(interrupted, victim)
    if shape == "project_name_only":
        ckpt["train_args"]["save_dir"] = None
    torch.save(ckpt, run_dir / "weights" / "last.pt")
    EMSYOLO(run_dir / "weights" / "last.pt").train(resume=True)
    assert sorted(p.name for p in victim.iterdir()) == ["results.csv"]
    assert (victim / "results.csv").read_text() == "precious\n"
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["save_dir"] == str(run_dir)


# D8: killed writers leave nothing for good; a resume does not repeat an epoch --------------------------------------

def test_resume_after_a_kill_cleans_temporaries_and_does_not_repeat_an_epoch(tmp_path, interrupted):
    run_dir = copy_run(interrupted, tmp_path / "r")
    ckpt = load_checkpoint_file(run_dir / "weights" / "last.pt")
    ckpt["train_args"].update(save_dir=str(run_dir), epochs=2)
    torch.save(ckpt, run_dir / "weights" / "last.pt")
    results = run_dir / "results.csv"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 2  # header and epoch 1
    results.write_text("".join(lines) + lines[1].replace("1,", "2,", 1))  # epoch 2's row, written before the kill
    weights = run_dir / "weights"
    dead = [written_by(weights / "last.pt", dead_pid()), weights / ".last.pt.29ff1b317f43af2b.tmp",
            written_by(weights / "best.pt", dead_pid())]
    for p in dead:
        p.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(dead[1], (old, old))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        alive = written_by(weights / "last.pt", sleeper.pid)  # a writer still at work
        alive.write_bytes(b"being written")
        EMSYOLO(weights / "last.pt").train(resume=True)
        assert alive.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not any(p.exists() for p in dead)
    rows = list(csv.DictReader(results.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_killed_event_conversion_leaves_a_temporary_that_the_rerun_removes(tmp_path):
    out = tmp_path / "big_td.dat"
    stale = [written_by(out, dead_pid()),
             out.with_name(f".{out.name}.c36dfdfeae409dd7.tmp")]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    os.utime(stale[1], (old, old))
    unrelated = out.with_name(".big_td.dat.notes.tmp")
    unrelated.write_text("not a temporary of ours")
    assert cli("events", f"source={EVT3}", f"out={out}") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [unrelated.name, out.name]
    assert len(read_dat(out)) == 219_596


def test_temporaries_of_live_writers_and_other_files_are_kept(tmp_path):
    from ems_yolo.utils.files import remove_stale_temporaries, temporary_sibling

    target = tmp_path / "a.pt"
    mine = temporary_sibling(target)
    mine.write_bytes(b"")
    assert str(os.getpid()) in mine.name
    others = [tmp_path / ".a.pt.zz.tmp", tmp_path / ".a.ptx.0123456789abcdef.tmp",
              tmp_path / ".b.pt.h.1-0123456789abcdef.tmp",  # another file's
              tmp_path / f".a.pt.othermachine.{dead_pid()}-0123456789abcdef.tmp"]  # its pid means nothing here
    for p in others:
        p.write_bytes(b"")
    dead = written_by(target, dead_pid(), ".avi")
    dead.write_bytes(b"")
    assert remove_stale_temporaries(target) == [dead]
    assert mine.exists() and all(p.exists() for p in others)


# D9: a failed or killed command leaves nothing half-written -------------------------------------------------------

def test_energy_that_fails_while_saving_leaves_no_partial_report(tmp_path, tiny, monkeypatch):
    from ems_yolo.energy.report import EnergyReport

    model_yaml, data = tiny

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EnergyReport, "plot_firing_rates", disk_full)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "other").mkdir()
    with pytest.raises(OSError):
        EMSYOLO(model_yaml).energy(data=data, imgsz=64, batch=2, max_batches=1, project=str(tmp_path / "p"), name="en")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["other"]


@pytest.mark.parametrize("into_existing", [False, True])
def test_sigterm_during_event_prediction_leaves_no_partial_video(tmp_path, event_model, into_existing):
    pt, raw = event_model
    run_dir = tmp_path / "runs" / "p03"
    if into_existing:
        run_dir.mkdir(parents=True)
        (run_dir / "keep.txt").write_text("the user's")
    proc = ems_yolo_process("predict", f"model={pt}", f"source={raw}", "stride_ms=1", "imgsz=64",
                            f"project={run_dir.parent}", "name=p03", "exist_ok=True")
    try:
        wait_for(lambda: run_dir.is_dir() and any(p.stat().st_size > 50_000 for p in run_dir.glob(".*.avi")), proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "windows" in out and "stride_ms=1 gives 30,000 windows" in out  # D17's warning came first
    if into_existing:
        assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
    else:
        assert not run_dir.exists()


def test_event_prediction_renames_its_video_when_complete(tmp_path, event_model):
    import cv2

    pt, raw = event_model
    assert cli("predict", f"model={pt}", f"source={raw}", "stride_ms=3000", "imgsz=64", f"project={tmp_path}",
               "name=ok") == 0
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["long.avi", "long_bbox.npy"]
    assert int(cv2.VideoCapture(str(tmp_path / "ok" / "long.avi")).get(cv2.CAP_PROP_FRAME_COUNT)) == 10


# D17: a stride giving a huge number of windows is announced before the work -----------------------------------

def test_many_windows_are_announced_with_count_and_size(event_model, tmp_path, caplog):
    pt, raw = event_model
    stream = EMSYOLO(pt).predict(str(raw), stream=True, stride_ms=2, imgsz=64, project=str(tmp_path), save=False)
    next(iter(stream))
    warning = [r.getMessage() for r in caplog.records if "windows" in r.getMessage()]
    assert len(warning) == 1
    assert "stride_ms=2 gives 15,000 windows" in warning[0] and "stride_ms=3 gives at most 10,000" in warning[0]
    caplog.clear()
    next(iter(EMSYOLO(pt).predict(str(raw), stream=True, stride_ms=50, imgsz=64, project=str(tmp_path),
                                  save=False)))
    assert not [r for r in caplog.records if "windows" in r.getMessage()]


# D16: event conversion runs in bounded memory ----------------------------------------------------------------------

PEAK = """
import re, sys
from pathlib import Path
from ems_yolo.events.formats import convert_events
convert_events(sys.argv[1], sys.argv[2])
print(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1])
"""  # the peak of this process's own memory (getrusage's ru_maxrss would start at the forking test process's)


def _peak_kb(source: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK, str(source), str(out)], env=env, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


def _recording(path: Path, n: int) -> Path:
    rng = np.random.default_rng(n)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.arange(n) // 4
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 304, n), rng.integers(0, 240, n), rng.integers(0, 2, n)
    if path.suffix == ".dat":
        write_dat(path, ev, 304, 240)
        return path
    return write_raw_evt2(path, ev, 304, 240) if path.suffix == ".raw" else np.save(path, ev) or path


@pytest.mark.parametrize("src_suffix,out_suffix", [(".raw", ".dat"), (".npy", ".raw"), (".dat", ".raw")])
def test_event_conversion_peak_memory_does_not_grow_with_the_file(tmp_path, src_suffix, out_suffix):
    n = 2_000_000
    peaks = []
    for k in (1, 4):
        src = _recording(tmp_path / f"rec{k}{src_suffix}", k * n)
        out = tmp_path / f"out{k}{out_suffix}"
        peaks.append(_peak_kb(src, out))
        from ems_yolo.events.formats import open_events

        converted = open_events(out)
        assert converted.count == k * n and (converted.t_first, converted.t_last) == (0, (k * n - 1) // 4)
        src.unlink()
        out.unlink()
    assert peaks[1] < 1.15 * peaks[0], peaks


@pytest.mark.parametrize("times", [[0, 1, 2, 3, 10, 11, 12, 13, 4, 5, 6, 7, 20, 21, 22, 23],
                                   [5, 6, 7, 8, 9, 9, 9, 9, 0, 1, 2, 3, 10, 11, 12, 13]])
def test_chunked_conversion_of_unordered_times_fails_without_output(tmp_path, monkeypatch, capsys, times):
    from ems_yolo.events import formats
    from ems_yolo.events.io import dat_header

    monkeypatch.setattr(formats, "CHUNK_EVENTS", 4)
    src = tmp_path / "unordered.dat"
    records = np.zeros(len(times), [("t", "<u4"), ("w", "<u4")])
    records["t"] = times
    src.write_bytes(dat_header(304, 240) + records.tobytes())
    assert cli("events", f"source={src}", f"out={tmp_path / 'out.raw'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unordered.dat"]


def test_guard_removes_exactly_the_folders_its_command_made(tmp_path):
    import threading

    from ems_yolo.utils.files import claim_run, no_half_written_runs

    project = tmp_path / "p"
    (project / "kept" / "old").mkdir(parents=True)
    other_thread_run = project / "thread"

    def other_command():  # another command in another thread of the same process, which succeeds
        with no_half_written_runs(project):
            claim_run(other_thread_run)
            other_thread_run.mkdir()

    with pytest.raises(Boom), no_half_written_runs(project):
        for run in (project / "a" / "b", project / "kept" / "new", project / "kept" / "old"):
            claim_run(run)
            run.mkdir(parents=True, exist_ok=True)
        worker = threading.Thread(target=other_command)
        worker.start()
        worker.join()
        raise Boom
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == ["kept", "kept/old", "thread"]


def test_sigterm_runs_the_same_clean_up_as_ctrl_c(tmp_path):
    from ems_yolo.utils.files import claim_run, no_half_written_runs

    run_dir = tmp_path / "p" / "run"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), no_half_written_runs(tmp_path / "p"):
        claim_run(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "partial.avi").write_bytes(b"frames without an index")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
    assert not (tmp_path / "p").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command
