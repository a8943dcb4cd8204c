"""Small synthetic data trees made of real NIfTI files, for tests and demos of every source layout.

Volumes hold an off-centre bright disc per slice (label ``bright_label``) inside a darker ring
(label ``ring_label``), so tests can check that labels stay on the bright structure through every
reorientation, resampling and crop. Affines flip the first two axes (like ACDC files) so
reorientation is exercised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drdm.data.io import save_nifti

ACDC_SHAPE = (40, 48, 6)
ACDC_SPACING = (1.5, 1.5, 10.0)


def blob_volume(
    shape: Sequence[int],
    centre: Sequence[float],
    radius: float,
    seed: int = 0,
    ring_label: int = 2,
    bright_label: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label int16)`` of ``shape``: a bright disc (cylinder along the last axis
    in 3D) of ``radius`` voxels at ``centre`` (first two axes) inside a ring of half that width.

    Image: 1.0 in the disc, 0.4 in the ring, 0.05 background, plus N(0, 0.02) noise.
    """
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape[:2]], indexing="ij")
    distance = np.sqrt((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2)
    disc = distance <= radius
    ring = (distance > radius) & (distance <= radius * 1.5)
    image2d = np.where(disc, 1.0, np.where(ring, 0.4, 0.05))
    label2d = np.where(disc, bright_label, np.where(ring, ring_label, 0))
    if len(shape) == 3:
        image = np.repeat(image2d[..., None], shape[2], axis=2)
        label = np.repeat(label2d[..., None], shape[2], axis=2)
    else:
        image, label = image2d, label2d
    noise = np.random.default_rng(seed).normal(0.0, 0.02, size=shape)
    return (image + noise).astype(np.float32), label.astype(np.int16)


def acdc_affine(spacing: Sequence[float] = ACDC_SPACING) -> np.ndarray:
    """ACDC-like affine: first two axes flipped, given voxel sizes, origin at 0."""
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def write_acdc_tree(
    root: str | Path,
    n_patients: int = 6,
    shape: Sequence[int] = ACDC_SHAPE,
    subsets: Sequence[str] = ("training",),
) -> Path:
    """Write ``root/{subset}/patientXXX/`` with ED (frame01) and ES (frame08) images, ``_gt``
    labels (1 RV-like disc, 2 ring, 3 bright disc) and ``Info.cfg``; returns ``root``."""
    root = Path(root)
    affine = acdc_affine()
    number = 0
    for subset in subsets:
        for _ in range(n_patients):
            number += 1
            patient = f"patient{number:03d}"
            folder = root / subset / patient
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "Info.cfg").write_text(
                "ED: 1\nES: 8\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\nWeight: 75.0\n"
            )
            for frame, radius in ((1, 7.0), (8, 5.0)):
                centre = (12.0 + number % 4, 30.0 - number % 3)
                image, label = blob_volume(shape, centre, radius, seed=number * 10 + frame)
                rv = (slice(28, 34), slice(8, 14))  # a small second structure, label 1
                image[rv] = 0.9
                label[rv] = 1
                save_nifti(folder / f"{patient}_frame{frame:02d}.nii.gz", image, affine)
                save_nifti(folder / f"{patient}_frame{frame:02d}_gt.nii.gz", label, affine)
    return root


def write_nifti_folder(
    root: str | Path,
    n_cases: int = 5,
    shape: Sequence[int] = (24, 28, 4),
    with_labels: bool = True,
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
) -> Path:
    """Write ``root/images/case_XX.nii.gz`` and (optionally) ``root/labels/case_XX.nii.gz``."""
    root = Path(root)
    affine = np.diag([*spacing, 1.0])
    for index in range(n_cases):
        image, label = blob_volume(shape, (8.0 + index % 3, 16.0), 4.0, seed=index, ring_label=1)
        save_nifti(root / "images" / f"case_{index:02d}.nii.gz", image, affine)
        if with_labels:
            save_nifti(
                root / "labels" / f"case_{index:02d}.nii.gz", (label > 0).astype(np.int16), affine
            )
    return root


def write_learn2reg_tree(
    root: str | Path, n_cases: int = 4, shape: Sequence[int] = (20, 20, 16)
) -> Path:
    """Write a Learn2Reg-style tree: ``dataset.json``, ``imagesTr``, ``labelsTr``, ``masksTr``,
    ``keypointsTr`` (CSV of 0-based voxel indices on the disc centre) for ``n_cases`` cases with
    two time points (``_0000`` fixed, ``_0001`` moving) and their registration pairs."""
    root = Path(root)
    affine = np.diag([-2.0, 2.0, 2.5, 1.0])
    entries, pairs = [], []
    for case in range(1, n_cases + 1):
        names = []
        for time_point, radius in ((0, 5.0), (1, 4.0)):
            name = f"LungCT_{case:04d}_{time_point:04d}"
            centre = (7.0 + case % 3, 11.0)
            image, label = blob_volume(shape, centre, radius, seed=case * 3 + time_point)
            save_nifti(root / "imagesTr" / f"{name}.nii.gz", image, affine)
            save_nifti(root / "labelsTr" / f"{name}.nii.gz", label, affine)
            save_nifti(root / "masksTr" / f"{name}.nii.gz", (label > 0).astype(np.int16), affine)
            points = np.array([[centre[0], centre[1], z] for z in (3.0, 8.0, 12.0)])
            (root / "keypointsTr").mkdir(parents=True, exist_ok=True)
            np.savetxt(root / "keypointsTr" / f"{name}.csv", points, delimiter=",", fmt="%.3f")
            entries.append(
                {
                    "image": f"./imagesTr/{name}.nii.gz",
                    "label": f"./labelsTr/{name}.nii.gz",
                    "mask": f"./masksTr/{name}.nii.gz",
                    "keypoints": f"./keypointsTr/{name}.csv",
                }
            )
            names.append(f"./imagesTr/{name}.nii.gz")
        pairs.append({"fixed": names[0], "moving": names[1]})
    description = {
        "name": "LungCT",
        "tensorImageSize": {"0": "3D"},
        "modality": {"0": "CT"},
        "numTraining": len(entries),
        "training": entries,
        "training_paired_images": pairs,
        "registration_val": [],
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    return root
