"""VoxelMorph-style registration U-Net: (moving, fixed) -> displacement, 2D and 3D.

The two images are concatenated along channels, encoded by strided convolutions, decoded with
upsampling and skip connections, and a final convolution (initialised near zero, so training
starts from the identity) predicts ``ndims`` channels. With ``integration_steps > 0`` the output
is read as a stationary velocity and integrated by scaling and squaring
(:func:`drdm.deform.integrate`), which makes the predicted map diffeomorphic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from drdm.deform import exponentiate


def _conv(ndims: int):
    return nn.Conv2d if ndims == 2 else nn.Conv3d


class _ConvBlock(nn.Module):
    """conv (stride 1 or 2) -> LeakyReLU(0.2), as in VoxelMorph."""

    def __init__(self, ndims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = _conv(ndims)(in_channels, out_channels, 3, stride=stride, padding=1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(features))


class RegistrationUNet(nn.Module):
    """``net(moving, fixed) -> displacement``.

    Args:
        ndims: 2 or 3.
        in_channels: channels of *each* image (1 for grey-level).
        encoder_channels: channels per encoder level; each level halves the resolution.
        decoder_channels: channels per decoder level (same length as ``encoder_channels``).
        final_channels: channels of the full-resolution refinement convolutions.
        integration_steps: 0 predicts a displacement; ``k > 0`` predicts a velocity integrated
            with ``2^k`` scaling-and-squaring steps.

    Shapes: ``moving``, ``fixed`` ``[B, in_channels, *S]`` (any size; skips are resized) ->
    ``[B, ndims, *S]`` displacement in voxels (pull-back: ``warp(moving, out) ~ fixed``).
    """

    def __init__(
        self,
        ndims: int = 2,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 32),
        final_channels: Sequence[int] = (16, 16),
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if len(encoder_channels) != len(decoder_channels) or not encoder_channels:
            raise ValueError(
                f"encoder_channels {list(encoder_channels)} and decoder_channels "
                f"{list(decoder_channels)} must be non-empty and of equal length"
            )
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.ndims = ndims
        self.integration_steps = integration_steps
        self.encoder = nn.ModuleList()
        previous = 2 * in_channels
        skip_channels = [previous]
        for channels in encoder_channels:
            self.encoder.append(_ConvBlock(ndims, previous, channels, stride=2))
            previous = channels
            skip_channels.append(channels)
        self.decoder = nn.ModuleList()
        for level, channels in enumerate(decoder_channels):
            skip = skip_channels[-2 - level]
            self.decoder.append(_ConvBlock(ndims, previous + skip, channels))
            previous = channels
        self.refine = nn.ModuleList()
        for channels in final_channels:
            self.refine.append(_ConvBlock(ndims, previous, channels))
            previous = channels
        self.flow = _conv(ndims)(previous, ndims, 3, padding=1)
        # a near-zero head starts training at the identity map
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if moving.shape != fixed.shape or moving.ndim != self.ndims + 2:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be "
                f"[B, C, *S] with {self.ndims} spatial dims"
            )
        features = torch.cat([moving, fixed], dim=1)
        skips = [features]
        for block in self.encoder:
            features = block(features)
            skips.append(features)
        mode = "bilinear" if self.ndims == 2 else "trilinear"
        for level, block in enumerate(self.decoder):
            skip = skips[-2 - level]
            features = F.interpolate(features, size=skip.shape[2:], mode=mode, align_corners=False)
            features = block(torch.cat([features, skip], dim=1))
        for block in self.refine:
            features = block(features)
        field = self.flow(features)
        if self.integration_steps:
            field = exponentiate(field, self.integration_steps)
        return field
