"""Synthetic registration pairs with known fields (pure torch, no Lightning or Hydra).

* :class:`MultiResolutionBSpline` — random multi-resolution B-spline fields (the MRBS baseline).
* field sources, one interface and one bank (:mod:`drdm.synthesis.sources`):
  :class:`DRDMFieldSource` (a trained DRDM), :class:`ForwardDiffusionFieldSource` (the forward
  process alone), :class:`BSplineFieldSource` (MRBS), :class:`SmoothNoiseFieldSource`;
* :class:`KnownFieldTransform` — held-out evaluation pairs with a known field from a third
  family (``drdm.synthesis.datamodule.KnownFieldDataModule`` wires them into the data module;
  it imports Lightning, so it is not imported here).
* :func:`make_pair` / :class:`SyntheticPair` — ``fixed = warp(moving, field)``; the field is the
  registration target under drdm's pull-back convention.
"""

from drdm.synthesis.bspline import MultiResolutionBSpline, evaluate_bspline
from drdm.synthesis.known_field import KnownFieldTransform
from drdm.synthesis.pairs import SyntheticPair, make_pair
from drdm.synthesis.sources import (
    BSplineFieldSource,
    DRDMFieldSource,
    FieldSource,
    ForwardDiffusionFieldSource,
    SmoothNoiseFieldSource,
)

__all__ = [
    "BSplineFieldSource",
    "DRDMFieldSource",
    "FieldSource",
    "ForwardDiffusionFieldSource",
    "KnownFieldTransform",
    "MultiResolutionBSpline",
    "SmoothNoiseFieldSource",
    "SyntheticPair",
    "evaluate_bspline",
    "make_pair",
]
