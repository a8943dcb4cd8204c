"""Training losses, pure torch: the DRDM objective (method §4), and the segmentation and
registration losses (soft Dice, local NCC, gradient smoothness).

All fields are ``[B, ndims, *spatial]`` displacements in **voxels**. The losses convert them to
grid_sample-normalised units (``2 / (n - 1)`` per voxel along each axis, i.e. the authors' units)
before computing anything with an absolute scale (``eps``, the regulariser's dead zone), so the
reference weights and thresholds keep their meaning at every image size.

With ``d`` the recovery target and ``p`` the prediction, the training step computes
``q = warp(p, d, padding="border")`` (``p`` resampled at the target's end points); the network
should undo the target, ``q ~ -d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drdm.deform.metrics import jacobian_determinant
from drdm.deform.spatial import check_displacement


def to_normalised(displacement: torch.Tensor) -> torch.Tensor:
    """Voxels -> grid_sample units: channel ``i`` times ``2 / (n_i - 1)``; same shape."""
    ndims = check_displacement(displacement)
    spatial = displacement.shape[2:]
    scale = torch.tensor(
        [2.0 / max(n - 1, 1) for n in spatial], device=displacement.device, dtype=displacement.dtype
    )
    return displacement * scale.view(1, ndims, *([1] * ndims))


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    check_displacement(prediction, "prediction")
    check_displacement(target, "target")
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must match"
        )


RSE_REDUCTIONS = ("voxel", "sample", "batch")


def relative_squared_error(
    recovered: torch.Tensor, target: torch.Tensor, eps: float = 1e-7, reduction: str = "voxel"
) -> torch.Tensor:
    """Relative squared recovery error: scalar; 0 when ``q == -d`` exactly, 1 for ``q == 0``.

    * ``reduction="voxel"`` (the method's): ``mean_x |q + d|^2 / (|d(x)|^2 + eps)``. Voxels
      where the target nearly vanishes get huge weights, so an uncertain network is pushed to
      predict nothing there.
    * ``reduction="sample"``: ``mean_b sum_x |q + d|^2 / (sum_x |d|^2 + eps * N)``, the square
      of the validation recovery error of each sample; every voxel of a sample weighs the same.
    * ``reduction="batch"``: ``sum_b,x |q + d|^2 / (sum_b,x |d|^2 + eps * N)``: samples weigh
      by their target's energy, so small-``t`` samples (sub-voxel targets, whose direction an
      image hardly shows) add little noise, and a ``t = 0`` sample (``d = 0``) asks for ``p = 0``
      without dividing by zero.

    Args:
        recovered: ``q``, the prediction resampled at the target's end points, voxels.
        target: ``d``, the recovery-target field, voxels.
        eps: added to ``|d|^2`` per voxel, in normalised units squared (keeps ``t = 0`` finite).
        reduction: ``"voxel"``, ``"sample"`` or ``"batch"``.
    """
    _check_pair(recovered, target)
    if reduction not in RSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {RSE_REDUCTIONS}, got {reduction!r}")
    q, d = to_normalised(recovered), to_normalised(target)
    residual, norm = (q + d).square().sum(1), d.square().sum(1)
    if reduction == "voxel":
        return (residual / (norm + eps)).mean()
    if reduction == "sample":
        return (residual.flatten(1).mean(1) / (norm.flatten(1).mean(1) + eps)).mean()
    return residual.mean() / (norm.mean() + eps)


def direction_similarity(
    recovered: torch.Tensor, target: torch.Tensor, eps: float = 1e-20
) -> torch.Tensor:
    """Mean cosine similarity between ``q`` and ``d`` over voxels: scalar in ``[-1, 1]``.

    Minimising it pushes ``q`` anti-parallel to ``d``. ``eps`` (normalised units to the fourth)
    keeps voxels where either field vanishes at 0 instead of NaN.
    """
    _check_pair(recovered, target)
    q, d = to_normalised(recovered), to_normalised(target)
    dot = (q * d).sum(1)
    norms = torch.sqrt(q.square().sum(1) * d.square().sum(1) + eps)
    return (dot / norms).mean()


def smoothness_l1(displacement: torch.Tensor, dead_zone: float = 1e-4) -> torch.Tensor:
    """Mean L1 of forward finite differences above a dead zone, averaged over axes: scalar.

    Differences are taken in normalised units (the dead zone is in those units), so tiny
    ripples below ``dead_zone`` cost nothing.
    """
    ndims = check_displacement(displacement)
    field = to_normalised(displacement)
    terms = []
    for axis in range(2, 2 + ndims):
        difference = torch.diff(field, dim=axis)
        terms.append(F.relu(difference.abs() - dead_zone).mean())
    return torch.stack(terms).mean()


def negative_jacobian_penalty(displacement: torch.Tensor) -> torch.Tensor:
    """``mean(relu(-det J))`` with ``J = I + grad(u)`` (the true determinant): scalar >= 0."""
    # imported here so that `drdm.losses` can be imported before the metrics module exists
    return F.relu(-jacobian_determinant(displacement)).mean()


def regularisation(
    displacement: torch.Tensor, dead_zone: float = 1e-4, folding_weight: float = 2.0
) -> torch.Tensor:
    """Regulariser on the prediction ``p``: ``smoothness_l1 + folding_weight * relu(-det J)``."""
    return smoothness_l1(displacement, dead_zone) + folding_weight * negative_jacobian_penalty(
        displacement
    )


@dataclass
class DRDMLoss:
    """Weighted sum of the §4 terms; every number is a constructor argument (Hydra config).

    Call with ``prediction`` ``p``, ``recovered`` ``q = p o (id + d)`` and ``target`` ``d``
    (all ``[B, ndims, *spatial]`` voxels); returns a dict of scalar tensors with the weighted
    ``"loss"`` and each unweighted term (``"rse"``, ``"direction"``, ``"smoothness"``,
    ``"folding"``) for logging.
    """

    rse_weight: float = 1.0
    direction_weight: float = 1.0
    regularisation_weight: float = 10.0
    folding_weight: float = 2.0
    dead_zone: float = 1e-4
    rse_eps: float = 1e-7
    direction_eps: float = 1e-20
    rse_reduction: str = "voxel"

    def __call__(
        self, prediction: torch.Tensor, recovered: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        _check_pair(prediction, target)
        rse = relative_squared_error(recovered, target, self.rse_eps, self.rse_reduction)
        direction = direction_similarity(recovered, target, self.direction_eps)
        smoothness = smoothness_l1(prediction, self.dead_zone)
        folding = negative_jacobian_penalty(prediction)
        regulariser = smoothness + self.folding_weight * folding
        loss = (
            self.rse_weight * rse
            + self.direction_weight * direction
            + self.regularisation_weight * regulariser
        )
        return {
            "loss": loss,
            "rse": rse,
            "direction": direction,
            "smoothness": smoothness,
            "folding": folding,
        }


# ---------------------------------------------------------------------- segmentation
def soft_dice_loss(logits: torch.Tensor, label: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over samples and foreground classes.

    Args:
        logits: ``[B, C, *S]`` class scores.
        label: ``[B, 1, *S]`` int64 in ``0 .. C-1``.
    """
    num_classes = logits.shape[1]
    probabilities = logits.softmax(dim=1)[:, 1:]
    target = F.one_hot(label[:, 0], num_classes).movedim(-1, 1)[:, 1:].to(probabilities)
    axes = tuple(range(2, logits.ndim))
    intersection = (probabilities * target).sum(axes)
    total = probabilities.sum(axes) + target.sum(axes)
    return 1.0 - ((2 * intersection + eps) / (total + eps)).mean()


