"""Preprocessing as TorchIO transforms built from config.

Two stages, so 2D mode can normalise whole volumes before cutting them into slices:

1. :func:`volume_transforms` (per volume): canonical orientation, foreground crop, resample to a
   target spacing (in 2D mode only the in-plane axes; the slice spacing is kept), intensity
   normalisation (percentile rescale to 0..1, z-score or min-max).
2. :func:`size_transform` (per model sample: a 3D volume or a 2D slice ``[C, W, H, 1]``): crop/pad
   or resize to ``image_size``.

Every step is a TorchIO transform, so labels follow images (nearest-neighbour for label maps) and
affines are updated with every crop, pad, flip, reorientation and resampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import nibabel as nib
import numpy as np
import torch
import torchio as tio

INTENSITY_MODES = ("percentile", "zscore", "minmax", "none")
SIZE_MODES = ("crop_or_pad", "resize", "none")


@dataclass
class PreprocessingConfig:
    """Options of the preprocessing pipeline (keys of ``data.preprocessing`` in the config).

    Attributes:
        canonical: reorient to RAS+ (voxel axes follow the world axes as closely as possible).
        spacing: target voxel size in mm: one value, or one per axis (3 in 3D; in 2D mode 2 values
            for the in-plane axes, in their order). ``None`` keeps the native spacing.
        size_mode: ``crop_or_pad`` (centre crop / zero pad to ``image_size``), ``resize`` (resample
            the whole field of view to ``image_size``) or ``none``.
        intensity: ``percentile`` (rescale ``percentiles`` to 0..1 and clip), ``zscore`` (zero
            mean, unit variance over ``intensity_mask``), ``minmax`` (0..1) or ``none``.
        percentiles: lower and upper percentile for ``percentile``.
        intensity_mask: ``None`` (all voxels) or ``"foreground"`` (voxels above the mean),
            for z-score.
        foreground_crop: crop to the bounding box of voxels above ``foreground_threshold``.
        foreground_threshold: intensity threshold of the foreground crop; ``None``: above the
            minimum.
        foreground_margin: voxels kept around the foreground box.
        pad_value: value for padding (``0`` after percentile rescaling is background).
    """

    canonical: bool = True
    spacing: float | list[float] | None = None
    size_mode: str = "crop_or_pad"
    intensity: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_mask: str | None = None
    foreground_crop: bool = False
    foreground_threshold: float | None = None
    foreground_margin: int = 4
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"preprocessing.intensity must be one of {INTENSITY_MODES}")
        if self.size_mode not in SIZE_MODES:
            raise ValueError(f"preprocessing.size_mode must be one of {SIZE_MODES}")
        low, high = (float(p) for p in self.percentiles)
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"preprocessing.percentiles must be 0 <= low < high <= 100: {low, high}"
            )
        self.percentiles = (low, high)
        if self.intensity_mask not in (None, "foreground"):
            raise ValueError("preprocessing.intensity_mask must be null or 'foreground'")

    @classmethod
    def from_mapping(cls, options: Mapping | PreprocessingConfig | None) -> PreprocessingConfig:
        """Build from a dict / DictConfig, refusing unknown keys (typos) by name."""
        if isinstance(options, PreprocessingConfig):
            return options
        options = dict(options or {})
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; known: {sorted(known)}")
        if options.get("spacing") is not None and not np.isscalar(options["spacing"]):
            options["spacing"] = [float(value) for value in options["spacing"]]
        return cls(**options)


class ForegroundCrop(tio.SpatialTransform):
    """Crop every image of a subject to the bounding box of ``image > threshold`` plus a margin.

    Args:
        threshold: intensity threshold; ``None`` = strictly above the image minimum.
        margin: voxels added on each side (clipped at the volume border).
        image_key: which image defines the foreground.
    """

    def __init__(self, threshold: float | None = None, margin: int = 4, image_key: str = "image"):
        super().__init__(copy=False)
        self.threshold = threshold
        self.margin = int(margin)
        self.image_key = image_key
        self.args_names = ["threshold", "margin", "image_key"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        data = subject[self.image_key].data
        threshold = float(data.min()) if self.threshold is None else float(self.threshold)
        foreground = (data > threshold).any(dim=0)
        if not foreground.any():
            return subject  # nothing above threshold: keep the volume rather than crop to nothing
        bounds = []
        for axis, size in enumerate(foreground.shape):
            other = tuple(a for a in range(foreground.ndim) if a != axis)
            present = torch.nonzero(foreground.any(dim=other)).flatten()
            low = max(int(present.min()) - self.margin, 0)
            high = min(int(present.max()) + 1 + self.margin, size)
            bounds += [low, size - high]
        return tio.Crop(tuple(bounds), copy=False)(subject)


def _spacing_for(
    config: PreprocessingConfig, subject: tio.Subject, slice_axis: int | None
) -> tuple[float, float, float] | None:
    """Target spacing (3 values) for ``subject``; in 2D mode the slice axis keeps its spacing."""
    if config.spacing is None:
        return None
    current = [float(s) for s in subject["image"].spacing]
    values = [float(config.spacing)] if np.isscalar(config.spacing) else list(config.spacing)
    if slice_axis is None:
        target = values * 3 if len(values) == 1 else values
        if len(target) != 3:
            raise ValueError(f"preprocessing.spacing needs 1 or 3 values in 3D, got {values}")
        return tuple(target)
    in_plane = values * 2 if len(values) == 1 else values
    if len(in_plane) != 2:
        raise ValueError(f"preprocessing.spacing needs 1 or 2 in-plane values in 2D, got {values}")
    in_plane.insert(slice_axis, current[slice_axis])
    return tuple(in_plane)


def _intensity_transform(config: PreprocessingConfig) -> tio.Transform | None:
    if config.intensity == "percentile":
        return tio.RescaleIntensity(
            out_min_max=(0.0, 1.0), percentiles=config.percentiles, copy=False
        )
    if config.intensity == "minmax":
        return tio.RescaleIntensity(out_min_max=(0.0, 1.0), copy=False)
    if config.intensity == "zscore":
        mask = tio.ZNormalization.mean if config.intensity_mask == "foreground" else None
        return tio.ZNormalization(masking_method=mask, copy=False)
    return None


def volume_transforms(
    config: PreprocessingConfig, subject: tio.Subject, slice_axis: int | None = None
) -> tio.Compose:
    """The per-volume pipeline for ``subject`` (before slicing in 2D mode).

    Built per subject because, in 2D mode, the slice axis keeps each volume's own spacing. The
    subject must already be reoriented when ``canonical`` is on (see :func:`preprocess_volume`).
    """
    steps: list[tio.Transform] = []
    if config.foreground_crop:
        steps.append(ForegroundCrop(config.foreground_threshold, config.foreground_margin))
    target = _spacing_for(config, subject, slice_axis)
    if target is not None:
        steps.append(tio.Resample(target, image_interpolation="linear", antialias=True, copy=False))
    intensity = _intensity_transform(config)
    if intensity is not None:
        steps.append(intensity)
    return tio.Compose(steps, copy=False)


def to_canonical(subject: tio.Subject) -> tio.Subject:
    """Reorient every image of ``subject`` in place to RAS+ (axis permutations and flips only).

    Same result as ``tio.ToCanonical`` but works on any dtype (nibabel refuses int64 label maps
    there) and needs no resampling: voxels are only transposed and flipped, the affine follows.
    """
    for image in subject.get_images(intensity_only=False):
        affine = np.asarray(image.affine, dtype=np.float64)
        orientation = nib.orientations.io_orientation(affine)
        if np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
            continue
        data = image.data.numpy()
        spatial_shape = data.shape[1:]
        reoriented = nib.orientations.apply_orientation(np.moveaxis(data, 0, -1), orientation)
        tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(reoriented, -1, 0)))
        image.set_data(tensor)
        image.affine = affine @ nib.orientations.inv_ornt_aff(orientation, spatial_shape)
    return subject


def preprocess_volume(
    subject: tio.Subject, config: PreprocessingConfig, slice_axis: int | None = None
) -> tio.Subject:
    """Load ``subject`` and apply the per-volume stage in place (the subject is modified)."""
    subject.load()
    if config.canonical:
        subject = to_canonical(subject)
    return volume_transforms(config, subject, slice_axis)(subject)


def size_transform(
    config: PreprocessingConfig, image_size: Sequence[int], ndims: int
) -> tio.Transform | None:
    """Crop/pad or resize to ``image_size``; 2D samples are ``[C, W, H, 1]`` (singleton last)."""
    size = [int(s) for s in image_size]
    if len(size) != ndims:
        raise ValueError(f"image_size {size} must have {ndims} values for ndims={ndims}")
    target = (*size, 1) if ndims == 2 else tuple(size)
    if config.size_mode == "crop_or_pad":
        return tio.CropOrPad(target, padding_mode=config.pad_value, copy=False)
    if config.size_mode == "resize":
        return tio.Resize(target, copy=False)
    return None
