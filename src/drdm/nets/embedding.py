"""Time-step embeddings shared by the recovery networks.

The step ``t`` enters a recovery network through a fixed sinusoidal table (one row per step,
frozen) followed by small learned MLPs that project it to the channel count of each level.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(timesteps: int, dim: int, base: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal step table, ``[timesteps, dim]`` float32.

    Column pairs ``(2k, 2k+1)`` hold ``sin(t * w_k)`` and ``cos(t * w_k)`` with
    ``w_k = base ** (-2k / dim)`` (the transformer positional encoding).
    """
    if timesteps < 1 or dim < 2 or dim % 2:
        raise ValueError(
            f"sinusoidal_table needs timesteps >= 1 and an even dim >= 2, got "
            f"timesteps={timesteps}, dim={dim}"
        )
    steps = torch.arange(timesteps, dtype=torch.float64).unsqueeze(1)
    frequencies = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.empty(timesteps, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(steps * frequencies)
    table[:, 1::2] = torch.cos(steps * frequencies)
    return table.float()


class FrozenStepEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised with :func:`sinusoidal_table` and excluded from training.

    The table is a (frozen) parameter rather than a buffer so that it is part of the
    ``state_dict`` under ``<name>.weight``, as in the authors' checkpoint.
    Input ``t`` LongTensor ``[B]`` in ``0 .. timesteps-1``; output ``[B, dim]``.
    """

    def __init__(self, timesteps: int, dim: int):
        super().__init__(timesteps, dim)
        with torch.no_grad():
            self.weight.copy_(sinusoidal_table(timesteps, dim))
        self.weight.requires_grad_(False)


def step_mlp(in_features: int, out_features: int, activation: type[nn.Module] = nn.ReLU):
    """Two-layer MLP ``Linear -> activation -> Linear`` mapping ``[B, in] -> [B, out]``.

    Submodules are indexed ``0`` and ``2`` (``<name>.0.weight``, ``<name>.2.weight``), the
    layout of the authors' checkpoint.
    """
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        activation(),
        nn.Linear(out_features, out_features),
    )
