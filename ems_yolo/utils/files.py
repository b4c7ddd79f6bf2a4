"""Crash-safe file writing: atomic text files, content-addressed copies, folders built once, and no run folder
left half-written by a command that fails."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a uniquely named temporary sibling (flushed to disk) and `os.replace`, so readers and
    crashes see the old file or the new one, never a partial one; the temporary never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


@contextmanager
def no_half_written_runs(project: str | Path) -> Iterator[None]:
    """A command that fails removes the run folder it created under `project` (and the empty parents it created),
    unless that folder holds a checkpoint (an interrupted training run stays resumable)."""
    project = Path(project).absolute()
    missing = [p for p in (project, *project.parents) if not p.exists()]  # folders the command may create
    before = set(project.iterdir()) if project.is_dir() else set()
    try:
        yield
    except BaseException:
        for run in set(project.iterdir()) - before if project.is_dir() else ():
            if run.is_dir() and not any(run.rglob("*.pt")):
                shutil.rmtree(run, ignore_errors=True)
        for folder in missing:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
