"""Evaluation pairs with a known ground-truth field, from a family the training never sees.

Their fields come from :class:`drdm.field_sources.bank.SmoothNoiseFieldSource` in the default
experiment: Gaussian-smoothed white-noise velocities integrated by scaling and squaring (a
SynthMorph-like family: neither B-spline nor DRDM), so neither synthetic training mode is
evaluated on its own field family.

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

from drdm.deform import warp


def pair_seed(moving_id: str, fixed_id: str, seed: int = 0) -> int:
    """A stable (process-independent) seed for one pair."""
    return (zlib.crc32(f"{moving_id}->{fixed_id}".encode()) + 1_000_003 * seed) % (2**63)


class KnownFieldTransform:
    """Pair hook: ``fixed := warp(moving, field)``, ``pair["displacement"] = field``.

    Args:
        source: a field source (:mod:`drdm.field_sources.bank`), called as
            ``source(image [1, 1, *S], generator=...) -> [1, ndims, *S]``.
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
            field = self.source(image, generator=generator)
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
