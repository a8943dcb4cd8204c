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

from drdm.deform import folding_ratio
from drdm.deform.spatial import warp


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


def fixed_validation_fields(
    images: torch.Tensor, deformation, fields_per_image: int = 4, seed: int = 2024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed recovery benchmark: every image deformed by ``fields_per_image`` fields.

    Args:
        images: ``[N, 1, *S]`` float.
        deformation: a ``RandomDeformation`` (``deformation(S, t, generator)``).
        fields_per_image: fields per image; their steps ``t`` are spread evenly over
            ``0 .. T-1`` across all ``N * fields_per_image`` samples.
        seed: seed of the fields (same seed, same fields).

    Returns:
        ``(deformed [M, 1, *S], t [M], target [M, ndims, *S])`` with
        ``M = N * fields_per_image``: the input of the network and its recovery target.
    """
    images = images.float().repeat_interleave(fields_per_image, dim=0)
    t = torch.linspace(0, deformation.timesteps - 1, images.shape[0]).round().long()
    generator = torch.Generator().manual_seed(seed)
    diffused, target = deformation(tuple(images.shape[2:]), t, generator=generator)
    return warp(images, diffused), t, target


@torch.no_grad()
def evaluate_recovery(net, deformed, t, target, batch_size: int = 16) -> dict[str, float]:
    """``{"recovery_error", "folding_ratio"}`` of ``net`` on fixed fields (eval mode inside)."""
    was_training = net.training
    net.eval()
    metric, folded, voxels = RecoveryError().to(deformed.device), 0.0, 0
    for start in range(0, deformed.shape[0], batch_size):
        part = slice(start, start + batch_size)
        prediction = net(deformed[part], t[part])
        metric.update(warp(prediction, target[part], padding="border"), target[part])
        folded += float(folding_ratio(prediction).sum())
        voxels += prediction.shape[0]
    net.train(was_training)
    return {"recovery_error": float(metric.compute()), "folding_ratio": folded / voxels}
