"""RecResACNet: the authors' recursive atrous-residual U-Net (method doc, section 3), 2D and 3D.

Layout (``c1, c2, c3 = channels``, default 10/20/40; ``S`` the input size, divisible by 8)::

    image [B,C,S] + te1(t) -> b1 (C->c1->c1->c1)             [B,c1,S]    = skip1
    down1 (4^n conv, stride 2) + te2(t) -> b2 (c1->c2->c2->c2) [B,c2,S/2]  = skip2
    down2 + te3(t) -> b3 (c2->c3->c3->c3)                      [B,c3,S/4]  = skip3
    down3 * te_mid(t) -> b_mid (c3->c2->c2->c3)                [B,c3,S/8]  (multiplicative)
    cat(skip3, up1) + te4(t) -> b4 (2c3->c3->c2->c2)           [B,c2,S/4]
    cat(skip2, up2) + te5(t) -> b5 (2c2->c2->c1->c1)           [B,c1,S/2]
    cat(skip1, up3) + te_out(t) -> b_out (2c1->c1->c1->c1)     [B,c1,S]
    conv_out (3^n)                                              [B,ndims,S] raw field

Encoder and bottleneck blocks use InstanceNorm, decoder blocks do not. Parameter names match the
authors' 2D cardiac checkpoint exactly (see
:func:`drdm.checkpoints.load_reference_checkpoint`); its raw
output is in fractions of the image size, converted to voxels by :class:`RecoveryNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from drdm.nets.embedding import FrozenStepEmbedding, step_mlp
from drdm.nets.recovery_net import RecoveryNet


class AtrousResidualBlock(nn.Module):
    """``conv0 -> [InstanceNorm] -> (act -> dilated conv) per rate -> act(out + skip)``.

    Input ``[B, in_channels, *S]``, output ``[B, out_channels, *S]`` (same size: every conv is
    3^n, padded by its dilation). The skip is taken after ``conv0`` (and the norm), so the block
    can change the channel count.
    """

    def __init__(
        self,
        ndims: int,
        in_channels: int,
        out_channels: int,
        normalize: bool = True,
        atrous_rates: Sequence[int] = (1, 3),
        negative_slope: float = 1e-6,
    ):
        super().__init__()
        conv = nn.Conv2d if ndims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if ndims == 2 else nn.InstanceNorm3d
        # declared before conv0 so the state_dict lists keys in the checkpoint's order
        self.ln = norm(out_channels, affine=True) if normalize else nn.Identity()
        self.conv0 = conv(in_channels, out_channels, 3, padding=1)
        self.convs = nn.ModuleList(
            conv(out_channels, out_channels, 3, padding=rate, dilation=rate)
            for rate in atrous_rates
        )
        self.activation = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.ln(self.conv0(x))
        out = skip
        for conv in self.convs:
            out = conv(self.activation(out))
        return self.activation(out + skip)


class RecResACNet(RecoveryNet):
    """Time-embedded atrous residual U-Net, applied recursively (authors' "RecResACNet").

    Args:
        ndims: 2 or 3.
        in_channels: image channels ``C``.
        timesteps: diffusion steps ``T`` (rows of the frozen step table; 80 in the checkpoint).
        time_dim: width of the sinusoidal step embedding (100 in the checkpoint).
        channels: ``(c1, c2, c3)`` features of the three levels.
        recursions: refinement passes (2 as in the authors' code).
        atrous_rates: dilations of the convolutions inside each block.
        negative_slope: LeakyReLU slope (the authors' 1e-6 is a ReLU in practice).
        displacement_limit: ``"image"`` or ``"component"`` (the authors' bound; see
            :class:`~drdm.nets.recovery_net.RecoveryNet`).

    Call: ``net(image [B,C,*S], t [B]) -> displacement [B, ndims, *S]`` in voxels.
    About 0.44 M parameters in 2D with the defaults (8000 of them the frozen step table).
    """

    def __init__(
        self,
        ndims: int = 2,
        in_channels: int = 1,
        timesteps: int = 80,
        time_dim: int = 100,
        channels: Sequence[int] = (10, 20, 40),
        recursions: int = 2,
        atrous_rates: Sequence[int] = (1, 3),
        negative_slope: float = 1e-6,
        displacement_limit: str = "image",
    ):
        super().__init__(
            ndims, in_channels, timesteps, recursions, 8, displacement_limit=displacement_limit
        )
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive ints (c1, c2, c3), got {channels}")
        c1, c2, c3 = (int(c) for c in channels)
        conv = nn.Conv2d if ndims == 2 else nn.Conv3d
        conv_transpose = nn.ConvTranspose2d if ndims == 2 else nn.ConvTranspose3d

        def level(widths: Sequence[int], normalize: bool) -> nn.Sequential:
            return nn.Sequential(
                *(
                    AtrousResidualBlock(ndims, a, b, normalize, atrous_rates, negative_slope)
                    for a, b in zip(widths[:-1], widths[1:])
                )
            )

        self.time_embed = FrozenStepEmbedding(timesteps, time_dim)
        # encoder
        self.te1 = step_mlp(time_dim, in_channels)
        self.b1 = level([in_channels, c1, c1, c1], normalize=True)
        self.down1 = conv(c1, c1, 4, stride=2, padding=1)
        self.te2 = step_mlp(time_dim, c1)
        self.b2 = level([c1, c2, c2, c2], normalize=True)
        self.down2 = conv(c2, c2, 4, stride=2, padding=1)
        self.te3 = step_mlp(time_dim, c2)
        self.b3 = level([c2, c3, c3, c3], normalize=True)
        self.down3 = conv(c3, c3, 4, stride=2, padding=1)
        # bottleneck
        self.te_mid = step_mlp(time_dim, c3)
        self.b_mid = level([c3, c2, c2, c3], normalize=True)
        # decoder
        self.up1 = conv_transpose(c3, c3, 4, stride=2, padding=1)
        self.te4 = step_mlp(time_dim, 2 * c3)
        self.b4 = level([2 * c3, c3, c2, c2], normalize=False)
        self.up2 = conv_transpose(c2, c2, 4, stride=2, padding=1)
        self.te5 = step_mlp(time_dim, 2 * c2)
        self.b5 = level([2 * c2, c2, c1, c1], normalize=False)
        self.up3 = conv_transpose(c1, c1, 4, stride=2, padding=1)
        self.te_out = step_mlp(time_dim, 2 * c1)
        self.b_out = level([2 * c1, c1, c1, c1], normalize=False)
        self.conv_out = conv(c1, ndims, 3, padding=1)
        # start near the identity (as VoxelMorph's flow layer): raw outputs are multiplied by the
        # image size and composed over up to T recovery steps, so a default-initialised head
        # makes an untrained model collapse the image instead of leaving it unchanged
        nn.init.normal_(self.conv_out.weight, std=1e-5)
        nn.init.zeros_(self.conv_out.bias)

    def _channel_bias(self, mlp: nn.Module, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, time_dim] -> [B, channels, 1, ..., 1]`` for broadcasting over space."""
        return mlp(embedding).view(embedding.shape[0], -1, *([1] * self.ndims))

    def predict_raw(self, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` (S divisible by 8), ``[B]`` steps -> ``[B, ndims, *S]`` raw field."""
        embedding = self.time_embed(t)
        skip1 = self.b1(image + self._channel_bias(self.te1, embedding))
        skip2 = self.b2(self.down1(skip1) + self._channel_bias(self.te2, embedding))
        skip3 = self.b3(self.down2(skip2) + self._channel_bias(self.te3, embedding))
        # the bottleneck is gated (multiplied) by the step, not shifted
        middle = self.b_mid(self.down3(skip3) * self._channel_bias(self.te_mid, embedding))
        out = torch.cat((skip3, self.up1(middle)), dim=1)
        out = self.b4(out + self._channel_bias(self.te4, embedding))
        out = torch.cat((skip2, self.up2(out)), dim=1)
        out = self.b5(out + self._channel_bias(self.te5, embedding))
        out = torch.cat((skip1, self.up3(out)), dim=1)
        out = self.b_out(out + self._channel_bias(self.te_out, embedding))
        return self.conv_out(out)
