"""Pure-torch deformation core (no Lightning or Hydra): 2D and 3D, batched, differentiable.

Displacements are ``[B, ndims, *spatial]`` in voxels, channel ``i`` along tensor axis ``i``;
see :mod:`drdm.deform.spatial` for the warp and composition conventions,
:mod:`drdm.deform.forward` for the DRDM forward process and its scale parameter.
"""

from drdm.deform.flow import exponentiate, integrate, integrate_sequential
from drdm.deform.forward import RandomDeformation, random_deformation
from drdm.deform.metrics import (
    displacement_stats,
    folding_ratio,
    inverse_consistency_error,
    jacobian_determinant,
    jacobian_matrix,
    sd_log_jacobian,
)
from drdm.deform.sampling import multiscale_noise, upsample_crop
from drdm.deform.schedule import power_steps
from drdm.deform.smoothing import gaussian_smooth, repair_folding
from drdm.deform.spatial import check_displacement, compose, identity_grid, invert, warp
from drdm.deform.units import displacement_to_world

__all__ = [
    "RandomDeformation",
    "check_displacement",
    "compose",
    "displacement_stats",
    "displacement_to_world",
    "exponentiate",
    "folding_ratio",
    "gaussian_smooth",
    "identity_grid",
    "integrate",
    "integrate_sequential",
    "invert",
    "inverse_consistency_error",
    "jacobian_determinant",
    "jacobian_matrix",
    "multiscale_noise",
    "power_steps",
    "random_deformation",
    "repair_folding",
    "sd_log_jacobian",
    "upsample_crop",
    "warp",
]
