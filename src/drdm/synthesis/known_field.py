"""Evaluation pairs with a known ground-truth field, from a family the training never sees.

:class:`SmoothNoiseFieldSource` draws Gaussian-smoothed white-noise velocities integrated by
scaling and squaring (a SynthMorph-like family: neither B-spline nor DRDM), so neither synthetic
training mode is evaluated on its own field family.

:class:`KnownFieldTransform` is a pair hook for ``drdm.data`` (``PairDataset(transform=...)``):
it replaces a pair's fixed sample by the moving sample warped with a field seeded by the pair's
ids (the same pair always gets the same field) and adds that field as ``"displacement"``.

Pure torch: no Lightning or Hydra.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from drdm.deform import integrate, warp


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (``sigma`` voxels, border replicate) of ``[B, C, *S]``."""
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndims = field.ndim - 2
    channels = field.shape[1]
    conv = F.conv2d if ndims == 2 else F.conv3d
    for axis in range(ndims):
        shape = [1] * ndims
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *[1] * ndims)
        padding = [0, 0] * ndims
        padding[2 * (ndims - 1 - axis)] = padding[2 * (ndims - 1 - axis) + 1] = radius
        field = conv(F.pad(field, padding, mode="replicate"), weight, groups=channels)
    return field


class SmoothNoiseFieldSource:
    """Smoothed-noise stationary velocity fields, integrated (diffeomorphic).

    Args:
        ndims: 2 or 3.
        sigma: Gaussian smoothing of the noise in voxels (larger: smoother, more global).
        amplitude: standard deviation of the velocity after smoothing, in voxels.
        integration_steps: ``2^k`` scaling-and-squaring compositions.
    """

    def __init__(
        self, ndims: int = 2, sigma: float = 6.0, amplitude: float = 2.0, integration_steps: int = 5
    ) -> None:
        if ndims not in (2, 3) or sigma <= 0 or amplitude < 0 or integration_steps < 0:
            raise ValueError(
                "SmoothNoiseFieldSource needs ndims in (2, 3), sigma > 0, amplitude >= 0, "
                f"integration_steps >= 0; got {ndims}, {sigma}, {amplitude}, {integration_steps}"
            )
        self.ndims, self.sigma, self.amplitude = ndims, sigma, amplitude
        self.integration_steps = integration_steps

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, ndims, *S]`` voxels for ``image`` ``[B, 1, *S]`` (on the image's device)."""
        if image.ndim != self.ndims + 2:
            raise ValueError(f"image {tuple(image.shape)} does not match ndims={self.ndims}")
        shape = (image.shape[0], self.ndims, *image.shape[2:])
        device = generator.device if generator is not None else image.device
        noise = torch.randn(shape, generator=generator, device=device)
        velocity = gaussian_smooth(noise, self.sigma)
        velocity = velocity * (self.amplitude / velocity.std().clamp(min=1e-8))
        count = 2**self.integration_steps
        steps = torch.full((shape[0],), count, dtype=torch.long, device=device)
        return integrate(velocity / count, steps, max_steps=count).to(image.device)


def pair_seed(moving_id: str, fixed_id: str, seed: int = 0) -> int:
    """A stable (process-independent) seed for one pair."""
    return (zlib.crc32(f"{moving_id}->{fixed_id}".encode()) + 1_000_003 * seed) % (2**63)


class KnownFieldTransform:
    """Pair hook: ``fixed := warp(moving, field)``, ``pair["displacement"] = field``.

    Args:
        source: field source ``source(image [1, 1, *S], generator) -> [1, ndims, *S]``.
        seed: base seed; each pair's field is seeded by ``seed`` and the pair's ids.

    The new fixed sample keeps the moving sample's geometry (spacing, affine); its label is the
    moving label warped with nearest neighbour; keypoints are dropped (the dense field is the
    ground truth).
    """

    def __init__(self, source: Callable[..., torch.Tensor], seed: int = 0) -> None:
        self.source = source
        self.seed = int(seed)

    def __call__(self, pair: dict[str, Any]) -> dict[str, Any]:
        moving, fixed = pair["moving"], pair["fixed"]
        generator = torch.Generator().manual_seed(pair_seed(moving["id"], fixed["id"], self.seed))
        image = moving["image"][None]
        with torch.no_grad():
            field = self.source(image, generator)
            warped = warp(image, field)[0]
        synthetic = {key: value for key, value in moving.items() if key != "keypoints"}
        synthetic["image"] = warped
        synthetic["id"] = f"{moving['id']}_warped_like_{fixed['id']}"
        if "label" in moving:
            synthetic["label"] = warp(moving["label"][None], field, mode="nearest")[0]
        result = {key: value for key, value in pair.items() if key not in ("moving", "fixed")}
        result["moving"] = {key: value for key, value in moving.items() if key != "keypoints"}
        result["fixed"] = synthetic
        result["displacement"] = field[0]
        return result
