"""Smoothing of displacement fields: a Gaussian blur, and a local one that removes folding.

:func:`repair_folding` is the few-step sampler's border fix (``experiments/benchmarks/
results/generation.md``): without a margin around the network's input, a recovered field folds in
a band along the image border, where the network's convolutions see their own zero padding.
Smoothing the field only where it folds, until it no longer does, costs a few blurs of one field;
the margin that also prevents it costs every network call ``(1 + 2 margin / size)^ndims`` times
the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drdm.deform.metrics import jacobian_determinant
from drdm.deform.spatial import check_displacement


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (``sigma`` voxels, border replicate) of ``[B, C, *S]``."""
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndims = field.ndim - 2
    channels = field.shape[1]
    conv = F.conv2d if ndims == 2 else F.conv3d
    for axis in range(ndims):
        shape = [1] * ndims
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *[1] * ndims)
        padding = [0, 0] * ndims
        padding[2 * (ndims - 1 - axis)] = padding[2 * (ndims - 1 - axis) + 1] = radius
        field = conv(F.pad(field, padding, mode="replicate"), weight, groups=channels)
    return field


def check_repair_options(sigma: float, dilation: int, max_iterations: int) -> None:
    """Raise a clear ``ValueError`` for bad :func:`repair_folding` settings."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
        raise ValueError(f"fold repair sigma must be a number of voxels > 0, got {sigma!r}")
    for name, value in (("dilation", dilation), ("max_iterations", max_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fold repair {name} must be an int >= 0, got {value!r}")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a ``[B, 1, *S]`` float 0/1 mask by ``radius`` voxels (a cube), one axis at a time
    (separable: ``2 r + 1`` comparisons per axis instead of ``(2 r + 1)^ndims``)."""
    ndims = mask.ndim - 2
    pool = F.max_pool2d if ndims == 2 else F.max_pool3d
    for axis in range(ndims):
        kernel = [1] * ndims
        kernel[axis] = 2 * radius + 1
        padding = [0] * ndims
        padding[axis] = radius
        mask = pool(mask, kernel, 1, padding)
    return mask


@torch.no_grad()
def repair_folding(
    displacement: torch.Tensor,
    sigma: float = 4.0,
    dilation: int = 4,
    max_iterations: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove folding by smoothing a field only where it folds, ``[B, ndims, *S]`` voxels.

    Each iteration finds the voxels with ``det J <= 0``, grows them by ``dilation`` voxels (a
    fold's neighbours carry the gradient that makes it) and replaces the field there by its
    Gaussian blur (``sigma`` voxels); elsewhere the field is untouched. It stops for a sample
    once nothing folds, or after ``max_iterations``: a field that still folds then is returned
    as far as it got (``folding_ratio`` of the result tells). Fields that do not fold come back
    bit for bit.

    Returns:
        ``(repaired [B, ndims, *S], changed [B])``: the field, and the fraction of each sample's
        voxels the repair changed.
    """
    check_displacement(displacement)
    check_repair_options(sigma, dilation, max_iterations)
    repaired = displacement.clone()
    changed = torch.zeros(
        displacement.shape[:1] + displacement.shape[2:],
        dtype=torch.bool,
        device=displacement.device,
    )
    todo = torch.arange(displacement.shape[0], device=displacement.device)
    for _ in range(max_iterations):
        field = repaired[todo]
        folded = jacobian_determinant(field) <= 0
        folds = folded.flatten(1).any(1)
        if not bool(folds.any()):
            break
        todo, field, folded = todo[folds], field[folds], folded[folds]
        region = dilate(folded[:, None].to(field.dtype), dilation) > 0
        repaired[todo] = torch.where(region, gaussian_smooth(field, sigma), field)
        changed[todo] |= region[:, 0]
    return repaired, changed.flatten(1).to(displacement.dtype).mean(1)
