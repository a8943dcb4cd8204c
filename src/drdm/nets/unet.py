"""A wider time-conditioned U-Net recovery network (GroupNorm, SiLU, FiLM), 2D and 3D.

Same interface and output unit as :class:`drdm.nets.RecResACNet` (it derives from
:class:`drdm.nets.recovery_net.RecoveryNet`), different backbone::

    stem conv                                        [B, c0, S]
    level i: blocks x ResBlock(t) -> skip_i, down    [B, c_i, S / 2^i]
    middle: 2 x ResBlock(t)                          [B, c_last, S / 2^(L-1)]
    level i (reversed): up, cat(skip_i), ResBlock(t) [B, c_i, S / 2^i]
    head: GroupNorm -> SiLU -> conv                  [B, ndims, S] raw field (fractions of size)

Each residual block is ``GN -> SiLU -> conv -> GN * (1 + scale(t)) + shift(t) -> SiLU -> conv``
plus a (1x1 projected) skip; ``scale`` and ``shift`` come from the step embedding. The head starts
near zero so an untrained network predicts almost the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from drdm.nets.embedding import FrozenStepEmbedding, step_mlp
from drdm.nets.recovery_net import RecoveryNet


def _conv(ndims: int):
    return nn.Conv2d if ndims == 2 else nn.Conv3d


class TimeResBlock(nn.Module):
    """Residual block conditioned on a step embedding: ``[B, in, *S], [B, E] -> [B, out, *S]``."""

    def __init__(
        self, ndims: int, in_channels: int, out_channels: int, embed_dim: int, groups: int
    ):
        super().__init__()
        conv = _conv(ndims)
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)
        )
        self.activation = nn.SiLU()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(self.norm1(x)))
        scale, shift = self.film(self.activation(embedding)).chunk(2, dim=1)
        broadcast = (embedding.shape[0], -1, *([1] * (x.ndim - 2)))
        out = self.norm2(out) * (1 + scale.view(broadcast)) + shift.view(broadcast)
        out = self.conv2(self.activation(out))
        return out + self.skip(x)


class UNet(RecoveryNet):
    """Wider U-Net recovery network with GroupNorm + SiLU and FiLM step conditioning.

    Args:
        ndims: 2 or 3.
        in_channels: image channels ``C``.
        timesteps: diffusion steps ``T``.
        channels: features per level (``len(channels)`` levels, ``len - 1`` downsamplings).
        blocks_per_level: residual blocks per encoder level (decoder levels use the same count).
        time_dim: width of the sinusoidal step table.
        groups: GroupNorm groups (must divide every entry of ``channels``).
        recursions: refinement passes, composed as in :class:`RecResACNet`.

    Call: ``net(image [B,C,*S], t [B]) -> displacement [B, ndims, *S]`` in voxels.
    """

    def __init__(
        self,
        ndims: int = 2,
        in_channels: int = 1,
        timesteps: int = 80,
        channels: Sequence[int] = (32, 64, 128),
        blocks_per_level: int = 2,
        time_dim: int = 128,
        groups: int = 8,
        recursions: int = 2,
    ):
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if any(c % groups for c in channels):
            raise ValueError(f"groups={groups} must divide every entry of channels={channels}")
        if blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
        super().__init__(
            ndims, in_channels, timesteps, recursions, size_multiple=2 ** (len(channels) - 1)
        )
        conv = _conv(ndims)
        embed_dim = 4 * channels[0]
        self.time_embed = FrozenStepEmbedding(timesteps, time_dim)
        self.time_mlp = step_mlp(time_dim, embed_dim, activation=nn.SiLU)
        self.stem = conv(in_channels, channels[0], 3, padding=1)

        def block(a: int, b: int) -> TimeResBlock:
            return TimeResBlock(ndims, a, b, embed_dim, groups)

        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        width = channels[0]
        for index, out in enumerate(channels):
            self.encoder.append(
                nn.ModuleList(block(width if i == 0 else out, out) for i in range(blocks_per_level))
            )
            width = out
            if index + 1 < len(channels):
                self.downsample.append(conv(out, out, 3, stride=2, padding=1))
        self.middle = nn.ModuleList([block(width, width), block(width, width)])

        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for out in reversed(channels[:-1]):
            self.upsample.append(conv(width, out, 3, padding=1))
            self.decoder.append(
                nn.ModuleList(
                    block(2 * out if i == 0 else out, out) for i in range(blocks_per_level)
                )
            )
            width = out
        self.head = nn.Sequential(
            nn.GroupNorm(groups, width), nn.SiLU(), conv(width, ndims, 3, padding=1)
        )
        # near-identity start; small but non-zero so every layer receives gradient at once
        nn.init.normal_(self.head[-1].weight, std=1e-5)
        nn.init.zeros_(self.head[-1].bias)

    def predict_raw(self, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` (S divisible by ``size_multiple``), ``[B]`` -> ``[B, ndims, *S]`` raw."""
        embedding = self.time_mlp(self.time_embed(t))
        out = self.stem(image)
        skips = []
        for index, blocks in enumerate(self.encoder):
            for layer in blocks:
                out = layer(out, embedding)
            if index < len(self.downsample):
                skips.append(out)
                out = self.downsample[index](out)
        for layer in self.middle:
            out = layer(out, embedding)
        for up, blocks in zip(self.upsample, self.decoder):
            skip = skips.pop()
            out = up(F.interpolate(out, size=skip.shape[2:], mode="nearest"))
            out = torch.cat((skip, out), dim=1)
            for layer in blocks:
                out = layer(out, embedding)
        return self.head(out)
