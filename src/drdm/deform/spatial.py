"""Spatial transforms on dense displacement fields: warp and compose.

Conventions used everywhere in drdm:

* A displacement field ``u`` has shape ``[B, ndims, *spatial]`` and is in **voxels**. Channel ``i``
  is the displacement along spatial axis ``i`` of the tensor (tensor axis order, not grid_sample's
  reversed x-y-z order).
* Warping is a pull-back: ``warp(image, u)(x) = image(x + u(x))``.
* ``compose(first, second)`` is the displacement of *applying ``first`` then ``second``*::

      warp(warp(image, first), second) == warp(image, compose(first, second))
      compose(first, second)(x) = second(x) + first(x + second(x))

  This is the composition the DRDM method writes as ``u <- p + u o (id + p)``
  (``compose(u, p)``) and the self-composition ``u_{j+1} = v + u_j o (id + v)``.

Positions are voxel centres, index ``0 .. n-1`` along each axis (``align_corners=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("zeros", "border", "reflection")


def check_displacement(displacement: torch.Tensor, name: str = "displacement") -> int:
    """Validate a ``[B, ndims, *spatial]`` float field with ndims in {2, 3}; return ndims."""
    if not isinstance(displacement, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(displacement).__name__}")
    if not displacement.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {displacement.dtype} "
            f"with shape {tuple(displacement.shape)}"
        )
    if displacement.ndim not in (4, 5):
        raise ValueError(
            f"{name} must have shape [B, ndims, *spatial] with 2 or 3 spatial dims, "
            f"got shape {tuple(displacement.shape)}"
        )
    ndims = displacement.ndim - 2
    if displacement.shape[1] != ndims:
        raise ValueError(
            f"{name} with {ndims} spatial dims must have {ndims} channels, "
            f"got shape {tuple(displacement.shape)}"
        )
    return ndims


def _check_same_field_shape(first: torch.Tensor, second: torch.Tensor) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"displacement shapes differ: first {tuple(first.shape)} "
            f"vs second {tuple(second.shape)}"
        )


def identity_grid(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every position, ``[ndims, *shape]`` (channel i = index along axis i)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _sampling_grid(
    displacement: torch.Tensor,
    source_shape: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """grid_sample grid ``[B, *spatial, ndims]`` (x-y-z order, normalised) for ``id + u``.

    ``u`` lives on the box of a ``source_shape`` grid that starts at voxel ``offset`` (default:
    the whole grid): position ``x`` of the box is voxel ``offset + x`` of the source.
    """
    spatial = displacement.shape[2:]
    ndims = len(spatial)
    source_shape = tuple(spatial) if source_shape is None else tuple(source_shape)
    offset = (0,) * ndims if offset is None else tuple(offset)
    needs_grad = torch.is_grad_enabled() and displacement.requires_grad
    grid = None if needs_grad else displacement.new_empty(displacement.shape[0], *spatial, ndims)
    columns = []
    for axis, n in enumerate(spatial):
        # identity in normalised units (-1 .. 1 over the source), broadcast along this axis
        view = [1] * ndims
        view[axis] = n
        scale = 2.0 / max(source_shape[axis] - 1, 1)
        first = -1.0 + offset[axis] * scale
        last = -1.0 + (offset[axis] + n - 1) * scale
        line = torch.linspace(first, last, n, device=displacement.device, dtype=displacement.dtype)
        if grid is None:
            columns.append(displacement[:, axis] * scale + line.view(*view))
        else:
            # no autograd: write straight into the (reversed) grid column, skipping the stack
            # and flip copies (a sixth of the cost of a 3D composition)
            column = grid[..., ndims - 1 - axis]
            torch.add(line.view(*view), displacement[:, axis], alpha=scale, out=column)
    if grid is not None:
        return grid
    # grid_sample wants (x, y[, z]) = reversed tensor axis order
    return torch.stack(columns[::-1], dim=-1)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "bilinear",
    padding: str = "zeros",
    offset: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Resample ``image`` at ``x + displacement(x)``.

    Args:
        image: ``[B, C, *spatial]``; float, or integer (labels; only with ``mode="nearest"``,
            returned in the same dtype).
        displacement: ``[B, ndims, *spatial]`` in voxels, same batch and spatial shape; with
            ``offset``, ``[B, ndims, *box]`` on a box of the image grid.
        mode: ``"bilinear"`` (trilinear in 3D), ``"nearest"`` (labels), or ``"bicubic"`` (2D only).
        padding: ``"zeros"`` (images), ``"border"`` (fields), or ``"reflection"``.
        offset: the box's first voxel in the image grid, one int per axis: the output at box
            position ``x`` is ``image(offset + x + displacement(x))`` (used to evaluate a field
            only where it is needed). ``None``: the box is the whole image.

    Returns:
        ``[B, C, *spatial]`` (or ``[B, C, *box]``) warped image, dtype of ``image``.
    """
    ndims = check_displacement(displacement)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    if mode == "bicubic" and ndims != 2:
        raise ValueError(
            f"bicubic warping is 2D only; displacement shape {tuple(displacement.shape)}"
        )
    if not isinstance(image, torch.Tensor) or image.ndim != displacement.ndim:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"image must be [B, C, *spatial] with {ndims} spatial dims to match displacement "
            f"{tuple(displacement.shape)}, got {shape}"
        )
    if offset is None and (
        image.shape[0] != displacement.shape[0] or image.shape[2:] != displacement.shape[2:]
    ):
        raise ValueError(
            f"image {tuple(image.shape)} and displacement {tuple(displacement.shape)} "
            "must share batch size and spatial shape"
        )
    if offset is not None and (
        image.shape[0] != displacement.shape[0]
        or len(offset) != ndims
        or any(
            o < 0 or o + m > n
            for o, m, n in zip(offset, displacement.shape[2:], image.shape[2:], strict=True)
        )
    ):
        raise ValueError(
            f"displacement box {tuple(displacement.shape)} at offset {tuple(offset)} must lie "
            f"inside image {tuple(image.shape)} with the same batch size"
        )
    integer_input = not image.is_floating_point()
    if integer_input and mode != "nearest":
        raise ValueError(
            f"integer image (dtype {image.dtype}) can only be warped with mode='nearest'"
        )
    source = (
        image.to(displacement.dtype)
        if integer_input or image.dtype != displacement.dtype
        else image
    )
    grid = _sampling_grid(displacement, tuple(image.shape[2:]), offset)
    # grid_sample calls trilinear interpolation "bilinear" on 5-D inputs too
    warped = F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=True)
    if integer_input:
        return warped.round().to(image.dtype)
    return warped.to(image.dtype)


