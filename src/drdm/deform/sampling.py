"""Random control-grid velocities and their resampling onto the image grid.

The control grid has ``control_size`` points per axis and spans ``crop_factor`` times the image's
field of view (reference: 64 points over twice the image). Control points are cell centres
(``align_corners=False`` geometry): control point ``c`` sits at coordinate
``(c + 0.5) * F / C - 0.5`` of an ``F = crop_factor * S`` voxel grid whose central ``S`` voxels
are the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multiscale_noise(
    batch: int,
    ndims: int,
    control_size: int,
    levels: int,
    scale: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum of ``levels`` Gaussian fields at sizes ``C, C/2, C/4, ...``, upsampled to ``C``.

    Level ``s`` draws ``N(0, 1)`` of shape ``[batch, ndims, s, ..., s]``, scaled by
    ``scale * C / s``
    (coarse levels proportionally larger), and is upsampled linearly (``align_corners=False``) to
    ``C`` points per axis. Levels are drawn finest first, from ``generator`` (on the generator's
    device, in float32, then moved to ``device`` and ``dtype``), so a seed fixes the field on
    every device and in every dtype.

    Returns:
        ``[batch, ndims, C, ..., C]`` in units of ``scale`` (the caller's units).
    """
    if levels < 1 or control_size % (2 ** (levels - 1)) != 0:
        raise ValueError(
            f"control_size {control_size} must be divisible by 2**(levels-1) with levels >= 1, "
            f"got levels={levels}"
        )
    draw_device = generator.device if generator is not None else device
    mode = "bilinear" if ndims == 2 else "trilinear"
    total = None
    for level in range(levels):
        size = control_size // 2**level
        # drawn in float32 whatever the output dtype, so a seed gives the same field in any dtype
        sample = torch.randn(
            batch, ndims, *[size] * ndims, generator=generator, device=draw_device
        ).to(device=device, dtype=dtype)
        sample = sample * (scale * control_size / size)
        if size != control_size:
            sample = F.interpolate(sample, size=[control_size] * ndims, mode=mode)
        total = sample if total is None else total + sample
    return total


def _crop_interpolation_matrix(
    control_size: int, size: int, crop_factor: float
) -> tuple[torch.Tensor, int]:
    """Linear weights ``[size, n]`` from control points ``first .. first+n-1`` to kept voxels.

    Matches ``F.interpolate(..., size=round(crop_factor * size), align_corners=False)`` followed by
    the centre crop, but only for the kept voxels and only over the control points they touch.
    """
    full = round(crop_factor * size)
    offset = (full - size) // 2
    position = (torch.arange(size, dtype=torch.float64) + offset + 0.5) * (
        control_size / full
    ) - 0.5
    position = position.clamp(min=0.0)  # interpolate clamps negative source indices to 0
    lower = position.floor().long().clamp(max=control_size - 1)
    upper = (lower + 1).clamp(max=control_size - 1)
    weight_upper = position - lower
    first, last = int(lower.min()), int(upper.max())
    weights = torch.zeros(size, last - first + 1, dtype=torch.float64)
    rows = torch.arange(size)
    weights[rows, lower - first] += 1.0 - weight_upper
    weights[rows, upper - first] += weight_upper
    return weights, first


def kept_support(
    control_field_shape: tuple[int, ...], shape: tuple[int, ...], crop_factor: float = 2.0
) -> tuple[list[torch.Tensor], tuple[tuple[int, int], ...]]:
    """Interpolation weights and the box of control points that the kept ``shape`` voxels read.

    Returns ``(weights, region)``: per axis a float64 ``[S_i, n_i]`` weight matrix and the
    ``(first, n_i)`` control points it reads; :func:`resample_box` applies them.
    """
    weights, region = [], []
    for control_size, size in zip(control_field_shape, shape):
        matrix, first = _crop_interpolation_matrix(control_size, size, crop_factor)
        weights.append(matrix)
        region.append((first, matrix.shape[1]))
    return weights, tuple(region)


def resample_box(box: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Apply the per-axis weights of :func:`kept_support` to a ``[B, ndims, *n]`` box."""
    field = box
    for axis, matrix in enumerate(weights):
        matrix = matrix.to(device=field.device, dtype=field.dtype)
        field = torch.movedim(torch.movedim(field, 2 + axis, -1) @ matrix.T, -1, 2 + axis)
    return field


def upsample_crop(
    control_field: torch.Tensor, shape: tuple[int, ...], crop_factor: float = 2.0
) -> torch.Tensor:
    """Resample a control-grid field onto the central ``shape`` region of its field of view.

    Args:
        control_field: ``[B, ndims, C, ..., C]`` (values are not rescaled here).
        shape: image shape ``S``, one int per spatial axis.
        crop_factor: the control grid spans ``crop_factor * S`` voxels per axis.

    Returns:
        ``[B, ndims, *shape]``: equal (to float rounding) to linear ``F.interpolate`` of the field
        to ``crop_factor * S`` voxels followed by a centre crop, computed separably for the kept
        voxels only (in 3D with ``crop_factor=2`` that skips 7/8 of the output).
    """
    ndims = control_field.ndim - 2
    if ndims != len(shape):
        raise ValueError(f"cannot resample control field {tuple(control_field.shape)} to {shape}")
    weights, region = kept_support(tuple(control_field.shape[2:]), tuple(shape), crop_factor)
    box = control_field[(..., *[slice(first, first + n) for first, n in region])]
    return resample_box(box, weights)
