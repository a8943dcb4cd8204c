"""Pure-torch deformation core (no Lightning or Hydra): 2D and 3D, batched, differentiable.

Displacements are ``[B, ndims, *spatial]`` in voxels, channel ``i`` along tensor axis ``i``;
see :mod:`drdm.deform.spatial` for the warp and composition conventions.
"""

from drdm.deform.spatial import compose, identity_grid, warp

__all__ = ["compose", "identity_grid", "warp"]
