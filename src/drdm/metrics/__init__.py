"""Segmentation and surface metrics shared by segmentation and registration (pure torch/numpy).

Inputs are label maps ``[B, 1, *S]`` (integer) or one-hot / probability maps ``[B, C, *S]``
(bool or float), 2D or 3D. Every metric returns per-sample, per-class values ``[B, C]`` and
``NaN`` where a value is undefined (both masks empty); aggregate with ``torch.nanmean``.
Surface distances are in millimetres when a spacing is given.
"""

from drdm.metrics.overlap import (
    confusion_counts,
    dice_score,
    precision,
    sensitivity,
    to_one_hot,
)
from drdm.metrics.surface import average_surface_distance, hausdorff_distance_95

__all__ = [
    "average_surface_distance",
    "confusion_counts",
    "dice_score",
    "hausdorff_distance_95",
    "precision",
    "sensitivity",
    "to_one_hot",
]
