"""Overlap metrics per sample and class: Dice, sensitivity (recall) and precision.

Accepted inputs (prediction and target may use different formats):

* label map: integer tensor ``[B, 1, *S]`` with values in ``0 .. num_classes-1``;
* one-hot / probabilities: bool or float tensor ``[B, C, *S]`` (float maps are turned into hard
  masks by argmax over the channel axis, so soft predictions can be passed directly).

``S`` has 2 or 3 axes. All functions return ``[B, C]`` float64 tensors (``C = num_classes``, or
``num_classes - 1`` when the background, class 0, is excluded). A value whose denominator is 0
(e.g. Dice when the class is absent from both masks) is ``NaN``: the structure is not there to be
measured, and averaging with ``torch.nanmean`` skips it instead of rewarding or punishing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_one_hot(masks: torch.Tensor, num_classes: int, name: str = "masks") -> torch.Tensor:
    """Hard one-hot bool masks ``[B, num_classes, *S]`` from a label map or one-hot/probabilities.

    Args:
        masks: integer label map ``[B, 1, *S]``, or bool/float ``[B, num_classes, *S]``.
        num_classes: number of classes including background.
        name: used in error messages.
    """
    if not isinstance(masks, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim not in (4, 5):
        raise ValueError(
            f"{name} must be [B, 1, *S] (label map) or [B, C, *S] (one-hot) with 2 or 3 spatial "
            f"axes, got shape {tuple(masks.shape)}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    is_label_map = not (masks.dtype == torch.bool or masks.is_floating_point())
    if is_label_map:
        if masks.shape[1] != 1:
            raise ValueError(
                f"integer {name} must be a label map [B, 1, *S], got shape {tuple(masks.shape)}"
            )
        labels = masks[:, 0].long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} has labels in [{int(labels.min())}, {int(labels.max())}], "
                f"expected 0 .. {num_classes - 1}"
            )
        one_hot = F.one_hot(labels, num_classes)  # [B, *S, C]
        return one_hot.movedim(-1, 1).bool()
    if masks.shape[1] != num_classes:
        raise ValueError(
            f"one-hot {name} must have {num_classes} channels, got shape {tuple(masks.shape)}"
        )
    if masks.dtype == torch.bool:
        return masks
    # probabilities or logits: a pixel belongs to its most likely class
    hard = masks.argmax(dim=1)
    return F.one_hot(hard, num_classes).movedim(-1, 1).bool()


def confusion_counts(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives per sample and class.

    Returns:
        ``(tp, fp, fn)``, each float64 ``[B, C']`` pixel/voxel counts, ``C' = num_classes`` or
        ``num_classes - 1`` without background.
    """
    pred = to_one_hot(prediction, num_classes, "prediction")
    true = to_one_hot(target, num_classes, "target")
    if pred.shape[0] != true.shape[0] or pred.shape[2:] != true.shape[2:]:
        raise ValueError(
            f"prediction and target shapes differ: {tuple(prediction.shape)} "
            f"vs {tuple(target.shape)}"
        )
    if not include_background:
        pred, true = pred[:, 1:], true[:, 1:]
    spatial_axes = tuple(range(2, pred.ndim))
    tp = (pred & true).sum(spatial_axes).double()
    fp = (pred & ~true).sum(spatial_axes).double()
    fn = (~pred & true).sum(spatial_axes).double()
    return tp, fp, fn


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, NaN where the denominator is 0 (undefined, not 0 or 1)."""
    nan = torch.full_like(numerator, float("nan"))
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), nan)


def dice_score(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
) -> torch.Tensor:
    """Dice ``2 TP / (2 TP + FP + FN)`` per sample and class, ``[B, C']``.

    1 for a perfect prediction, 0 for disjoint non-empty masks, NaN when the class is absent from
    both prediction and target.
    """
    tp, fp, fn = confusion_counts(prediction, target, num_classes, include_background)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def sensitivity(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
) -> torch.Tensor:
    """Sensitivity (recall) ``TP / (TP + FN)`` per sample and class; NaN if the target is empty."""
    tp, _, fn = confusion_counts(prediction, target, num_classes, include_background)
    return _ratio(tp, tp + fn)


def precision(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
) -> torch.Tensor:
    """Precision ``TP / (TP + FP)`` per sample and class; NaN if the prediction is empty."""
    tp, fp, _ = confusion_counts(prediction, target, num_classes, include_background)
    return _ratio(tp, tp + fp)
