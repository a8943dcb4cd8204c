"""A torchmetrics ``Metric`` that accumulates per-sample, per-class segmentation scores.

Scores are computed per sample with :mod:`drdm.metrics.overlap` and
:mod:`drdm.metrics.surface`, stored with ``dist_reduce_fx="cat"`` (so distributed evaluation
gathers every sample), and averaged with ``nanmean`` at ``compute()``: a class absent from both
prediction and target of a sample does not count for that sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from drdm.metrics.overlap import confusion_counts
from drdm.metrics.surface import hausdorff_distance_95

METRIC_NAMES = ("dice", "sensitivity", "precision", "hd95")


class SegmentationScores(Metric):
    """Dice, sensitivity, precision and HD95 (mm) per foreground class and their mean.

    Args:
        class_names: names of all classes, background (class 0) first.
        hd95: also compute HD95 (CPU distance transforms; switch off to save time).

    ``compute()`` returns a flat dict ``{"dice/<class>": value, "dice/mean": value, ...}`` with
    the background excluded; ``mean`` averages the per-class values.
    """

    full_state_update = False

    def __init__(self, class_names: Sequence[str], hd95: bool = True) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(
                f"class_names must list background and at least one class, got {list(class_names)}"
            )
        self.class_names = list(class_names)
        self.with_hd95 = hd95
        for name in METRIC_NAMES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def update(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        spacing: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        """Add a batch: prediction/target as label maps ``[B, 1, *S]`` or one-hot ``[B, C, *S]``."""
        tp, fp, fn = confusion_counts(prediction, target, self.num_classes)
        nan = torch.full_like(tp, float("nan"))
        self.dice.append(torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), nan))
        self.sensitivity.append(torch.where(tp + fn > 0, tp / (tp + fn), nan))
        self.precision.append(torch.where(tp + fp > 0, tp / (tp + fp), nan))
        if self.with_hd95:
            distances = hausdorff_distance_95(prediction, target, self.num_classes, spacing)
            self.hd95.append(distances.to(tp.device))
        else:
            self.hd95.append(nan)

    def per_sample(self) -> dict[str, torch.Tensor]:
        """Accumulated ``[N, C-1]`` float64 values per metric name."""
        out = {}
        for name in METRIC_NAMES:
            values = getattr(self, name)
            if isinstance(values, list):
                values = torch.cat(values) if values else torch.empty(0, self.num_classes - 1)
            out[name] = values.double()
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        results = {}
        for name, values in self.per_sample().items():
            if name == "hd95" and not self.with_hd95:
                continue
            per_class = torch.nanmean(values, dim=0)
            for class_name, value in zip(self.class_names[1:], per_class):
                results[f"{name}/{class_name}"] = value
            results[f"{name}/mean"] = torch.nanmean(per_class)
        return results
