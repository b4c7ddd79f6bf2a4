"""Every code block of README.md runs (issue 22 item 2): a README line cannot drift from the code.

The README is walked top to bottom in one empty working folder, as a new user would: every ```bash line (`\\`
continues a line), every `$ ` line of a ```console block and every ```python block runs, in order, so later
commands use what earlier ones wrote (runs/detect/train/weights/best.pt, ...). A command fails the test when it
fails. The console lines shown after a `$` command are checked loosely: the first word of each that starts with a
letter appears in the command's output.

Not run: a command whose trailing comment starts with `needs` (`# needs COCO`): it needs data, hardware or time
this test does not have, and says which. A ```console block without a `$` line, or a block of another language
that looks like code, fails the test (mark it, or name its command).

Scaled, so that the walk takes minutes (environment variables, defaults in brackets): every `epochs=`/`--epochs`
and `imgsz=`/`--imgsz` value becomes README_EPOCHS (1) and README_IMGSZ (64); every train command (CLI and Python)
also gets them and fraction=README_FRACTION (0.1) when it lacks them; `make demo` runs with
DEMO_ARGS="--epochs README_EPOCHS --imgsz README_IMGSZ". `ems-yolo` lines run in this process through the CLI's
`run` (`ems_yolo.cli`), Python blocks in this process, `python`, `make` and `torchrun` lines as processes of this
interpreter.

Stand-ins for the user's own files, written into the working folder first: video.mp4 (8 held-out built-in shapes
images, `write_held_out_video`), images/ (3 of them), best.pt (the original-format Gen1 checkpoint of
../shared/data/checkpoints, the "Weights of the original EMS-YOLO code" section's file), recording_td.dat and
recording.raw (a generated Gen1-shaped recording) and my-data.yaml (the built-in dataset's YAML).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pytest

from shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
EPOCHS = int(os.environ.get("README_EPOCHS", "1"))
IMGSZ = int(os.environ.get("README_IMGSZ", "64"))
FRACTION = float(os.environ.get("README_FRACTION", "0.1"))
ORIGINAL = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
CODE = ("bash", "console", "python")
MARKER = re.compile(r"^needs\b")


@dataclass
class Step:
    """One thing to run: a shell command line or a Python snippet, with the README line it starts on."""

    line: int
    kind: str  # "shell" or "python"
    text: str
    skip: str = ""  # the marker's reason: not run
    shown: list[str] = field(default_factory=list)  # console output lines shown after a `$` command


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's command and its trailing comment (after ' #')."""
    m = re.search(r"(^|\s)#\s?(.*)$", line)
    return (line[: m.start()].rstrip(), m.group(2).strip()) if m else (line.rstrip(), "")


def blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """The fenced blocks of a Markdown text: (language, line number of the first content line, lines)."""
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), i + 1, []
        elif line.startswith("```") and lang is not None:
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def steps(text: str) -> list[Step]:
    """Every runnable step of the README, in order; raises on a block that is neither runnable nor marked."""
    out: list[Step] = []
    for lang, start, body in blocks(text):
        if lang == "python":
            marks = [c for c in (split_comment(x)[1] for x in body) if MARKER.match(c)]
            if marks and len(marks) != len([x for x in body if x.strip()]):
                raise AssertionError(f"README.md:{start}: a python block with 'needs' on some lines only: mark "
                                     "every line or split the block")
            out.append(Step(start, "python", "\n".join(body), "; ".join(marks)))
        elif lang == "bash":
            joined, number = "", start
            for i, line in enumerate(body):
                joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
                if line.endswith("\\"):
                    continue
                command, comment = split_comment(joined)
                if command:
                    out.append(Step(number, "shell", command, comment if MARKER.match(comment) else ""))
                joined, number = "", start + i + 1
        elif lang == "console":
            if not any(x.startswith("$ ") for x in body):
                raise AssertionError(f"README.md:{start}: a console block without a '$ ' command line (name the "
                                     "command that prints it, marked '# needs ...' if it cannot run here)")
            for i, line in enumerate(body):
                if line.startswith("$ "):
                    command, comment = split_comment(line[2:])
                    out.append(Step(start + i, "shell", command, comment if MARKER.match(comment) else ""))
                elif out:
                    out[-1].shown.append(line)
        elif lang and lang not in ("text",):
            raise AssertionError(f"README.md:{start}: a ```{lang} block: use bash, console or python (run by this "
                                 "test), or text / no language for layout")
    return out


def scale_shell(command: str) -> str:
    """A shell command at the test's scale: epochs, image size (and training fraction) replaced or added."""
    command = re.sub(r"\bepochs=\S+", f"epochs={EPOCHS}", command)
    command = re.sub(r"\bimgsz=\S+", f"imgsz={IMGSZ}", command)
    command = re.sub(r"--epochs \S+", f"--epochs {EPOCHS}", command)
    command = re.sub(r"--imgsz \S+", f"--imgsz {IMGSZ}", command)
    words = command.split()
    if "train" in words[:6] and "resume=True" not in words and words[0] in ("ems-yolo", "torchrun"):
        for key, value in (("epochs", EPOCHS), ("imgsz", IMGSZ), ("fraction", FRACTION)):
            if f"{key}=" not in command:
                command += f" {key}={value}"
    return command


