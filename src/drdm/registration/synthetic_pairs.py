"""Synthetic registration pairs with a known field: ``fixed = warp(moving, field)``.

Because ``warp`` is a pull-back (``out(x) = image(x + u(x))``), a network whose prediction ``p``
satisfies ``warp(moving, p) == fixed`` has recovered exactly ``p == field``. So the supervised
target of a synthetic pair is the very field used to make it.

The fields come from the field sources of :mod:`drdm.field_sources.bank` (B-splines, a trained
DRDM, ...).

Pure torch: no Lightning or Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drdm.deform import warp


@dataclass
class SyntheticPair:
    """A synthetic pair: ``fixed == warp(moving, displacement)``.

    Attributes:
        moving: ``[B, 1, *S]`` float image.
        fixed: ``[B, 1, *S]`` float image.
        displacement: ``[B, ndims, *S]`` voxels, the ground-truth registration field.
        moving_label, fixed_label: ``[B, 1, *S]`` int64 or None.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    displacement: torch.Tensor
    moving_label: torch.Tensor | None = None
    fixed_label: torch.Tensor | None = None


def make_pair(
    image: torch.Tensor,
    displacement: torch.Tensor,
    label: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> SyntheticPair:
    """Build a :class:`SyntheticPair` from an image and a field (voxels, same spatial shape)."""
    fixed = warp(image, displacement, mode=mode, padding="zeros")
    fixed_label = None
    if label is not None:
        fixed_label = warp(label, displacement, mode="nearest", padding="zeros")
    return SyntheticPair(image, fixed, displacement, label, fixed_label)
