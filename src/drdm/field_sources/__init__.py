"""Field sources: one interface for every random displacement field drdm trains with.

``source(image, t0=None, generator=None, keys=None) -> field`` (``[B, C, *S]`` ->
``[B, ndims, *S]`` voxels), used by the on-the-fly DRDM augmentation and by the registration's
synthetic pairs alike (:mod:`drdm.field_sources.bank`):
:class:`DRDMFieldSource` (a trained DRDM), :class:`ForwardDiffusionFieldSource` (the forward
process alone), :class:`BSplineFieldSource` (multi-resolution B-splines,
:class:`MultiResolutionBSpline`), :class:`SmoothNoiseFieldSource`. Each can keep a bank of at
most K fields per image (``fields_per_image``).
"""

from drdm.field_sources.bank import (
    BSplineFieldSource,
    DRDMFieldSource,
    FieldSource,
    ForwardDiffusionFieldSource,
    SmoothNoiseFieldSource,
)
from drdm.field_sources.bspline import MultiResolutionBSpline, evaluate_bspline

__all__ = [
    "BSplineFieldSource",
    "DRDMFieldSource",
    "FieldSource",
    "ForwardDiffusionFieldSource",
    "MultiResolutionBSpline",
    "SmoothNoiseFieldSource",
    "evaluate_bspline",
]
