"""A plain ("vanilla") 2D/3D U-Net for segmentation: image -> class logits.

Encoder levels of two 3x3(x3) convolutions (instance norm + LeakyReLU), max-pooling between
levels, transposed-convolution upsampling with skip concatenation, a 1x1 output convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv(ndims: int):
    return nn.Conv2d if ndims == 2 else nn.Conv3d


def _double_conv(ndims: int, in_channels: int, out_channels: int) -> nn.Sequential:
    conv = _conv(ndims)
    norm = nn.InstanceNorm2d if ndims == 2 else nn.InstanceNorm3d
    return nn.Sequential(
        conv(in_channels, out_channels, 3, padding=1),
        norm(out_channels, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
        conv(out_channels, out_channels, 3, padding=1),
        norm(out_channels, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
    )


class SegmentationUNet(nn.Module):
    """U-Net ``net(image [B, in_channels, *S]) -> logits [B, num_classes, *S]``.

    Args:
        ndims: 2 or 3 spatial dimensions.
        in_channels: image channels.
        num_classes: output classes including background.
        channels: feature channels per level, e.g. ``[16, 32, 64, 128]``; every spatial size must
            be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        ndims: int = 2,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(channels) < 1 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        self.ndims = ndims
        self.in_channels = in_channels
        self.num_classes = num_classes
        channels = [int(c) for c in channels]
        self.channels = channels
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.encoders.append(_double_conv(ndims, previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2) if ndims == 2 else nn.MaxPool3d(2)
        transposed = nn.ConvTranspose2d if ndims == 2 else nn.ConvTranspose3d
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(channels[::-1][:-1], channels[::-1][1:]):
            self.upsamplers.append(transposed(deep, shallow, 2, stride=2))
            self.decoders.append(_double_conv(ndims, 2 * shallow, shallow))
        self.head = _conv(ndims)(channels[0], num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != self.ndims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must be [B, {self.in_channels}, *S] with {self.ndims} spatial axes, "
                f"got shape {tuple(image.shape)}"
            )
        factor = 2 ** (len(self.channels) - 1)
        if any(n % factor for n in image.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(image.shape[2:])} must be divisible by {factor} "
                f"for a U-Net with {len(self.channels)} levels"
            )
        skips = []
        features = image
        for level, encoder in enumerate(self.encoders):
            if level:
                features = self.pool(features)
            features = encoder(features)
            skips.append(features)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, skips[::-1][1:]):
            features = decoder(torch.cat([upsample(features), skip], dim=1))
        return self.head(features)
