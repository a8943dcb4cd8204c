"""Registration-specific metrics: landmark TRE and dense field error, both in millimetres.

Conventions (as everywhere in drdm): displacements are ``[B, ndims, *S]`` in voxels, channel i
along tensor axis i, and registration is a pull-back: ``warped(x) = moving(x + u(x))`` with
``x`` on the fixed grid. So a fixed-image landmark ``f`` maps to ``f + u(f)`` in the moving image,
and the target registration error is ``|f + u(f) - m|`` (Learn2Reg's convention).

Spacing is ``[B, ndims]`` or ``[ndims]`` millimetres per voxel in tensor axis order; ``None``
means 1 mm (results in voxels). Pure torch: no Lightning or Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from drdm.deform import folding_ratio, sd_log_jacobian
from drdm.deform.spatial import check_displacement, warp
from drdm.metrics.overlap import dice_score
from drdm.metrics.surface import average_surface_distance, hausdorff_distance_95


def _spacing_tensor(
    spacing: torch.Tensor | None, batch: int, ndims: int, like: torch.Tensor
) -> torch.Tensor:
    """``[B, ndims]`` spacing on ``like``'s device and dtype (ones when ``None``)."""
    if spacing is None:
        return torch.ones(batch, ndims, device=like.device, dtype=like.dtype)
    spacing = torch.as_tensor(spacing, device=like.device, dtype=like.dtype)
    if spacing.ndim == 1:
        spacing = spacing.expand(batch, -1)
    if spacing.shape != (batch, ndims):
        raise ValueError(
            f"spacing must be [{batch}, {ndims}] or [{ndims}], got {tuple(spacing.shape)}"
        )
    return spacing


