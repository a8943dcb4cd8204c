"""A weighted mean as a torchmetrics object: sums reduced across DDP ranks, then divided."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """``sum(weight * value) / sum(weight)`` over every update on every rank (exact under DDP).

    ``update(value, weight=1.0)``: tensors of one shape (or a scalar weight); ``compute()`` is
    NaN before any weight was seen. Updates are out of place: the states may have been reset
    inside an earlier ``inference_mode`` (``trainer.validate`` before ``fit``), and inference
    tensors refuse in-place updates (which torchmetrics' own ``MeanMetric`` does).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value).detach().double()
        weight = torch.as_tensor(weight, device=value.device).detach().double().expand_as(value)
        self.total = self.total + (value * weight).sum()
        self.weight = self.weight + weight.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()
