"""ITK-readable displacement fields: voxel displacements -> vector NIfTI in mm.

A written field ``D`` satisfies, in world coordinates, ``sample(p) = input(p + D(p))`` at every
voxel centre ``p`` of the input grid: ``sitk.ReadImage`` -> ``sitk.DisplacementFieldTransform``
-> ``sitk.Resample`` of the input onto itself reproduces the sample.

Layout: NIfTI ``[X, Y, Z, 1, 3]`` (intent 1006, ``NIFTI_INTENT_DISPVECT``), float32, the input's
affine, vectors in mm in the NIfTI world frame (RAS). ITK converts such vectors to its LPS frame
itself when reading (it negates x and y of DISPVECT/VECTOR NIfTI), so the file holds RAS
vectors, as ANTs and other NIfTI tools expect; checked against SimpleITK 2.5 / ITK 5.4.

2D images (a 2D NIfTI) get ``[X, Y, 1, 1, 2]``: ITK reads them as 2D and needs as many
components as dimensions. (ITK 5.4's RAS->LPS conversion mishandles 2-component fields, so for
2D files SimpleITK disagrees; the file itself follows the NIfTI standard.)
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdm.data.io import save_nifti, save_nifti_like
from drdm.deform.units import displacement_to_world

NIFTI_INTENT_DISPVECT = 1006


def world_displacement(displacement, affine) -> np.ndarray:
    """Voxel displacement ``[n, *S]`` (array axes, ``n = len(S)``) -> ``[n, *S]`` mm (RAS)."""
    field = torch.as_tensor(np.asarray(displacement), dtype=torch.float64)
    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {tuple(affine.shape)}")
    if field.ndim - 1 not in (2, 3) or field.shape[0] != field.ndim - 1:
        raise ValueError(
            f"displacement must be [n, *S] with n = len(S) in (2, 3), got {tuple(field.shape)}"
        )
    return displacement_to_world(field[None], affine)[0].numpy()


def itk_displacement_array(displacement, affine) -> np.ndarray:
    """Voxel displacement ``[n, *S]`` -> vector-NIfTI array ``[X, Y, Z, 1, n]`` (mm, RAS)."""
    world = world_displacement(displacement, affine)
    if world.ndim == 3:  # 2D image: Z = 1
        world = world[..., None]
    return np.moveaxis(world, 0, -1)[:, :, :, None, :].astype(np.float32)


def write_displacement_field(path: str | Path, displacement, affine, like=None) -> Path:
    """Write a voxel displacement ``[n, *S]`` (array axes of the image with ``affine``) atomically.

    ``affine`` is the geometry the voxels are converted to mm with. With ``like`` (the input NIfTI
    file), the header geometry of that file is copied verbatim instead of being re-derived from
    ``affine``, so the field sits on exactly the input's grid in every reader. Returns the path.
    See the module docstring for the layout and convention.
    """
    affine = np.asarray(affine, dtype=np.float64)
    data = itk_displacement_array(displacement, affine)
    if like is not None:
        intent = (NIFTI_INTENT_DISPVECT, "DISPLACEMENT")
        return save_nifti_like(path, data, like, dtype=np.float32, intent=intent)
    header = nib.Nifti1Header()
    header.set_intent(NIFTI_INTENT_DISPVECT, name="DISPLACEMENT")
    header.set_xyzt_units("mm")
    return save_nifti(path, data, affine, header=header, dtype=np.float32)


def read_displacement_field(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a field written here: ``([X, Y, Z, 1, n] mm RAS, affine)``, checking the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"displacement field not found: {path}")
    image = nib.load(str(path))
    if image.ndim != 5 or image.shape[3] != 1 or image.shape[4] not in (2, 3):
        raise ValueError(f"{path}: expected a [X, Y, Z, 1, 2|3] vector NIfTI, got {image.shape}")
    if int(image.header["intent_code"]) != NIFTI_INTENT_DISPVECT:
        raise ValueError(f"{path}: intent code {int(image.header['intent_code'])}, expected 1006")
    return np.asarray(image.dataobj, dtype=np.float32), image.affine