def sample_at_points(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linearly interpolate ``field`` ``[B, C, *S]`` at voxel ``points`` ``[B, N, ndims]``.

    Returns ``[B, N, C]``. Points outside the grid take the border value.
    """
    ndims = field.ndim - 2
    if points.ndim != 3 or points.shape[0] != field.shape[0] or points.shape[2] != ndims:
        raise ValueError(
            f"points must be [B, N, {ndims}] to match field {tuple(field.shape)}, "
            f"got {tuple(points.shape)}"
        )
    sizes = torch.tensor(field.shape[2:], device=field.device, dtype=field.dtype)
    normalised = 2.0 * points.to(field.dtype) / (sizes - 1).clamp(min=1) - 1.0
    # grid_sample wants x-y(-z), i.e. reversed tensor-axis order, and a spatial grid layout
    grid = normalised.flip(-1).view(field.shape[0], points.shape[1], *[1] * (ndims - 1), ndims)
    sampled = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.reshape(field.shape[0], field.shape[1], points.shape[1]).transpose(1, 2)


def target_registration_error(
    displacement: torch.Tensor,
    fixed_keypoints: torch.Tensor,
    moving_keypoints: torch.Tensor,
    spacing: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-landmark TRE ``[B, N]`` in mm: ``|(f + u(f) - m) * spacing|``.

    Args:
        displacement: ``[B, ndims, *S]`` voxels (fixed grid -> moving image).
        fixed_keypoints, moving_keypoints: ``[B, N, ndims]`` voxel coordinates, corresponding
            rows.
        spacing: mm per voxel, ``[B, ndims]`` or ``[ndims]``; ``None`` gives voxels.
    """
    ndims = check_displacement(displacement)
    if fixed_keypoints.shape != moving_keypoints.shape:
        raise ValueError(
            f"fixed_keypoints {tuple(fixed_keypoints.shape)} and moving_keypoints "
            f"{tuple(moving_keypoints.shape)} must have the same shape"
        )
    fixed_keypoints = fixed_keypoints.to(displacement)
    moved = fixed_keypoints + sample_at_points(displacement, fixed_keypoints)
    scale = _spacing_tensor(spacing, displacement.shape[0], ndims, displacement)
    return ((moved - moving_keypoints.to(displacement)) * scale[:, None, :]).norm(dim=-1)


def endpoint_error(
    displacement: torch.Tensor,
    target: torch.Tensor,
    spacing: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean endpoint error ``[B]`` in mm between two fields (voxels) on the same grid.

    ``mask`` (``[B, 1, *S]`` or ``[B, *S]`` bool) restricts the mean, e.g. to the foreground.
    """
    ndims = check_displacement(displacement)
    check_displacement(target, "target")
    if displacement.shape != target.shape:
        raise ValueError(
            f"displacement {tuple(displacement.shape)} and target {tuple(target.shape)} differ"
        )
    scale = _spacing_tensor(spacing, displacement.shape[0], ndims, displacement)
    difference = (displacement - target.to(displacement)) * scale.view(*scale.shape, *[1] * ndims)
    error = difference.norm(dim=1)  # [B, *S]
    if mask is None:
        return error.flatten(1).mean(1)
    mask = mask.reshape(error.shape).to(error.dtype)
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


# every per-pair metric of :func:`pair_metrics`, in report order
PAIR_METRICS = (
    "dice",
    "hd95",
    "asd",
    "tre",
    "field_error",
    "field_error_foreground",
    "folding_ratio",
    "sd_log_jacobian",
)


def _labels_present(batch: Mapping) -> torch.Tensor | None:
    """``[B]`` bool: both labels present and not the ``-1`` "no label" fill."""
    if "moving_label" not in batch or "fixed_label" not in batch:
        return None
    moving, fixed = batch["moving_label"], batch["fixed_label"]
    return (moving.flatten(1) >= 0).all(1) & (fixed.flatten(1) >= 0).all(1)


def _label_metrics(
    displacement: torch.Tensor,
    batch: Mapping,
    labelled: torch.Tensor,
    spacing: torch.Tensor | None,
    num_classes: int | None,
) -> dict[str, torch.Tensor]:
    """Dice / HD95 / ASD ``[B]`` of the warped moving label (NaN for unlabelled samples)."""
    batch_size = displacement.shape[0]
    keep = labelled.to(displacement.device).nonzero().flatten()
    values = {
        name: torch.full((batch_size,), float("nan"), dtype=torch.float64)
        for name in ("dice", "hd95", "asd")
    }
    if keep.numel() == 0:
        return values
    moving_label = batch["moving_label"].to(displacement.device)[keep]
    fixed_label = batch["fixed_label"].to(displacement.device)[keep]
    warped_label = warp(moving_label, displacement[keep], mode="nearest")
    classes = num_classes or int(max(fixed_label.max(), moving_label.max())) + 1
    classes = max(classes, 2)
    spacing_kept = None if spacing is None else spacing.expand(batch_size, -1)[keep]
    scores = {
        "dice": dice_score(warped_label, fixed_label, classes),
        "hd95": hausdorff_distance_95(warped_label, fixed_label, classes, spacing_kept),
        "asd": average_surface_distance(warped_label, fixed_label, classes, spacing_kept),
    }
    for name, per_class in scores.items():
        # mean over the foreground classes present in either label (NaN classes skipped)
        values[name][keep.cpu()] = torch.nanmean(per_class.double().cpu(), dim=1)
    return values


def pair_metrics(
    displacement: torch.Tensor,
    batch: Mapping,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every registration metric available for a batch of real pairs, each ``[B]`` float64.

    Args:
        displacement: predicted ``[B, ndims, *S]`` voxels (``warp(moving, u) ~ fixed``).
        batch: registration batch (see ``drdm.data``): uses ``spacing`` and, when present,
            ``moving_label``/``fixed_label`` (Dice, HD95, ASD in mm; mean over foreground
            classes), ``moving_keypoints``/``fixed_keypoints`` (``tre`` mean in mm), and
            ``displacement`` (the true field: ``field_error`` mean endpoint error in mm over the
            grid and, with labels, ``field_error_foreground`` over the fixed label's foreground).
        num_classes: label classes including background; ``None`` takes the largest label in
            the batch + 1.

    Always reports ``folding_ratio`` (fraction of voxels with ``det J <= 0``) and
    ``sd_log_jacobian``. Values that cannot be computed for a sample are NaN.
    """
    check_displacement(displacement)
    spacing = batch.get("spacing")
    if spacing is not None:
        spacing = torch.as_tensor(spacing, device=displacement.device).to(displacement.dtype)
    metrics: dict[str, torch.Tensor] = {}

    labelled = _labels_present(batch)
    if labelled is not None:
        metrics.update(_label_metrics(displacement, batch, labelled, spacing, num_classes))

    if "fixed_keypoints" in batch and "moving_keypoints" in batch:
        errors = target_registration_error(
            displacement, batch["fixed_keypoints"], batch["moving_keypoints"], spacing
        )
        # keypoint lists are NaN-padded to the longest in the batch
        metrics["tre"] = torch.nanmean(errors, dim=1).double().cpu()

    if "displacement" in batch:
        truth = batch["displacement"]
        metrics["field_error"] = endpoint_error(displacement, truth, spacing).double().cpu()
        if labelled is not None:
            # inside the labelled anatomy of the fixed image: background motion has no image
            # content to recover it from, so the whole-grid error mixes in unrecoverable voxels
            foreground = batch["fixed_label"].to(displacement.device) > 0
            inside = endpoint_error(displacement, truth, spacing, foreground).double().cpu()
            empty = ~(foreground.flatten(1).any(1).cpu() & labelled.cpu())
            metrics["field_error_foreground"] = inside.masked_fill(empty, float("nan"))

    metrics["folding_ratio"] = folding_ratio(displacement, spacing).double().cpu()
    metrics["sd_log_jacobian"] = sd_log_jacobian(displacement, spacing).double().cpu()
    return metrics
