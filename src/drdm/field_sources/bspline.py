"""Multi-resolution random B-spline fields (MRBS): the classical synthetic-deformation baseline.

A field is the sum of several levels. Each level draws ``N(0, amplitude^2)`` control-point
displacements (voxels) on a grid with ``cells`` B-spline cells per axis, and evaluates the cubic
B-spline tensor product at every voxel (a free-form deformation). Coarse grids give large smooth
motion, fine grids local detail. Optionally the sum is treated as a stationary velocity and
integrated (scaling and squaring) so that the result is diffeomorphic.

Pure torch: no Lightning or Hydra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from drdm.deform import exponentiate


def cubic_bspline(x: torch.Tensor) -> torch.Tensor:
    """Centred cubic B-spline basis ``B3(x)`` (support ``|x| < 2``, partition of unity)."""
    ax = x.abs()
    inner = 2.0 / 3.0 - ax**2 + 0.5 * ax**3
    outer = (2.0 - ax) ** 3 / 6.0
    return torch.where(ax < 1.0, inner, torch.where(ax < 2.0, outer, torch.zeros_like(ax)))


def bspline_weights(size: int, cells: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Weights ``[size, cells + 3]`` mapping control points to voxels along one axis.

    The ``cells + 1`` knots span voxel centres ``0 .. size-1`` evenly; one extra control point
    on each side lets the spline be non-zero up to the border.
    """
    if size < 2 or cells < 1:
        raise ValueError(f"bspline_weights needs size >= 2 and cells >= 1, got {size}, {cells}")
    spacing = (size - 1) / cells
    position = torch.arange(size, device=device, dtype=dtype) / spacing  # in control units
    knots = torch.arange(-1, cells + 2, device=device, dtype=dtype)
    return cubic_bspline(position[:, None] - knots[None, :])


def evaluate_bspline(control: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense field from control points.

    Args:
        control: ``[B, C, *(cells_i + 3)]`` control-point values.
        shape: output spatial shape (same number of axes).

    Returns:
        ``[B, C, *shape]`` cubic B-spline tensor-product evaluation, dtype of ``control``.
    """
    ndims = control.ndim - 2
    if len(shape) != ndims:
        raise ValueError(f"control {tuple(control.shape)} has {ndims} axes, shape is {shape}")
    field = control
    for axis, size in enumerate(shape):
        cells = control.shape[2 + axis] - 3
        weights = bspline_weights(size, cells, device=control.device, dtype=control.dtype)
        # contract tensor axis (2 + axis) with the weight matrix, keep the axis in place
        field = torch.movedim(torch.movedim(field, 2 + axis, -1) @ weights.T, -1, 2 + axis)
    return field


class MultiResolutionBSpline(nn.Module):
    """Random multi-resolution B-spline displacement generator (parameter-free).

    Args:
        ndims: 2 or 3.
        cells: B-spline cells per axis at each level, e.g. ``[2, 4, 8]`` (coarse to fine).
        amplitudes: standard deviation of control-point displacements per level, in **voxels**
            (one per entry of ``cells``), or in fractions of the image size per axis when
            ``relative=True``.
        relative: interpret ``amplitudes`` as fractions of each axis' size.
        integration_steps: 0 for a plain sum; ``k > 0`` integrates the sum as a stationary
            velocity with ``2^k`` scaling-and-squaring steps (diffeomorphic for moderate sizes).
    """

    def __init__(
        self,
        ndims: int = 2,
        cells: Sequence[int] = (2, 4, 8),
        amplitudes: Sequence[float] = (3.0, 1.5, 0.75),
        relative: bool = False,
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if len(cells) == 0 or len(cells) != len(amplitudes):
            raise ValueError(
                f"cells {list(cells)} and amplitudes {list(amplitudes)} must be non-empty and "
                "of equal length (one amplitude per level)"
            )
        if any(c < 1 for c in cells) or any(a < 0 for a in amplitudes):
            raise ValueError(f"cells must be >= 1 and amplitudes >= 0, got {cells}, {amplitudes}")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.ndims = ndims
        self.cells = [int(c) for c in cells]
        self.amplitudes = [float(a) for a in amplitudes]
        self.relative = relative
        self.integration_steps = integration_steps

    def forward(
        self,
        shape: Sequence[int],
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        device=None,
    ) -> torch.Tensor:
        """Draw ``batch_size`` fields: ``[B, ndims, *shape]`` float32 displacement in voxels."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndims:
            raise ValueError(f"shape {shape} does not have ndims={self.ndims} axes")
        if generator is not None:
            device = generator.device
        field = torch.zeros(batch_size, self.ndims, *shape, device=device)
        for cells, amplitude in zip(self.cells, self.amplitudes, strict=True):
            control_shape = (batch_size, self.ndims, *[cells + 3] * self.ndims)
            control = torch.randn(control_shape, generator=generator, device=device)
            if self.relative:
                scale = torch.tensor([amplitude * s for s in shape], device=device)
                control = control * scale.view(1, self.ndims, *[1] * self.ndims)
            else:
                control = control * amplitude
            field = field + evaluate_bspline(control, shape)
        if self.integration_steps:
            field = exponentiate(field, self.integration_steps)
        return field