def compose(first: torch.Tensor, second: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Displacement of applying ``first`` then ``second``: ``second + first o (id + second)``.

    Both ``[B, ndims, *spatial]`` in voxels. ``first`` is resampled with ``padding``: ``"border"``
    (default) so the field does not fall to zero outside the image; ``"zeros"`` as the authors'
    generation chain does (their 2D config's ``padding_mode``).
    """
    check_displacement(first, "first")
    check_displacement(second, "second")
    _check_same_field_shape(first, second)
    return second + warp(first, second, mode="bilinear", padding=padding)


def invert(
    displacement: torch.Tensor,
    iterations: int = 50,
    tolerance: float = 1e-5,
    max_step: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of a diffeomorphic displacement by Newton's method.

    Solves ``g(v) = v(y) + u(y + v(y)) = 0`` per voxel (``v`` undoes ``u``:
    ``warp(warp(image, u), v) ~ image``) from ``v = -u``, with the Jacobian ``I + grad u`` read at
    ``y + v`` and each step's length capped at ``max_step`` voxels. A plain fixed-point
    iteration ``v = -u o (id + v)`` only contracts where ``|grad u| < 1`` and stalls on the
    strongly expanding fields of late diffusion steps; Newton reaches float rounding there too.
    ``u`` is read with border padding: where ``u`` brought in content from outside the image the
    inverse is an extrapolation (the residual below stays small, the image there is unknown).

    Args:
        displacement: ``u``, ``[B, ndims, *spatial]`` in voxels.
        iterations: at most this many Newton steps.
        tolerance: stop once every voxel's residual is below this (voxels).
        max_step: longest step (voxels) a voxel may take per iteration.

    Returns:
        ``(v, residual)``: the inverse ``[B, ndims, *spatial]`` and ``|v + u o (id + v)|`` per
        voxel, ``[B, *spatial]`` (voxels; 0 for an exact inverse).
    """
    from drdm.deform.metrics import jacobian_matrix  # metrics builds on this module

    ndims = check_displacement(displacement)
    batch, shape = displacement.shape[0], displacement.shape[2:]
    jacobian = jacobian_matrix(displacement).reshape(batch, ndims * ndims, *shape)
    inverse = -displacement
    for _ in range(int(iterations)):
        residual = inverse + warp(displacement, inverse, padding="border")
        if float(residual.norm(dim=1).amax()) < tolerance:
            break
        # [B, i, j, *S] -> [B, *S, i, j] for a batched solve per voxel
        local = warp(jacobian, inverse, padding="border").reshape(batch, ndims, ndims, *shape)
        local = local.movedim(1, -1).movedim(1, -1)
        solution, info = torch.linalg.solve_ex(local, residual.movedim(1, -1)[..., None])
        step = solution[..., 0].movedim(-1, 1)
        # a folded voxel has a singular Jacobian: take the fixed-point step there instead
        singular = (info != 0).unsqueeze(1) | ~torch.isfinite(step)
        step = torch.where(singular, residual, step)
        length = step.norm(dim=1, keepdim=True).clamp_min(1e-12)
        inverse = inverse - step * (max_step / length).clamp(max=1.0)
    residual = inverse + warp(displacement, inverse, padding="border")
    return inverse, residual.norm(dim=1)
