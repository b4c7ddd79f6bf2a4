"""2x2 / stride-2 max-pool in plain torch, keeping a 2-bit argmax per output: the definition its kernels must equal.

The argmax k in 0..3 names the window position (k // 2, k % 2); ties go to the first maximum in row-major order, as
`max_pool2d` sends them. Odd sizes are floored (the last row/column is dropped, its gradient zero).
"""

import torch


def _views(x: torch.Tensor) -> list[torch.Tensor]:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return [x[..., i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)]


def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over each 2x2 window, uint8 argmax in 0..3) of `[N, C, H, W]`, in x's memory format."""
    views = _views(x)
    out = views[0].clone(memory_format=torch.preserve_format)
    arg = torch.zeros_like(out, dtype=torch.uint8)
    for k, v in enumerate(views[1:], 1):
        greater = v > out
        out = torch.where(greater, v, out)
        arg.masked_fill_(greater, k)
    return out, arg


def input_like(arg: torch.Tensor, height: int, width: int, dtype: torch.dtype, zero: bool) -> torch.Tensor:
    """A `[N, C, height, width]` tensor in arg's memory format (the input's), zero-filled if asked."""
    fmt = torch.channels_last if arg.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((*arg.shape[:2], height, width), dtype=dtype, device=arg.device, memory_format=fmt)
    return out.zero_() if zero else out


def backward(grad: torch.Tensor, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """dL/dx (`[N, C, height, width]`, the input's layout) from dL/dout: each output's gradient goes to its
    argmax position."""
    grad_x = input_like(arg, height, width, grad.dtype, True)
    for k, view in enumerate(_views(grad_x)):
        view.copy_(torch.where(arg == k, grad, 0))
    return grad_x