# ---------------------------------------------------------------------- registration
def local_ncc(
    warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5
) -> torch.Tensor:
    """Mean local normalised cross-correlation ``[B]`` in ``[-1, 1]`` over ``window^ndims`` boxes.

    Images ``[B, 1, *S]``. Squared NCC as in VoxelMorph would ignore anti-correlation; the plain
    local correlation is used so that the loss ``-ncc`` is maximised only by matching images.
    """
    if warped.shape != fixed.shape or warped.ndim not in (4, 5):
        raise ValueError(
            f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must both be "
            "[B, C, *S] with 2 or 3 spatial dims"
        )
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    pool = F.avg_pool2d if warped.ndim == 4 else F.avg_pool3d

    def box(x: torch.Tensor) -> torch.Tensor:
        return pool(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mean_w, mean_f = box(warped), box(fixed)
    var_w = (box(warped * warped) - mean_w**2).clamp(min=0)
    var_f = (box(fixed * fixed) - mean_f**2).clamp(min=0)
    covariance = box(warped * fixed) - mean_w * mean_f
    ncc = covariance / torch.sqrt(var_w * var_f + eps)
    return ncc.flatten(1).mean(1)


def gradient_smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's l2 gradient penalty ``[B]``: squared forward differences, mean over
    channels and voxels, averaged over the axes (voxels^2 per voxel^2)."""
    ndims = check_displacement(displacement)
    total = torch.zeros(displacement.shape[0], device=displacement.device)
    for axis in range(ndims):
        difference = torch.diff(displacement, dim=2 + axis)
        total = total + difference.pow(2).flatten(1).mean(1)
    return total / ndims
