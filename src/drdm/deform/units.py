"""Unit conversions of voxel displacement fields: to millimetres in the world frame."""

from __future__ import annotations

import torch

from drdm.deform.spatial import check_displacement


def _linear_part(affine: torch.Tensor, ndims: int, displacement: torch.Tensor) -> torch.Tensor:
    """The ``[B or 1, ndims, ndims]`` voxel->world matrix from a 2x2/3x3/4x4 (batched) affine."""
    if not isinstance(affine, torch.Tensor):
        affine = torch.as_tensor(affine)
    if affine.ndim == 2:
        affine = affine.unsqueeze(0)
    square = affine.ndim == 3 and affine.shape[1] == affine.shape[2]
    allowed = (2, 3, 4) if ndims == 2 else (3, 4)
    if (
        not square
        or affine.shape[1] not in allowed
        or affine.shape[0]
        not in (
            1,
            displacement.shape[0],
        )
    ):
        raise ValueError(
            f"affine for displacement {tuple(displacement.shape)} must be [B or 1,] N x N with "
            f"N in {allowed}, got shape {tuple(affine.shape)}"
        )
    return affine[:, :ndims, :ndims].to(device=displacement.device, dtype=displacement.dtype)


def displacement_to_world(displacement: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel displacements to millimetre vectors in the affine's world frame.

    A voxel step ``d`` (tensor axis order) moves ``A d`` in the world, where ``A`` is the linear
    part of the voxel->world affine (translation plays no role for vectors).

    Args:
        displacement: ``[B, ndims, *spatial]`` in voxels.
        affine: voxel->world, ``[4, 4]`` / ``[B, 4, 4]`` (the 3x3 block is used), or ``[3, 3]``.
            For 2D fields: a homogeneous 2D ``[3, 3]`` or a ``[2, 2]`` matrix, or a 4x4 whose
            top-left 2x2 block is used (valid when the two tensor axes map onto the first two
            world axes, e.g. axial slices of an axis-aligned volume; pass 2x2/3x3 otherwise).
            A NIfTI affine gives RAS+ vectors; ITK's LPS frame negates the first two components.

    Returns:
        ``[B, ndims, *spatial]`` in mm, component ``i`` along world axis ``i``.
    """
    ndims = check_displacement(displacement)
    linear = _linear_part(affine, ndims, displacement)
    return torch.einsum(
        "bij,bj...->bi...", linear.expand(displacement.shape[0], -1, -1), displacement
    )
