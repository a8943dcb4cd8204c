"""Quality metrics of displacement fields: Jacobian determinant, folding, magnitude, consistency.

All take fields ``[B, ndims, *spatial]`` in voxels and return per-sample values ``[B]`` (or a
per-voxel map), differentiable where that makes sense.

Jacobian: the map is ``phi(x) = x + u(x)``; its Jacobian is ``I + grad(u)``. Derivatives are
central differences in the interior and one-sided (first order) differences on the first and last
voxel of each axis (``torch.gradient`` with ``edge_order=1``), so the output has the field's shape.
"""

from __future__ import annotations

import torch

from drdm.deform.spatial import check_displacement, compose


def _spacing_per_axis(spacing, displacement: torch.Tensor, ndims: int) -> torch.Tensor | None:
    """Spacing as ``[B or 1, ndims]`` (mm), or None for unit spacing."""
    if spacing is None:
        return None
    spacing = torch.as_tensor(spacing, device=displacement.device, dtype=displacement.dtype)
    given_shape = tuple(spacing.shape)
    if spacing.ndim == 0:
        spacing = spacing.expand(ndims)
    if spacing.ndim == 1:
        spacing = spacing.unsqueeze(0)
    if (
        spacing.ndim != 2
        or spacing.shape[1] != ndims
        or spacing.shape[0]
        not in (
            1,
            displacement.shape[0],
        )
    ):
        raise ValueError(
            f"spacing must be a scalar, [ndims] or [B, ndims] for displacement "
            f"{tuple(displacement.shape)}, got shape {given_shape}"
        )
    return spacing


def jacobian_matrix(displacement: torch.Tensor, spacing=None) -> torch.Tensor:
    """``d phi_i / d x_j`` of ``phi = x + u`` as ``[B, ndims, ndims, *spatial]``.

    With ``spacing`` (mm per voxel along each tensor axis: scalar, ``[ndims]`` or ``[B, ndims]``)
    positions and displacements are both converted to mm: entry ``(i, j)`` becomes
    ``delta_ij + s_i / s_j * du_i/dx_j``. This is ``diag(s) J diag(s)^-1``, a similarity, so the
    determinant of a voxel-unit field does not depend on spacing (volume ratios are unitless).
    """
    ndims = check_displacement(displacement)
    gradients = [
        torch.stack(torch.gradient(displacement[:, i], dim=list(range(1, ndims + 1))), dim=1)
        for i in range(ndims)
    ]  # each [B, ndims (j), *spatial] = d u_i / d x_j in voxels
    jacobian = torch.stack(gradients, dim=1)
    spacing = _spacing_per_axis(spacing, displacement, ndims)
    if spacing is not None:
        ratio = spacing.unsqueeze(2) / spacing.unsqueeze(1)  # [B, i, j] = s_i / s_j
        jacobian = jacobian * ratio.view(*ratio.shape, *([1] * ndims))
    eye = torch.eye(ndims, device=displacement.device, dtype=displacement.dtype)
    return jacobian + eye.view(1, ndims, ndims, *([1] * ndims))


def jacobian_determinant(displacement: torch.Tensor, spacing=None) -> torch.Tensor:
    """``det(I + grad u)`` per voxel, ``[B, *spatial]``; differentiable (usable in losses).

    See :func:`jacobian_matrix` for the border handling and the meaning of ``spacing``.
    """
    j = jacobian_matrix(displacement, spacing)
    if j.shape[1] == 2:
        return j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
    return (
        j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
        - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
        + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0])
    )


def folding_ratio(displacement: torch.Tensor, spacing=None) -> torch.Tensor:
    """Fraction of voxels with ``det J <= 0`` per sample, ``[B]`` in ``[0, 1]``."""
    det = jacobian_determinant(displacement, spacing)
    return (det <= 0).flatten(1).to(displacement.dtype).mean(dim=1)


def sd_log_jacobian(displacement: torch.Tensor, spacing=None, eps: float = 1e-9) -> torch.Tensor:
    """Standard deviation over voxels of ``log(max(det J, eps))`` per sample, ``[B]``.

    Folded voxels are clamped to ``eps`` (they would have no logarithm), which makes them count
    as extreme values, as in the Learn2Reg evaluation.
    """
    det = jacobian_determinant(displacement, spacing)
    return det.clamp(min=eps).log().flatten(1).std(dim=1)


def displacement_stats(displacement: torch.Tensor) -> dict[str, torch.Tensor]:
    """Magnitude of the displacement per sample, each ``[B]``.

    Keys: ``max_voxels`` / ``mean_voxels`` (Euclidean length in voxels) and ``max_fraction`` /
    ``mean_fraction`` (length after dividing component ``i`` by the image size along axis ``i``,
    i.e. as a fraction of the image size; for square images ``|u| / S``).
    """
    ndims = check_displacement(displacement)
    size = torch.tensor(
        displacement.shape[2:], device=displacement.device, dtype=displacement.dtype
    ).view(1, ndims, *([1] * ndims))
    length = displacement.norm(dim=1).flatten(1)
    fraction = (displacement / size).norm(dim=1).flatten(1)
    return {
        "max_voxels": length.amax(dim=1),
        "mean_voxels": length.mean(dim=1),
        "max_fraction": fraction.amax(dim=1),
        "mean_fraction": fraction.mean(dim=1),
    }


def inverse_consistency_error(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Mean length (voxels) of the residual of a forward/backward pair, per sample ``[B]``.

    The residual of applying ``forward`` then ``backward`` is ``compose(forward, backward)``
    (zero when ``backward`` inverts ``forward``); the error averages its length with that of
    the reverse order ``compose(backward, forward)``.
    """
    there_and_back = compose(forward, backward).norm(dim=1).flatten(1).mean(dim=1)
    back_and_there = compose(backward, forward).norm(dim=1).flatten(1).mean(dim=1)
    return 0.5 * (there_and_back + back_and_there)
