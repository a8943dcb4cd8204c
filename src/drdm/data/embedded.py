"""The embedded default data: the ICBM152 2009a brain template that ships inside the nilearn wheel.

nilearn bundles the MNI ICBM152 2009a nonlinear symmetric template (T1, brain-extracted) and its
grey- and white-matter probability maps under ``nilearn/datasets/data/`` (1 mm, 197 x 233 x 189,
uint8). They are read here with nibabel, without importing nilearn, so the default works offline on
a fresh install.

Derived label map (computed after resampling the probability maps to the working spacing):

- brain mask: T1 intensity > 5 % of its maximum (the template is brain-extracted, so this is the
  non-zero region, slightly eroded by the interpolation at its border),
- 2 grey matter: brain and ``p_GM >= 0.5`` and ``p_GM >= p_WM``,
- 3 white matter: brain and ``p_WM >= 0.5`` and ``p_WM > p_GM``,
- 1 CSF / other brain: the rest of the brain (ventricles, sulcal CSF, deep nuclei at the border),
- 0 background.

One template is one anatomy; to get several subjects for honest train/val/test splits the
(brain-cropped) volume is cut into contiguous blocks (``blocks`` per axis, e.g. ``[1, 1, 10]`` =
ten axial slabs for 2D slices, ``[2, 2, 2]`` = eight 3D blocks). Each block is one subject and one
split group, so neighbouring slices never straddle splits except at block borders.

Attribution: VS Fonov, AC Evans, RC McKinstry, CR Almli, DL Collins. Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood. NeuroImage 47 (2009) S102; VS Fonov et al.
Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1) (2011) 313-327.
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University (permissive licence distributed with the template).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from drdm.data.io import load_nifti
from drdm.data.sources import Source, SourceData

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ("background", "csf_other_brain", "grey_matter", "white_matter")
BRAIN_THRESHOLD = 0.05
TISSUE_THRESHOLD = 0.5


def template_dir() -> Path:
    """``nilearn/datasets/data`` of the installed nilearn (located without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default data needs the 'nilearn' package (pip install nilearn)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"ICBM152 template files missing in {folder}: {missing}")
    return folder


def derive_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Label map (0 bg, 1 CSF/other brain, 2 GM, 3 WM) from T1 in 0..1 and tissue probabilities."""
    brain = t1 > BRAIN_THRESHOLD * float(t1.max())
    labels = np.zeros(t1.shape, dtype=np.int64)
    labels[brain] = 1
    labels[brain & (gm >= TISSUE_THRESHOLD) & (gm >= wm)] = 2
    labels[brain & (wm >= TISSUE_THRESHOLD) & (wm > gm)] = 3
    return labels


def area_downsample(
    volume: np.ndarray, affine: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Box-average ``volume`` to about ``spacing`` times its voxel size, with the matching affine.

    Each axis gets ``round(n / spacing)`` voxels, i.e. a factor ``f = n / n_out`` (exactly the
    requested spacing when it divides the size); output voxel ``i`` is centred at input coordinate
    ``(i + 0.5) f - 0.5``. Area averaging is the anti-aliased downsampling and is fast in torch.
    """
    shape_in = np.asarray(volume.shape, dtype=np.float64)
    shape_out = [max(int(round(n / s)), 1) for n, s in zip(volume.shape, spacing)]
    factors = shape_in / np.asarray(shape_out, dtype=np.float64)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    resampled = torch.nn.functional.interpolate(tensor, size=shape_out, mode="area")[0, 0]
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (factors - 1.0) / 2.0
    return resampled.numpy(), np.asarray(affine, dtype=np.float64) @ scale


@functools.lru_cache(maxsize=4)
def _resampled_template(spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """``(t1 [X,Y,Z] float32 0..1, labels int64, affine)`` at about ``spacing`` mm, brain-cropped.

    Cached per process: reading and downsampling the 1 mm volumes is the slow step.
    """
    folder = template_dir()
    volumes = {}
    for key, name in TEMPLATE_FILES.items():
        array, affine = load_nifti(folder / name)
        volumes[key], resampled_affine = area_downsample(array / 255.0, affine, spacing)
    t1 = np.clip(volumes["t1"], 0.0, 1.0)
    labels = derive_labels(t1, volumes["gm"], volumes["wm"])
    # crop to the brain's bounding box (+1 voxel) so blocks hold anatomy, not empty background
    nonzero = np.nonzero(labels)
    low = [max(int(index.min()) - 1, 0) for index in nonzero]
    high = [min(int(index.max()) + 2, size) for index, size in zip(nonzero, labels.shape)]
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    affine = resampled_affine.copy()
    affine[:3, 3] = resampled_affine[:3, :3] @ np.asarray(low, dtype=np.float64) + affine[:3, 3]
    return t1[crop].copy(), labels[crop].copy(), affine


def _block_bounds(size: int, count: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, size, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class ICBM152Source(Source):
    """The embedded default: the ICBM152 2009a template with a derived 4-class label map, in blocks.

    Args:
        spacing: working voxel size in mm (one value or three); the heavy resample happens once per
            process per spacing.
        blocks: number of contiguous blocks per voxel axis; each block is one subject and group.
    """

    def __init__(self, spacing: float | Sequence[float] = 3.5, blocks: Sequence[int] = (1, 1, 10)):
        spacing_list = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
        if len(spacing_list) != 3 or min(spacing_list) <= 0:
            raise ValueError(f"ICBM152Source spacing must be positive, 1 or 3 values: {spacing}")
        blocks = [int(b) for b in blocks]
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"ICBM152Source blocks must be 3 positive integers, got {blocks}")
        self.spacing = tuple(spacing_list)
        self.blocks = blocks

    def load(self) -> SourceData:
        t1, labels, affine = _resampled_template(self.spacing)
        source_path = str(template_dir() / TEMPLATE_FILES["t1"])
        bounds = [_block_bounds(size, count) for size, count in zip(t1.shape, self.blocks)]
        if min(hi - lo for axis in bounds for lo, hi in axis) < 1:
            raise ValueError(f"blocks {self.blocks} too many for a volume of shape {t1.shape}")
        subjects = []
        for index in np.ndindex(*self.blocks):
            ranges = [bounds[axis][i] for axis, i in enumerate(index)]
            crop = tuple(slice(lo, hi) for lo, hi in ranges)
            start = np.asarray([lo for lo, _ in ranges], dtype=np.float64)
            block_affine = affine.copy()
            block_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
            block_id = "icbm152_b" + "_".join(f"{i:02d}" for i in index)
            image = torch.from_numpy(np.array(t1[crop][None], copy=True))
            label = torch.from_numpy(np.array(labels[crop][None], copy=True))
            subject = tio.Subject(
                image=tio.ScalarImage(tensor=image, affine=block_affine),
                label=tio.LabelMap(tensor=label, affine=block_affine),
                id=block_id,
                group=block_id,
                source_path=source_path,
                original_affine=block_affine,
                original_shape=tuple(int(s) for s in image.shape[1:]),
            )
            subjects.append(subject)
        return SourceData(subjects, [], has_labels=True)
