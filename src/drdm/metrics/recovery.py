"""Recovery error of a DRDM: how much of the recovery target a prediction leaves undone.

With ``d`` the recovery target and ``q = p o (id + d)`` the prediction resampled at the
target's end points (both ``[B, ndims, *S]`` voxels; ``q = -d`` is perfect recovery)::

    recovery_error = sqrt( sum |q + d|^2 / sum |d|^2 )

summed over every voxel of every sample seen: 0 is perfect, 1 is "predicts nothing". Summing
over the whole set (not averaging per-sample ratios) weighs each sample by its target's energy:
small-``t`` targets are sub-voxel (an image hardly shows their direction, so every model's
per-sample error there is ~1) and would otherwise dominate the mean; a ``t = 0`` sample has
``d = 0`` and contributes only what it wrongly predicts.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def recovery_sums(recovered: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample ``(sum_x |q + d|^2, sum_x |d|^2)``, each ``[B]``."""
    if recovered.shape != target.shape or recovered.ndim < 3:
        raise ValueError(
            f"recovered {tuple(recovered.shape)} and target {tuple(target.shape)} must be equal "
            "[B, ndims, *S] fields"
        )
    dims = tuple(range(1, target.ndim))
    return (recovered + target).square().sum(dims), target.square().sum(dims)


class RecoveryError(Metric):
    """Accumulates ``sum |q + d|^2`` and ``sum |d|^2`` (summed across DDP ranks exactly).

    ``update(recovered, target)`` with ``[B, ndims, *S]`` fields in voxels; ``compute()``
    returns the scalar ``sqrt(residual / energy)`` (NaN before any target energy was seen).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("residual", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("energy", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recovered: torch.Tensor, target: torch.Tensor) -> None:
        residual, energy = recovery_sums(recovered.detach(), target.detach())
        # not in place: the states may have been reset inside an earlier inference_mode
        # (trainer.validate before fit), and inference tensors refuse in-place updates
        self.residual = self.residual + residual.double().sum()
        self.energy = self.energy + energy.double().sum()

    def compute(self) -> torch.Tensor:
        return (self.residual / self.energy).sqrt().float()
