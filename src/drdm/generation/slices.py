"""A 2D model on a 3D volume: the volume as a stack of slices, and the results back as volumes.

The slices along ``axis`` go through the 2D sampler as one group (one field draw per sample,
one field per slice); each slice's 2D field gets a zero through-plane component, so the volume
field is a valid 3D displacement (channels along the volume's axes) that ITK tools read.
"""

from __future__ import annotations

import torch


def to_slices(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """``[X, Y, Z]`` volume -> ``[N, 1, *plane]``, the ``N`` slices along ``axis``."""
    return volume.movedim(axis % 3, 0)[:, None]


def to_volume(slices: torch.Tensor, axis: int) -> torch.Tensor:
    """``[N, C, *plane]`` slices -> ``[1, C, *volume]`` with the slices back along ``axis``."""
    return slices.movedim(0, 1).movedim(1, 1 + axis % 3)[None]


def field_to_volume(field: torch.Tensor, axis: int) -> torch.Tensor:
    """In-plane slice fields ``[N, 2, *plane]`` (voxels) -> the volume field ``[1, 3, *volume]``.

    Channel ``i`` of the result is the displacement along volume axis ``i``; the through-plane
    channel is zero.
    """
    axis = axis % 3
    in_plane = [a for a in range(3) if a != axis]
    volume_field = field.new_zeros(field.shape[0], 3, *field.shape[2:])
    volume_field[:, in_plane[0]] = field[:, 0]
    volume_field[:, in_plane[1]] = field[:, 1]
    return to_volume(volume_field, axis)