def scale_python(code: str) -> str:
    """A Python snippet at the test's scale: epochs= and imgsz= replaced, every .train( call gets the missing ones
    and fraction=."""
    code = re.sub(r"\bepochs=\d+", f"epochs={EPOCHS}", code)
    code = re.sub(r"\bimgsz=\d+", f"imgsz={IMGSZ}", code)
    extra = "".join(f"{k}={v}, " for k, v in (("epochs", EPOCHS), ("imgsz", IMGSZ), ("fraction", FRACTION))
                    if f"{k}=" not in code)
    return code.replace(".train(", f".train({extra}")


def stand_ins(folder: Path) -> None:
    """The user's own files that README commands name, as stand-ins (see the module docstring)."""
    from ems_yolo.data.datasets import make_synthetic_data  # noqa: F401  (the Gen1-shaped data, generated once)
    from ems_yolo.data.shapes import held_out_image, make_shapes_dataset, write_held_out_video
    from ems_yolo.events.formats import convert_events
    from ems_yolo.events.synthetic import make_synthetic_gen1

    write_held_out_video(folder / "video.mp4", frames=8)
    (folder / "images").mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / "images" / f"{i}.png"), held_out_image(100 + i)[0])
    shutil.copy(make_shapes_dataset(), folder / "my-data.yaml")
    shutil.copy(ORIGINAL, folder / "best.pt")
    recording = sorted((make_synthetic_gen1() / "test").glob("*_td.dat"))[0]
    shutil.copy(recording, folder / "recording_td.dat")
    convert_events(folder / "recording_td.dat", folder / "recording.raw")


def shell(step: Step, folder: Path) -> tuple[int, str]:
    """Run one shell step in `folder`: its exit code and output."""
    command = scale_shell(step.text)
    words = shlex.split(command)
    if words[0] == "ems-yolo":
        return in_process(words[1:])
    # a user's shell: none of the variables this process set on its way (Ultralytics', torch's)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "EMS_YOLO_HOME", "TMPDIR") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    if words[0] == "python":
        argv = [sys.executable, *(str(REPO / w) if w.startswith("tools/") else w for w in words[1:])]
    elif words[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "make":
        argv = ["make", "-s", "-C", str(REPO), "-o", "install", *words[1:], f"PY={sys.executable}",
                f"DEMO_ARGS=--epochs {EPOCHS} --imgsz {IMGSZ} --project {folder / 'runs' / 'demo'}"]
    else:
        raise AssertionError(f"README.md:{step.line}: '{words[0]}' is not a command this test knows how to run")
    r = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def in_process(argv: list[str]) -> tuple[int, str]:
    """`ems-yolo <argv>` through the CLI's `run` in this process: exit code and what it logged and printed."""
    from ems_yolo.cli import run

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(argv)
    finally:
        logger.removeHandler(handler)
    return code, "\n".join(r.getMessage() for r in records) + out.getvalue() + err.getvalue()


def test_every_block_is_run_or_marked():
    """The README holds runnable blocks, and every marker names what the command needs."""
    readme = steps(README.read_text())
    assert len(readme) > 30
    assert all(len(s.skip) > len("needs ") for s in readme if s.skip)
    fake = "```console\nsome output\n```\n"
    with pytest.raises(AssertionError, match="without a '\\$ ' command"):
        steps(fake)
    assert scale_shell("ems-yolo train data=x epochs=50") == f"ems-yolo train data=x epochs={EPOCHS} imgsz={IMGSZ} " \
                                                             f"fraction={FRACTION}"


@pytest.mark.slow
@pytest.mark.skipif(not ORIGINAL.is_file(), reason="../shared/data/checkpoints not available")
def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_ins(tmp_path)
    done: dict[str, str] = {}
    ran = skipped = 0
    for step in steps(README.read_text()):
        if step.skip:
            skipped += 1
            continue
        where = f"README.md:{step.line}: {step.text.splitlines()[0]}"
        if step.kind == "python":
            exec(compile(scale_python(step.text), where, "exec"), {"__name__": "__readme__"})  # noqa: S102
            ran += 1
            continue
        if step.text not in done:  # a command shown twice (run, then its output) runs once
            code, output = shell(step, tmp_path)
            errors = "\n".join(x for x in output.splitlines() if "error:" in x)  # also those of other processes
            assert code == 0, f"{where} -> exit {code}\n{errors}\n{output[-3000:]}"
            done[step.text] = output
            ran += 1
        for line in step.shown:
            word = next((w for w in line.split() if w[:1].isalpha()), None)
            assert word is None or word in done[step.text], f"{where}: '{word}' (shown: {line!r}) not in the output"
    assert ran > 25 and skipped > 0
