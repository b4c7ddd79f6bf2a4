"""Test helpers shared by the readers of other projects' checkpoints (the original EMS-YOLO code, SpikeYOLO's)."""

from collections.abc import Callable

import torch


def tensor_edits(missing: str, extra: str, reshaped: tuple[str, tuple[int, ...]],
                 messages: tuple[str, str, str]) -> list[tuple[Callable, str]]:
    """(edit, expected error) for the three tensor faults every strict mapping must name: tensor `missing`
    dropped, tensor `extra` added, tensor `reshaped[0]` of shape `reshaped[1]`."""
    key, shape = reshaped
    return [
        (lambda c: c.tensors.pop(missing), messages[0]),
        (lambda c: c.tensors.__setitem__(extra, torch.zeros(1)), messages[1]),
        (lambda c: c.tensors.__setitem__(key, torch.zeros(*shape)), messages[2]),
    ]


def damaged(read: Callable, path, edit: Callable):
    """The checkpoint at `path` as `read` returns it, changed in memory by `edit`."""
    checkpoint = read(path)
    edit(checkpoint)
    return checkpoint


def assert_one_line(error: BaseException, path) -> None:
    """A reader's error: one line that starts with the file."""
    assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
