"""NIfTI input/output with clear errors, header-level checks and atomic writes.

Arrays are returned in the file's voxel order (``[X, Y, Z]`` or ``[X, Y]``); affines are
``float64 [4, 4]`` voxel -> world (mm). Readers for TorchIO images live here too, so every image in
:mod:`drdm.data` is read, fixed and validated by the same code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdm.utils.atomic import atomic_write

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | Path) -> str:
    """File name without its ``.nii`` / ``.nii.gz`` suffix (``"patient001_frame01"``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _consistent_affine(image: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """The voxel -> world affine, with voxel sizes taken from the header when the two disagree.

    Some public sets (ACDC among them) store an sform with unit scales while ``pixdim`` holds the
    true spacing. ITK (and so TorchIO's default reader) trusts ``pixdim``; we do the same, keeping
    the direction and origin of the stored affine, so spacing is the same whichever reader is used.
    """
    affine = np.asarray(image.affine, dtype=np.float64)
    ndim_space = min(3, len(image.shape))
    zooms = np.asarray(image.header.get_zooms()[:ndim_space], dtype=np.float64)
    columns = affine[:3, :ndim_space]
    norms = np.linalg.norm(columns, axis=0)
    if np.all(zooms > 0) and np.all(norms > 0) and not np.allclose(norms, zooms, rtol=1e-3):
        warnings.warn(
            f"{path}: affine voxel sizes {norms.round(4).tolist()} disagree with header pixdim "
            f"{zooms.round(4).tolist()}; using pixdim (as ITK does)",
            stacklevel=3,
        )
        affine[:3, :ndim_space] = columns / norms * zooms
    return affine


def _open(path: str | Path) -> tuple[nib.spatialimages.SpatialImage, Path]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        return nib.load(str(path)), path
    except Exception as error:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI: {error}") from error


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (spatial, at most 3 axes) and affine of a NIfTI file without reading its voxels."""
    image, path = _open(path)
    shape = tuple(int(s) for s in image.shape[:3])
    return shape, _consistent_affine(image, path)


def load_nifti(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: numpy dtype of the returned array.

    Returns:
        ``(array, affine)``: the voxels ``[X, Y(, Z)(, ...)]`` in file order and the ``float64
        [4, 4]`` voxel -> world affine in mm.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not readable NIfTI or holds NaN / infinite voxels.
    """
    image, path = _open(path)
    try:
        array = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:
        raise ValueError(f"cannot read voxels of {path}: {error}") from error
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{path} holds {count} non-finite (NaN or inf) voxels")
    return array, _consistent_affine(image, path)


def save_nifti(
    path: str | Path,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    header: nib.Nifti1Header | None = None,
    dtype: type | None = None,
) -> Path:
    """Write ``array`` with ``affine`` atomically (temporary file in the folder + ``os.replace``).

    Args:
        path: destination ``.nii`` / ``.nii.gz``; parent folders are created.
        array: voxels ``[X, Y(, Z)(, C)]``; tensors are moved to CPU.
        affine: ``[4, 4]`` voxel -> world in mm (kept exactly, sform and qform).
        header: optional header to copy (e.g. from the input image) so units and codes survive.
        dtype: on-disk dtype; defaults to the array's.

    Returns:
        The written path.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"save_nifti needs a .nii or .nii.gz path, got {path}")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine for {path} must be [4, 4], got {list(affine.shape)}")
    array = np.asarray(array if dtype is None else array.astype(dtype))
    image = nib.Nifti1Image(array, affine, header=header)
    image.set_data_dtype(array.dtype)
    image.set_sform(affine, code=1 if header is None else max(1, int(header["sform_code"])))
    image.set_qform(affine, code=1)
    return _save_atomic(image, path)


def save_nifti_like(
    path: str | Path,
    array: np.ndarray | torch.Tensor,
    reference: str | Path,
    dtype: type | None = None,
    intent: tuple[int, str] | None = None,
) -> Path:
    """Write ``array`` atomically with the header geometry of the NIfTI file ``reference``.

    sform and qform (with their codes), voxel sizes and units are copied unchanged, so every tool
    reads the output on exactly the grid it reads the reference on -- even for files whose sform
    and ``pixdim`` disagree (see :func:`_consistent_affine`), where re-deriving a header would not.

    Args:
        path: destination ``.nii`` / ``.nii.gz``.
        array: voxels ``[X, Y(, Z)(, ...)]`` on the reference's grid (extra trailing axes allowed,
            e.g. ``[X, Y, Z, 1, 3]`` vector fields).
        reference: the NIfTI file whose geometry is copied.
        dtype: on-disk dtype; defaults to the array's.
        intent: optional ``(code, name)``, e.g. ``(1006, "DISPLACEMENT")``.
    """
    reference_image, reference = _open(reference)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array if dtype is None else array.astype(dtype))
    spatial = tuple(reference_image.shape[:3])
    if tuple(array.shape[: len(spatial)]) != spatial:
        raise ValueError(
            f"array for {path} has shape {list(array.shape)} but reference {reference} has "
            f"grid {list(spatial)}"
        )
    source = reference_image.header
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_sform(source.get_sform(), code=int(source["sform_code"]))
    # set_qform also writes pixdim from the qform; the reference's own zooms are restored below
    header.set_qform(source.get_qform(), code=int(source["qform_code"]))
    zooms = list(header.get_zooms())
    reference_zooms = source.get_zooms()
    for axis in range(min(3, len(zooms), len(reference_zooms))):
        zooms[axis] = reference_zooms[axis]
    header.set_zooms(zooms)
    header.set_xyzt_units(*source.get_xyzt_units())
    if intent is not None:
        header.set_intent(intent[0], name=intent[1])
        header.set_xyzt_units("mm")  # the vectors are in mm whatever the grid's declared unit
    image = nib.Nifti1Image(array, None, header=header)
    return _save_atomic(image, Path(path))


def _save_atomic(image: nib.Nifti1Image, path: Path) -> Path:
    """``nib.save`` through a temporary file in the destination folder (see drdm.utils.atomic)."""
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI output needs a .nii or .nii.gz path, got {path}")
    return atomic_write(path, lambda temporary: nib.save(image, temporary))


def check_same_geometry(image_path: Path, label_path: Path, atol: float = 1e-3) -> None:
    """Refuse an image / label pair whose shapes or affines differ (headers only, no voxels)."""
    image_shape, image_affine = read_header(image_path)
    label_shape, label_affine = read_header(label_path)
    if image_shape != label_shape:
        raise ValueError(
            f"label {label_path} has shape {list(label_shape)} but image {image_path} has "
            f"{list(image_shape)}"
        )
    if not np.allclose(image_affine, label_affine, atol=atol):
        raise ValueError(
            f"label {label_path} and image {image_path} have different affines:\n"
            f"{label_affine.round(4)}\nvs\n{image_affine.round(4)}"
        )


def check_label_values(values: np.ndarray, num_classes: int | None, where: str) -> None:
    """Refuse label maps with non-integer values or values outside ``0 .. num_classes - 1``."""
    unique = np.unique(values)
    fractional = unique[unique != np.round(unique)]
    if fractional.size:
        found = [float(f"{value:.6g}") for value in fractional[:8]]
        raise ValueError(f"{where}: label values must be integer class indices, found {found}")
    if num_classes is None:
        return
    outside = unique[(unique < 0) | (unique >= num_classes)]
    if outside.size:
        raise ValueError(
            f"{where}: label values {outside.astype(int).tolist()} are outside the declared "
            f"classes 0..{num_classes - 1} (class_names has {num_classes} entries)"
        )


def _as_4d(array: np.ndarray, path: Path) -> np.ndarray:
    """``[X, Y(, Z)]`` -> ``[1, X, Y, Z]`` (TorchIO layout); 2D files get a singleton Z."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 2D or 3D image, got shape {list(array.shape)}")
    return array[None]


