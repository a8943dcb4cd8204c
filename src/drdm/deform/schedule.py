"""Step schedules of the DRDM forward process: how many compositions a step ``t`` gets.

``k_diff(t) = clamp(floor(factor * t**exponent), min_steps, max_steps)`` composes the perturbed
velocity into the field that deforms the image at step ``t``; ``k_rec(t) = floor(factor *
t**exponent)`` composes the clean velocity into the recovery target. The reference values are
``k_diff = clamp(floor(2 t^1.3 / 3), 1, 200)`` and ``k_rec = floor(t^0.6)``.

Both are evaluated in float32 on ``t``'s device, as the reference does, so that the integer
step counts agree with it exactly (e.g. ``floor(32**0.6)`` is 7 in float32, not 8).
"""

from __future__ import annotations

import math

import torch


def _check_t(t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point() or t.is_complex():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, torch.Tensor) else None
        raise ValueError(f"t must be an integer tensor of shape [B], got {shape} ({dtype})")


def power_steps(
    t: torch.Tensor,
    factor: float,
    exponent: float,
    min_steps: int = 0,
    max_steps: int | None = None,
) -> torch.Tensor:
    """``clamp(floor(factor * t**exponent), min_steps, max_steps)``, int64 ``[B]`` on t's device."""
    _check_t(t)
    steps = torch.floor(t.float().pow(exponent) * factor).long()
    return steps.clamp(min=min_steps, max=max_steps)


def power_steps_bound(
    timesteps: int,
    factor: float,
    exponent: float,
    min_steps: int = 0,
    max_steps: int | None = None,
) -> int:
    """Largest value :func:`power_steps` takes for ``t`` in ``0 .. timesteps - 1`` (host int).

    Used to size the binary-power integration without reading ``t`` back from the device.
    """
    largest = math.floor(factor * max(timesteps - 1, 0) ** exponent) + 1  # +1: float32 slack
    largest = max(largest, min_steps)
    return largest if max_steps is None else min(largest, max_steps)
