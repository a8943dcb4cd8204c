"""The batch contract: TorchIO subjects -> dicts of tensors in the model layout.

Per-sample layout (``S`` = two in-plane axes for 2D slices, three voxel axes in 3D):

- ``image`` float32 ``[1, *S]``; ``label`` int64 ``[1, *S]`` (-1 everywhere when the sample has no
  label); ``has_label`` bool; ``spacing`` float32 ``[ndims]`` mm in tensor axis order; ``affine``
  float64 ``[4, 4]`` voxel -> world of the sample as fed to the model (for 2D slices the first two
  columns are the in-plane axes and the third the slice normal); ``id`` str.
- optional ``keypoints`` float32 ``[N, ndims]`` in voxels of the sample (3D only).

Batches stack these with a leading ``B``; registration batches hold ``moving`` / ``fixed`` (+
``moving_label``, ``fixed_label``, ``moving_keypoints``, ``fixed_keypoints``) and the fixed image's
``spacing`` / ``affine``. Keypoint sets of different length are padded with NaN rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio

IGNORE_LABEL = -1


def _model_layout(data: torch.Tensor, ndims: int, what: str) -> torch.Tensor:
    """TorchIO ``[C, W, H, D]`` -> ``[C, *S]``; 2D drops the singleton last axis."""
    if ndims == 3:
        return data
    if data.shape[-1] != 1:
        raise ValueError(
            f"2D sample '{what}' must have a singleton last axis, got {list(data.shape)}"
        )
    return data[..., 0]


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World mm ``[N, 3]`` -> voxel coordinates ``[N, 3]`` of the image with ``affine``."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (homogeneous @ np.linalg.inv(affine).T)[:, :3]


def subject_to_sample(subject: tio.Subject, ndims: int) -> dict[str, Any]:
    """One subject (3D volume or 2D slice ``[C, W, H, 1]``) -> one sample dict (see module doc)."""
    image = subject["image"]
    affine = np.asarray(image.affine, dtype=np.float64)
    sample: dict[str, Any] = {
        "image": _model_layout(image.data, ndims, "image").to(torch.float32),
        "spacing": torch.tensor(image.spacing[:ndims], dtype=torch.float32),
        "affine": torch.from_numpy(affine.copy()),
        "id": str(subject["id"]),
    }
    if "label" in subject:
        sample["label"] = _model_layout(subject["label"].data, ndims, "label").to(torch.int64)
    if ndims == 3 and subject.get("keypoints_world") is not None:
        voxels = world_to_voxel(np.asarray(subject["keypoints_world"]), affine)
        sample["keypoints"] = torch.from_numpy(voxels).to(torch.float32)
    return sample


def _stack_keypoints(points: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N_i, d]`` each -> ``[B, max N_i, d]`` padded with NaN rows."""
    length = max(p.shape[0] for p in points)
    out = torch.full((len(points), length, points[0].shape[1]), float("nan"))
    for index, p in enumerate(points):
        out[index, : p.shape[0]] = p
    return out


def _stack_labels(
    samples: Sequence[dict], key: str, like: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack labels, filling samples without one with -1 (shape of ``like``); returns has_label."""
    labels, has_label = [], []
    for sample in samples:
        label = sample.get(key)
        has_label.append(label is not None)
        if label is None:
            label = torch.full(sample[like].shape, IGNORE_LABEL, dtype=torch.int64)
        labels.append(label)
    return torch.stack(labels), torch.tensor(has_label, dtype=torch.bool)


def collate_samples(samples: Sequence[dict], include_label: bool) -> dict[str, Any]:
    """Stack sample dicts into a batch; ``label`` is present when ``include_label`` is true."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "spacing": torch.stack([s["spacing"] for s in samples]),
        "affine": torch.stack([s["affine"] for s in samples]),
        "id": [s["id"] for s in samples],
    }
    labels, has_label = _stack_labels(samples, "label", "image")
    batch["has_label"] = has_label
    if include_label:
        batch["label"] = labels
    if all("keypoints" in s for s in samples):
        batch["keypoints"] = _stack_keypoints([s["keypoints"] for s in samples])
    return batch


def collate_subjects(subjects: Sequence[tio.Subject], ndims: int, include_label: bool) -> dict:
    """``SubjectsLoader`` collate function: subjects -> batch dict in the model layout."""
    return collate_samples([subject_to_sample(s, ndims) for s in subjects], include_label)


def collate_pairs(pairs: Sequence[dict], include_label: bool) -> dict[str, Any]:
    """Registration batches from pair dicts ``{"moving": sample, "fixed": sample, **extra}``.

    Extra tensor entries (e.g. a known ``displacement`` added by a pair transform) are stacked.
    """
    moving = [pair["moving"] for pair in pairs]
    fixed = [pair["fixed"] for pair in pairs]
    batch: dict[str, Any] = {
        "moving": torch.stack([s["image"] for s in moving]),
        "fixed": torch.stack([s["image"] for s in fixed]),
        "spacing": torch.stack([s["spacing"] for s in fixed]),
        "affine": torch.stack([s["affine"] for s in fixed]),
        "id": [f"{m['id']}_to_{f['id']}" for m, f in zip(moving, fixed)],
        "moving_id": [m["id"] for m in moving],
        "fixed_id": [f["id"] for f in fixed],
    }
    if include_label:
        batch["moving_label"], batch["moving_has_label"] = _stack_labels(moving, "label", "image")
        batch["fixed_label"], batch["fixed_has_label"] = _stack_labels(fixed, "label", "image")
    for role, samples in (("moving", moving), ("fixed", fixed)):
        if all("keypoints" in s for s in samples):
            batch[f"{role}_keypoints"] = _stack_keypoints([s["keypoints"] for s in samples])
    for key in pairs[0]:
        if key not in ("moving", "fixed") and isinstance(pairs[0][key], torch.Tensor):
            batch[key] = torch.stack([pair[key] for pair in pairs])
    return batch