def read_image(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO reader for intensities: ``([1, X, Y, Z] float32, affine)``; checks finiteness."""
    array, affine = load_nifti(path, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(_as_4d(array, Path(path)))), affine


def read_label(path: str | Path, num_classes: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO reader for label maps: ``([1, X, Y, Z] int64, affine)``; checks the values.

    ``functools.partial(read_label, num_classes=K)`` keeps it picklable for loader workers.
    """
    array, affine = load_nifti(path, dtype=np.float32)
    check_label_values(array, num_classes, f"label {path}")
    tensor = torch.from_numpy(np.ascontiguousarray(_as_4d(np.rint(array), Path(path))))
    return tensor.to(torch.int64), affine


def existing_dir(path: str | Path | None, what: str) -> Path:
    """``Path(path)`` after checking it is an existing folder; the error names ``what``."""
    if path is None or str(path) in ("", "???"):
        raise ValueError(f"{what} is not set (pass data.root=/path/to/data)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} does not exist or is not a folder: {path}")
    return path


def nifti_files(folder: Path, patterns: Sequence[str] = ("*.nii.gz", "*.nii")) -> list[Path]:
    """Sorted NIfTI files in ``folder`` matching any of ``patterns`` (duplicates removed)."""
    found = {path for pattern in patterns for path in folder.glob(pattern) if path.is_file()}
    return sorted(found)
