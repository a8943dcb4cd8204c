"""Synthetic registration pairs with known fields (pure torch, no Lightning or Hydra).

* :class:`MultiResolutionBSpline` — random multi-resolution B-spline fields (the MRBS baseline).
* :class:`BSplineFieldSource`, :class:`DRDMFieldSource` — field sources for on-the-fly pairs.
* :class:`SmoothNoiseFieldSource`, :class:`KnownFieldTransform` — held-out evaluation pairs with
  a known field from a third family (``drdm.synthesis.datamodule.KnownFieldDataModule`` wires
  them into the data module; it imports Lightning, so it is not imported here).
* :func:`make_pair` / :class:`SyntheticPair` — ``fixed = warp(moving, field)``; the field is the
  registration target under drdm's pull-back convention.
"""

from drdm.synthesis.bspline import MultiResolutionBSpline, evaluate_bspline
from drdm.synthesis.known_field import KnownFieldTransform, SmoothNoiseFieldSource
from drdm.synthesis.pairs import (
    BSplineFieldSource,
    DRDMFieldSource,
    SyntheticPair,
    make_pair,
)

__all__ = [
    "BSplineFieldSource",
    "DRDMFieldSource",
    "KnownFieldTransform",
    "MultiResolutionBSpline",
    "SmoothNoiseFieldSource",
    "SyntheticPair",
    "evaluate_bspline",
    "make_pair",
]
