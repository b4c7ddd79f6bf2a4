"""Surrogate gradients for the Heaviside spike function.

The forward pass of every surrogate is the same strict step `x > 0` (x = u - V_th); only the backward pass differs.
They are used only while training: the inference path of the neuron is a plain comparison, so traced and
exported graphs contain no Python autograd function.
"""

from __future__ import annotations

import math

import torch


class _Surrogate(torch.autograd.Function):
    """Heaviside forward, `derivative(x, alpha)` backward. Subclasses supply `derivative`."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x > 0).to(x.dtype)

    @classmethod
    def backward(cls, ctx, grad: torch.Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * cls.derivative(x, ctx.alpha), None


class Rectangle(_Surrogate):
    """STBP rectangular window: gradient 1/alpha where |x| < alpha/2 (alpha=1 gives 1 for 0 < u < 1 at V_th=0.5)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        return (x.abs() < alpha / 2).to(x.dtype) / alpha


class Sigmoid(_Surrogate):
    """Derivative of sigmoid(alpha * x), SpikingJelly's default shape (alpha ~ 4)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1 - s)


class ATan(_Surrogate):
    """Derivative of atan(pi/2 * alpha * x) / pi + 1/2 (alpha ~ 2)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


SURROGATES: dict[str, type[_Surrogate]] = {"rectangle": Rectangle, "sigmoid": Sigmoid, "atan": ATan}
DEFAULT_ALPHA: dict[str, float] = {"rectangle": 1.0, "sigmoid": 4.0, "atan": 2.0}


def get_surrogate(name: str) -> type[_Surrogate]:
    """Return the surrogate class registered under `name` (case-insensitive)."""
    try:
        return SURROGATES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown surrogate '{name}', expected one of {sorted(SURROGATES)}") from None
