"""2D mode: cut a preprocessed volume into slices that keep their in-plane geometry and labels.

A slice along voxel axis ``a`` of a ``[C, X, Y, Z]`` volume becomes a TorchIO 2D subject
``[C, U, V, 1]`` where ``U, V`` are the two remaining axes in their original order and the singleton
is last (TorchIO's 2D convention). Its affine has columns ``(U, V, a)`` of the volume's affine and
the origin moved to the slice, so ``affine @ [u, v, 0, 1]`` is the world position of pixel
``(u, v)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torchio as tio

METADATA_KEYS = ("group", "source_path", "original_affine", "original_shape", "phase")


def slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Voxel -> world affine ``[4, 4]`` of slice ``index`` along ``axis`` (columns U, V, normal)."""
    affine = np.asarray(affine, dtype=np.float64)
    kept = [a for a in range(3) if a != axis]
    result = np.eye(4)
    result[:3, :3] = affine[:3, [*kept, axis]]
    offset = np.zeros(3)
    offset[axis] = index
    result[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return result


def _take(data: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """``[C, X, Y, Z]`` -> ``[C, U, V, 1]``: one slice with the singleton moved last."""
    return data.select(axis + 1, index).unsqueeze(-1).clone()


def is_empty(subject: tio.Subject, axis: int, index: int, min_fraction: float) -> bool:
    """Whether a slice has too little foreground (label > 0 if labelled, else image > its min)."""
    if "label" in subject:
        foreground = subject["label"].data.select(axis + 1, index) > 0
    else:
        image = subject["image"].data
        foreground = image.select(axis + 1, index) > image.min()
    fraction = float(foreground.float().mean())
    return fraction <= min_fraction


def extract_slices(
    subject: tio.Subject,
    axis: int = 2,
    skip_empty: bool = False,
    min_foreground_fraction: float = 0.0,
) -> list[tio.Subject]:
    """All 2D slices of a loaded volume subject along voxel ``axis`` (0, 1 or 2).

    Args:
        subject: volume subject with ``image`` (and optional ``label`` / ``mask``) loaded.
        axis: voxel axis across which to slice (2 = the third voxel axis, e.g. ACDC short-axis
            stacks or axial slices of an RAS volume).
        skip_empty: drop slices whose foreground fraction is ``<= min_foreground_fraction``
            (foreground: label > 0 when the subject has a label, otherwise image above its minimum).
        min_foreground_fraction: threshold for ``skip_empty``.

    Returns:
        Slice subjects with ids ``"{volume id}_s{index:03d}"`` and the volume's ``group``, plus
        ``volume_id``, ``slice_index`` and ``slice_axis`` metadata.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {axis}")
    image = subject["image"]
    image_keys = [key for key, value in subject.items() if isinstance(value, tio.Image)]
    slices = []
    for index in range(image.shape[axis + 1]):
        if skip_empty and is_empty(subject, axis, index, min_foreground_fraction):
            continue
        affine = slice_affine(image.affine, axis, index)
        items: dict[str, object] = {
            key: type(subject[key])(tensor=_take(subject[key].data, axis, index), affine=affine)
            for key in image_keys
        }
        items.update({key: subject[key] for key in METADATA_KEYS if key in subject})
        items.update(
            id=f"{subject['id']}_s{index:03d}",
            volume_id=subject["id"],
            slice_index=index,
            slice_axis=axis,
        )
        slices.append(tio.Subject(items))
    return slices
