"""The recovery chain of generation (method §5), pure torch (no Lightning, Hydra or files).

Starting from a diffused field ``u`` (the original image deformed to step ``t0``), the network is
asked at steps ``i = start, start-1, ..., 0`` for the recovery displacement ``p_i`` of the current
image; ``u <- compose(u, p_i)`` (``p_i + u o (id + p_i)``) and the current image is re-made by
warping the **original** with ``u`` (never the previous warped image: blur would accumulate).

The reference runs the chain from ``T - 1`` whatever ``t0`` is (``DRDM_augment.py`` /
``diff_recover``); the authors' checkpoint was tuned for that, so it is our default. Starting
at ``t0 - 1`` instead (``start_step="t0"``) recovers less and stays closer to the diffused image.
"""

from __future__ import annotations

import torch

from drdm.deform.spatial import compose, warp


def minmax_normalise(image: torch.Tensor) -> torch.Tensor:
    """Scale each sample of ``[B, C, *S]`` to ``0..1`` (the range the networks are trained on)."""
    flat = image.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (image.ndim - 1)))
    high = flat.max(1).values.view(-1, *([1] * (image.ndim - 1)))
    return (image - low) / (high - low).clamp_min(1e-8)


def start_steps(t0: torch.Tensor, timesteps: int, start_step: str | int = "T") -> torch.Tensor:
    """First network step per sample, ``[B]`` long: ``T-1`` ("T"), ``t0-1`` ("t0") or an int."""
    if start_step == "T":
        return torch.full_like(t0, timesteps - 1)
    if start_step == "t0":
        return (t0 - 1).clamp(min=0)
    if isinstance(start_step, int) and 0 <= start_step < timesteps:
        return torch.full_like(t0, start_step)
    raise ValueError(
        f"start_step must be 'T', 't0' or an int in [0, {timesteps}), got {start_step!r}"
    )


@torch.no_grad()
def recover(
    net: torch.nn.Module,
    image: torch.Tensor,
    diffused: torch.Tensor,
    first_step: torch.Tensor,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Run the recovery chain and return the final field ``[B, ndims, *S]`` (voxels).

    Args:
        net: ``net(image [B, 1, *S], t [B]) -> [B, ndims, *S]``.
        image: the original image ``[B, 1, *S]`` as the network expects it (0..1).
        diffused: the starting field ``u`` at ``t0`` ``[B, ndims, *S]`` voxels.
        first_step: ``[B]`` long, the first step asked of the network for each sample; samples
            whose first step is lower simply wait (keep ``u``) until the chain reaches it.
        mode: interpolation used to re-warp the original image for the next network input.
    """
    if image.shape[0] != diffused.shape[0] or image.shape[2:] != diffused.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and diffused field {tuple(diffused.shape)} must share "
            "batch size and spatial shape"
        )
    displacement = diffused
    current = warp(image, displacement, mode=mode)
    ndims = diffused.shape[1]
    for step in range(int(first_step.max()), -1, -1):
        active = (first_step >= step).view(-1, *([1] * (ndims + 1)))
        t = torch.full_like(first_step, step)
        prediction = net(current, t).to(displacement.dtype)
        displacement = torch.where(active, compose(displacement, prediction), displacement)
        current = warp(image, displacement, mode=mode)
    return displacement
