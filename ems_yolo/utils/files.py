"""Crash-safe file writing: atomic text files, content-addressed copies, folders built once, and no run folder
left half-written by a command that fails."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


_STARTED = time.time()  # temporaries older than this process, without a living writer, are stale
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"  # pids are per machine


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (a temporary whose writer is gone was left by a kill)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def temporary_sibling(path: str | Path, suffix: str = "") -> Path:
    """A new unique temporary name beside `path`, `.NAME.<host>.<pid>-<hex>.tmp<suffix>` (`suffix` for writers that
    choose the format by it): the writer's machine and pid tell a later run whether its writer is still alive."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}-{secrets.token_hex(8)}.tmp{suffix}")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` left by killed writers: `temporary_sibling` names of this machine whose
    process is gone, and older `.NAME.<hex>.tmp` ones (no pid) written before this process started; those of other
    machines (a shared file system) are left alone. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:([A-Za-z0-9-]+)\.(\d+)-)?[0-9a-f]{{16}}\.tmp(?:\.\w+)?")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*") if path.parent.is_dir() else ():
        m = pattern.fullmatch(tmp.name)
        if not m or not tmp.is_file():
            continue
        try:
            stale = (m[1] == _HOST and not _pid_alive(int(m[2]))) if m[2] else tmp.stat().st_mtime < _STARTED
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another run removed it first
            pass
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a uniquely named temporary sibling (flushed to disk) and `os.replace`, so readers and
    crashes see the old file or the new one, never a partial one; the temporary never outlives the call, and the
    temporaries of `path` that killed writers left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def refuse_overwriting_inputs(out: str | Path, key: str = "out", **inputs: str | Path | None) -> None:
    """Refuse, before anything is written, an output that is one of the command's inputs (the same path once
    resolved, or the same file through a hard or symbolic link); `inputs` map each input's key to its path."""
    target = Path(out).expanduser()
    for name, src in inputs.items():
        if src is None:
            continue
        src = Path(src).expanduser()
        same = target.resolve() == src.resolve()
        if not same and target.exists() and src.exists():
            same = os.path.samefile(target, src)
        if same:
            raise ValueError(f"{key}={out}: is the same file as {name}={src}, expected a different output file "
                             "(the input is never overwritten)")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode())


def content_addressed(folder: str | Path, stem: str, text: str, suffix: str = ".yaml") -> Path:
    """Store `text` once as `<folder>/<stem>-<hash><suffix>` and return its path (same text, same file)."""
    path = Path(folder) / f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:10]}{suffix}"
    return path if path.is_file() else atomic_write_text(path, text)


def build_folder_once(final: Path, is_complete: Callable[[Path], bool], write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling with `write(tmp)` and rename it to `final`, so a half-written folder is never used.

    An existing `final` that is not complete (an interrupted earlier run) is replaced; if another process renames
    its complete copy into place first, that copy is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_yaml_mapping(path: Path, required: tuple[str, ...] = ()) -> dict:
    """Load a YAML file that must be a mapping holding `required` keys; errors name the file and the key."""
    import yaml

    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping with keys {list(required)}, got {type(d).__name__}")
    for key in required:
        if key not in d or d[key] is None:
            raise ValueError(f"{path}: missing required key '{key}'")
    return d


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM (`timeout`, `kill`, a batch scheduler) raises KeyboardInterrupt as Ctrl-C does, so the
    same clean-up runs (temporaries removed, half-written runs removed). Only in the main thread, and only where
    SIGTERM still has its default action."""
    main = threading.current_thread() is threading.main_thread()
    install = main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if install:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Guards(threading.local):
    """Per thread, the active `no_half_written_runs` (innermost last), each as claimed folder -> folders it made."""

    def __init__(self):
        self.stack: list[dict[Path, list[Path]]] = []


_GUARDS = _Guards()


def claim_run(folder: str | Path) -> None:
    """Tell the innermost active `no_half_written_runs` that this command writes its run into `folder` (claim it
    before creating it); if the command fails, the folder is removed when the command created it. Claiming again
    keeps the first claim."""
    if _GUARDS.stack and (folder := Path(folder).absolute()) not in _GUARDS.stack[-1]:
        _GUARDS.stack[-1][folder] = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first


@contextmanager
def no_half_written_runs(project: str | Path) -> Iterator[None]:
    """A command that fails (or is interrupted: Ctrl-C, SIGTERM) removes the run folders it claimed (`claim_run`)
    and created, and the empty parents it created, unless a folder holds a checkpoint (an interrupted training run
    stays resumable). Nothing else is touched: other commands may write runs into the same `project` meanwhile. A
    folder claimed after it was made counts as created when its entry in `project` was not there at the start."""
    project = Path(project).absolute()
    missing = [p for p in (project, *project.parents) if not p.exists()]  # folders the command may create
    before = set(project.iterdir()) if project.is_dir() else set()
    claims: dict[Path, list[Path]] = {}
    _GUARDS.stack.append(claims)
    try:
        with sigterm_as_interrupt():
            yield
    except BaseException:
        for run, made in claims.items():
            if not made and run.is_relative_to(project) and run != project:
                made = [run] if project / run.relative_to(project).parts[0] not in before else []
            if made and run.is_dir() and not any(run.rglob("*.pt")):
                shutil.rmtree(run, ignore_errors=True)
                for folder in made[1:]:  # innermost first
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
        for folder in missing:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        _GUARDS.stack.remove(claims)
