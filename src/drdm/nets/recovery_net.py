"""Common frame of the recovery networks: ``(image, t) -> displacement in voxels``.

A recovery network's backbone predicts a raw field in **fractions of the image size** (the unit of
the authors' networks: a raw value of 0.1 is 10 % of the image side). :class:`RecoveryNet` turns it
into voxels, bounds it (``displacement_limit``: every sampling position inside the image, or, as
the authors' network does, every component within ``±(size - 1)`` voxels), and optionally
refines it recursively: pass ``k`` sees the input image warped by the field so far, and its output
is composed after it (``drdm.deform.compose(so_far, new)``). Subclasses only implement
:meth:`RecoveryNet.predict_raw`.

Shapes: image ``[B, C, *S]`` float, ``t`` LongTensor ``[B]`` (or a scalar, broadcast to the
batch), displacement ``[B, ndims, *S]`` float in voxels, channel ``i`` along tensor axis ``i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drdm.deform import compose, identity_grid, warp


def clamp_to_image(displacement: torch.Tensor) -> torch.Tensor:
    """Clamp ``[B, ndims, *S]`` voxel displacements so that ``x + u(x)`` lies in ``[0, n-1]``.

    Differentiable (zero gradient where clamped). Bilinear interpolation and composition of fields
    that satisfy this bound satisfy it too, so recursive refinement keeps it.
    """
    spatial = tuple(displacement.shape[2:])
    grid = identity_grid(spatial, device=displacement.device, dtype=displacement.dtype)
    last = torch.tensor(
        [n - 1 for n in spatial], device=displacement.device, dtype=displacement.dtype
    ).view(len(spatial), *([1] * len(spatial)))
    return torch.clamp(displacement, min=-grid, max=last - grid)


DISPLACEMENT_LIMITS = ("image", "component")


def clamp_components(displacement: torch.Tensor) -> torch.Tensor:
    """Clamp every component of ``[B, ndims, *S]`` voxel displacements to ``±(max(S) - 1)``.

    The bound of the authors' ``RecResACNet.boundary_limit`` (a raw value times the image side,
    clamped to ``1 - side .. side - 1``); sampling positions may leave the image (zero padding
    then reads black), which is what their trained weights were trained with.
    """
    limit = float(max(displacement.shape[2:]) - 1)
    return torch.clamp(displacement, min=-limit, max=limit)


def _symmetric_padding(spatial: tuple[int, ...], multiple: int) -> list[tuple[int, int]]:
    """Per-axis ``(before, after)`` zero padding making every size a multiple of ``multiple``."""
    padding = []
    for n in spatial:
        extra = (-n) % multiple
        padding.append((extra // 2, extra - extra // 2))
    return padding


class RecoveryNet(nn.Module):
    """Base class: validation, padding, unit conversion, clamp and recursive refinement.

    Args:
        ndims: 2 or 3 spatial dimensions.
        in_channels: image channels ``C``.
        timesteps: number of diffusion steps ``T``; ``t`` must lie in ``0 .. T-1``.
        recursions: refinement passes (the authors use 2); ``forward`` may override it.
        size_multiple: the backbone needs spatial sizes divisible by this (``2 ** levels``);
            other sizes are zero-padded symmetrically and the output is cropped back.
        displacement_limit: ``"image"``: every pass's field (and the result) is clamped so that
            ``x + u(x)`` stays inside the image (:func:`clamp_to_image`); ``"component"``: each
            pass's components are clamped to ``±(size - 1)`` voxels and the composed result is
            left as it is (:func:`clamp_components`, the authors' network: with their weights
            only this reproduces their outputs).
    """

    def __init__(
        self,
        ndims: int,
        in_channels: int,
        timesteps: int,
        recursions: int,
        size_multiple: int,
        displacement_limit: str = "image",
    ):
        super().__init__()
        if displacement_limit not in DISPLACEMENT_LIMITS:
            raise ValueError(
                f"displacement_limit must be one of {DISPLACEMENT_LIMITS}, "
                f"got {displacement_limit!r}"
            )
        self.displacement_limit = displacement_limit
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if recursions < 1:
            raise ValueError(f"recursions must be >= 1, got {recursions}")
        self.ndims = ndims
        self.in_channels = in_channels
        self.timesteps = timesteps
        self.recursions = recursions
        self.size_multiple = size_multiple

    def predict_raw(self, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Backbone: ``[B, C, *S]`` image (S divisible by ``size_multiple``) and ``[B]`` steps
        -> ``[B, ndims, *S]`` raw field in fractions of the image size."""
        raise NotImplementedError

    def raw_to_voxels(self, raw: torch.Tensor) -> torch.Tensor:
        """Fractions of the image size -> voxels: multiply every channel by the largest side.

        One isotropic factor (not one per axis) so that a raw field means the same physical
        shape along every axis; on the square / cubic images of the authors both readings agree.
        """
        return raw * max(raw.shape[2:])

    def forward(
        self, image: torch.Tensor, t: torch.Tensor | int, recursions: int | None = None
    ) -> torch.Tensor:
        """Recover the deformation of ``image`` at step ``t``.

        Args:
            image: ``[B, C, *S]`` float (intensities as in training, e.g. 0..1).
            t: LongTensor ``[B]`` (or a scalar / int, used for the whole batch), ``0 .. T-1``.
            recursions: refinement passes; defaults to ``self.recursions``.

        Returns:
            ``[B, ndims, *S]`` displacement in voxels such that ``warp(image, displacement)``
            undoes the deformation; with ``displacement_limit="image"``, ``x + displacement(x)``
            always lies inside the image.
        """
        self._check_image(image)
        steps = self._check_steps(t, image.shape[0], image.device)
        passes = self.recursions if recursions is None else int(recursions)
        if passes < 1:
            raise ValueError(f"recursions must be >= 1, got {recursions}")

        spatial = tuple(image.shape[2:])
        padding = _symmetric_padding(spatial, self.size_multiple)
        padded = image
        if any(before or after for before, after in padding):
            # F.pad lists the last axis first
            flat = [side for pair in reversed(padding) for side in pair]
            padded = F.pad(image, flat)

        limit = clamp_to_image if self.displacement_limit == "image" else clamp_components
        displacement = None
        current = padded
        for index in range(passes):
            step = limit(self.raw_to_voxels(self.predict_raw(current, steps)))
            displacement = step if displacement is None else compose(displacement, step)
            if index + 1 < passes:
                # always warp the input (never a warped image) so blur does not accumulate
                current = warp(padded, displacement)

        if padded is not image:
            crop = tuple(slice(before, before + n) for (before, _), n in zip(padding, spatial))
            displacement = displacement[(slice(None), slice(None), *crop)]
        if self.displacement_limit == "component":
            return displacement  # the authors' network returns the composed field unclamped
        # composition and cropping keep the bound up to rounding; make it exact
        return clamp_to_image(displacement)

    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            kind = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{type(self).__name__} expects a float image tensor, got {kind}")
        if image.ndim != self.ndims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}(ndims={self.ndims}, in_channels={self.in_channels}) "
                f"expects an image [B, {self.in_channels}, *{self.ndims} spatial], "
                f"got shape {tuple(image.shape)}"
            )

    def _check_steps(self, t: torch.Tensor | int, batch: int, device) -> torch.Tensor:
        steps = torch.as_tensor(t, device=device)
        if steps.is_floating_point() or steps.is_complex() or steps.dtype == torch.bool:
            raise ValueError(f"t must hold integer steps, got dtype {steps.dtype}")
        if steps.ndim == 0:
            steps = steps.expand(batch)
        if steps.shape != (batch,):
            raise ValueError(f"t must have shape [{batch}] (one step per image), got {steps.shape}")
        if steps.device.type != "cpu" or torch.compiler.is_compiling():
            # reading the values would force a host sync on every call of the training step;
            # steps on an accelerator come from the modules' own in-range draws
            return steps.long()
        low, high = int(steps.min()), int(steps.max())
        if low < 0 or high >= self.timesteps:
            raise ValueError(
                f"t must lie in 0 .. {self.timesteps - 1} (timesteps={self.timesteps}), "
                f"got values in {low} .. {high}"
            )
        return steps.long()
