"""TorchIO transforms: DRDM deformations inside any TorchIO (and, through it, MONAI) pipeline.

* :class:`RandomDiffeomorphic` — the DRDM forward process alone (no network): a random,
  topology-preserving deformation whose size grows with the step ``t``;
* :class:`RandomDRDM` — a trained DRDM (``"default"``: the packaged model, a Lightning ``.ckpt``
  or the authors' ``.pth``): diffuse to ``t0``, recover, warp by the recovered field, with the
  generation settings every other route gets (:data:`drdm.generation.SHIPPED_DEFAULTS`).

Each draws its random parameters (a seed and a step) and applies a deterministic transform,
:class:`Diffeomorphic` or :class:`DRDMDeformation`, which rebuilds its field from them: the
subject's history replays it exactly (``subject.get_composed_history()``) and
``subject.apply_inverse_transform()`` undoes it, warping with the field's inverse
(:func:`drdm.deform.invert`). Every ``ScalarImage`` is warped with ``image_interpolation``
(linear) and every ``LabelMap`` with nearest neighbour, by the same field; affines are kept.
2D subjects are TorchIO's ``[C, W, H, 1]``.

After a transform, ``subject["drdm"]`` holds what the field did (when ``record=True``):

* ``field_mm`` — ``[n, W, H(, D)]`` float32 displacement in mm in the NIfTI world frame (RAS),
  ``sample(p) = input(p + field(p))``: the array ``src/augment.py`` writes;
  :func:`write_field` saves it as an ITK displacement NIfTI;
* ``folding_ratio``, ``jacobian_min``, ``jacobian_max`` (of ``id + field``), ``max_mm``,
  ``mean_mm``, ``t`` (the step, ``-1`` where ``p`` skipped the transform), ``seed``;
* after an inverse: ``inverse_residual_max`` / ``inverse_residual_mean`` (voxels,
  ``|v + u o (id + v)|`` of the inverse ``v``).

With ``p < 1`` a skipped subject still gets the record (a zero field), so every subject of a
``tio.SubjectsLoader`` batch has the same keys.

For training loops, :class:`BatchDiffeomorphic` and :class:`BatchDRDM` do the same on a batch
tensor ``[B, C, *S]`` on its device (a GPU): one call, one field per sample.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.spatial_transform import SpatialTransform

from drdm.data.displacement_files import world_displacement, write_displacement_field
from drdm.deform import RandomDeformation, invert, jacobian_determinant, warp
from drdm.generation.sampler import DRDM, deformation_config

RECORD_KEY = "drdm"
INTERPOLATIONS = {"linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic"}


# ------------------------------------------------------------------------------------ helpers


def _is_2d(subject: tio.Subject) -> bool:
    return subject.spatial_shape[-1] == 1


def _reference(images: list[tio.Image]) -> tio.Image:
    if not images:
        raise ValueError("the transform found no image in the subject (check include / exclude)")
    return images[0]


def _warp_image(image: tio.Image, displacement: torch.Tensor, mode: str) -> None:
    """Warp ``image.data`` ``[C, W, H, D]`` in place by ``displacement`` ``[1, n, *S]``."""
    data = image.data
    planar = displacement.shape[1] == 2
    batch = (data[..., 0] if planar else data)[None]
    if isinstance(image, tio.LabelMap):
        mode = "nearest"
    if not batch.is_floating_point() and mode != "nearest":
        batch = batch.float()
    warped = warp(batch, displacement, mode=mode)
    warped = warped[0][..., None] if planar else warped[0]
    image.set_data(warped.to(data.dtype))


def _record(
    subject: tio.Subject, displacement: torch.Tensor, affine: np.ndarray, t: int, seed: int
) -> None:
    """``subject["drdm"]``: the field in mm (RAS) and its statistics (module docstring)."""
    field = displacement[0].double()
    planar = field.shape[0] == 2
    mm = torch.from_numpy(world_displacement(field.numpy(), affine)).float()
    if planar:
        mm = mm[..., None]
    determinant = jacobian_determinant(displacement.double())
    length = mm.norm(dim=0)
    subject[RECORD_KEY] = {
        "field_mm": mm,
        "folding_ratio": float((determinant <= 0).double().mean()),
        "jacobian_min": float(determinant.min()),
        "jacobian_max": float(determinant.max()),
        "max_mm": float(length.max()),
        "mean_mm": float(length.mean()),
        "t": int(t),
        "seed": int(seed),
    }


def voxel_field(subject: tio.Subject, image_key: str | None = None) -> torch.Tensor:
    """``subject["drdm"]["field_mm"]`` back in voxels of the image's array axes, float64
    ``[n, *S]`` (2D subjects: ``[2, W, H]``), ``warp``'s convention.

    ``image_key``: the image whose geometry the field lives on (default: the first image).
    """
    if RECORD_KEY not in subject:
        raise ValueError(
            f"the subject has no '{RECORD_KEY}' record: apply a drdm transform with record=True"
        )
    image = subject[image_key] if image_key else subject.get_first_image()
    field = subject[RECORD_KEY]["field_mm"].double()
    linear = torch.as_tensor(image.affine[:3, :3], dtype=torch.float64)
    if image.spatial_shape[-1] == 1 and field.shape[0] == 2:
        field, linear = field[..., 0], linear[:2, :2]
    return torch.einsum("ij,j...->i...", torch.linalg.inv(linear), field)


def write_field(subject: tio.Subject, path: str | Path, image_key: str | None = None) -> Path:
    """Write ``subject["drdm"]["field_mm"]`` as an ITK displacement NIfTI (as ``augment.py``).

    ``image_key``: the image whose geometry the field lives on (default: the first image).
    """
    image = subject[image_key] if image_key else subject.get_first_image()
    # write_displacement_field takes voxels of the array axes and converts them to mm itself
    return write_displacement_field(path, voxel_field(subject, image_key).numpy(), image.affine)


def _as_range(value, name: str, low: int, high: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not low <= int(pair[0]) <= int(pair[1]) <= high:
        raise ValueError(f"{name} must be an int or (min, max) within [{low}, {high}], got {value}")
    return int(pair[0]), int(pair[1])


# ---------------------------------------------------------------------- the field transforms


class _FieldTransform(SpatialTransform):
    """Warp the subject by ``self.displacement(subject)``, or by its inverse when inverted."""

    def __init__(
        self,
        image_interpolation: str = "linear",
        record: bool = True,
        inverse_iterations: int = 50,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if image_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"image_interpolation must be one of {sorted(INTERPOLATIONS)}, "
                f"got {image_interpolation!r}"
            )
        self.image_interpolation = image_interpolation
        self.record = bool(record)
        self.inverse_iterations = int(inverse_iterations)
        self.invert_transform = False

    def displacement(self, subject: tio.Subject, reference: tio.Image) -> torch.Tensor:
        """The field ``[1, n, *S]`` (voxels of the array axes; ``n = 2`` for 2D subjects)."""
        raise NotImplementedError

    def step(self) -> int:
        raise NotImplementedError

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        subject.check_consistent_spatial_shape()
        images = self.get_images(subject)
        reference = _reference(images)
        displacement = self.displacement(subject, reference)
        residual = None
        if self.invert_transform:
            displacement, residual = invert(displacement, self.inverse_iterations)
        mode = INTERPOLATIONS[self.image_interpolation]
        for image in images:
            _warp_image(image, displacement, mode)
        if self.record:
            _record(subject, displacement, reference.affine, self.step(), self.seed)
            if residual is not None:
                subject[RECORD_KEY]["inverse_residual_max"] = float(residual.max())
                subject[RECORD_KEY]["inverse_residual_mean"] = float(residual.mean())
        return subject


def forward_process(
    ndims: int, deformation: str | Mapping = "auto", scale: float | None = None
) -> RandomDeformation:
    """The forward process: a packaged config name (``"auto"``: ``transform_2d`` /
    ``reference_3d``), or ``RandomDeformation`` arguments; ``scale`` replaces its velocity scale
    (fraction of the image's field of view; see :class:`RandomDiffeomorphic`)."""
    if isinstance(deformation, str):
        name = (
            ("transform_2d" if ndims == 2 else "reference_3d")
            if deformation == "auto"
            else deformation
        )
        config = deformation_config(name)
    else:
        config = dict(deformation)
        config.pop("_target_", None)
    config["ndims"] = ndims
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        # v_scale is relative to the control grid, which spans crop_factor x the image
        config["v_scale"] = float(scale) / float(config.get("crop_factor", 2.0))
    return RandomDeformation(**config)


@functools.lru_cache(maxsize=8)
def _cached_process(ndims: int, deformation: str, scale: float | None) -> RandomDeformation:
    """:func:`forward_process` built once per process (``deformation``: a name or JSON)."""
    config = json.loads(deformation) if deformation.startswith("{") else deformation
    return forward_process(ndims, config, scale)


class Diffeomorphic(_FieldTransform):
    """The forward-process field of step ``t`` drawn with ``seed`` (deterministic, invertible).

    Args:
        seed: the field's random seed.
        t: the diffusion step (``0 .. T-1``); the field grows with it.
        scale: velocity scale as a fraction of the field of view (``None``: the config's).
        scale_mm: the same in millimetres, divided by the subject's mean field of view.
        deformation: packaged config name (``"auto"``: ``transform_2d``, reference_2d's process
            at a tenth of its cost, for 2D subjects; ``reference_3d`` for 3D) or
            ``RandomDeformation`` arguments.
        image_interpolation: ``linear``, ``bicubic`` (2D) or ``nearest``; labels: nearest.
        record: store the field and its statistics in ``subject["drdm"]``.
        **kwargs: :class:`torchio.transforms.Transform` arguments (``include``, ``exclude``, ...).
    """

    def __init__(
        self,
        seed: int,
        t: int,
        scale: float | None = None,
        scale_mm: float | None = None,
        deformation: str | Mapping = "auto",
        image_interpolation: str = "linear",
        record: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(image_interpolation, record, **kwargs)
        if scale is not None and scale_mm is not None:
            raise ValueError("give scale (fraction of the field of view) or scale_mm, not both")
        self.seed, self.t = int(seed), int(t)
        self.scale, self.scale_mm = scale, scale_mm
        self.deformation = deformation if isinstance(deformation, str) else dict(deformation)
        self.args_names = [
            "seed",
            "t",
            "scale",
            "scale_mm",
            "deformation",
            "image_interpolation",
            "record",
        ]

    def step(self) -> int:
        return self.t

    def displacement(self, subject: tio.Subject, reference: tio.Image) -> torch.Tensor:
        planar = _is_2d(subject)
        shape = tuple(reference.spatial_shape[:2] if planar else reference.spatial_shape)
        scale = self.scale
        if self.scale_mm is not None:
            spacing = np.asarray(reference.spacing[: len(shape)])
            scale = float(self.scale_mm) / float(np.mean(spacing * np.asarray(shape)))
        key = (
            self.deformation
            if isinstance(self.deformation, str)
            else json.dumps(self.deformation, sort_keys=True)
        )
        process = _cached_process(len(shape), key, scale)
        if not 0 <= self.t < process.timesteps:
            raise ValueError(f"t={self.t} outside 0 .. {process.timesteps - 1}")
        generator = torch.Generator().manual_seed(self.seed)
        return process.diffused(shape, torch.tensor([self.t]), generator=generator)


@functools.lru_cache(maxsize=4)
def _cached_drdm(checkpoint: str, options: str, device: str) -> DRDM:
    return DRDM.load(checkpoint, map_location=device, **json.loads(options))


class DRDMDeformation(_FieldTransform):
    """A trained DRDM's field for (``seed``, ``t0``): diffuse, recover, warp (deterministic).

    Args:
        seed: the sample's seed (``DRDM.generate``'s: same seed, same field).
        t0: the diffusion step the recovery starts from.
        checkpoint: ``"default"`` (packaged), a Lightning ``.ckpt`` or the authors' ``.pth``.
        options: :class:`drdm.generation.DRDM` settings (``None``: the checkpoint's, else the
            shipped default).
        image_key: the image the network sees (default: the first ``ScalarImage``).
        slice_axis: a 2D model on a 3D subject works slice by slice across this axis.
        device: where the network runs.
        image_interpolation, record, **kwargs: as :class:`Diffeomorphic`.
    """

    def __init__(
        self,
        seed: int,
        t0: int,
        checkpoint: str = "default",
        options: Mapping | None = None,
        image_key: str | None = None,
        slice_axis: int = 2,
        device: str = "cpu",
        image_interpolation: str = "linear",
        record: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(image_interpolation, record, **kwargs)
        self.seed, self.t0 = int(seed), int(t0)
        self.checkpoint = str(checkpoint)
        self.options = dict(options or {})
        self.image_key = image_key
        self.slice_axis = int(slice_axis)
        self.device = str(device)
        self.args_names = [
            "seed",
            "t0",
            "checkpoint",
            "options",
            "image_key",
            "slice_axis",
            "device",
            "image_interpolation",
            "record",
        ]

    def step(self) -> int:
        return self.t0

    def model(self) -> DRDM:
        return _cached_drdm(self.checkpoint, json.dumps(self.options, sort_keys=True), self.device)

    def displacement(self, subject: tio.Subject, reference: tio.Image) -> torch.Tensor:
        image = subject[self.image_key] if self.image_key else None
        if image is None:
            scalars = subject.get_images(intensity_only=True)
            if not scalars:
                raise ValueError("RandomDRDM needs a ScalarImage in the subject for the network")
            image = scalars[0]
        drdm = self.model()
        data = image.data[0].float()
        planar = _is_2d(subject)
        if planar and drdm.ndims != 2:
            raise ValueError(f"a {drdm.ndims}D DRDM cannot deform a 2D subject")
        volume = data[..., 0] if planar else data
        generated = drdm.generate(
            volume, num_samples=1, t0=self.t0, seed=self.seed, slice_axis=self.slice_axis
        )
        return generated.displacement[:1].float().cpu()


# --------------------------------------------------------------------------- random versions


class _RandomField(RandomTransform, SpatialTransform):
    """``p`` is handled here, not by TorchIO, so that a skipped subject still gets a record."""

    def __init__(self, p: float = 1.0, record: bool = True, **kwargs) -> None:
        super().__init__(p=1.0, **kwargs)
        self.apply_probability = self.parse_probability(p)
        self.record = bool(record)

    def deterministic(self, seed: int) -> _FieldTransform:
        raise NotImplementedError

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        seed = self._get_random_seed()
        if torch.rand(1).item() > self.apply_probability:
            if self.record:
                reference = _reference(self.get_images(subject))
                planar = _is_2d(subject)
                shape = reference.spatial_shape[:2] if planar else reference.spatial_shape
                zero = torch.zeros(1, len(shape), *shape)
                _record(subject, zero, reference.affine, -1, seed)
            return subject
        transformed = self.deterministic(seed)(subject)
        assert isinstance(transformed, tio.Subject)
        return transformed


class RandomDiffeomorphic(_RandomField):
    """The DRDM forward process as a TorchIO augmentation (no network needed).

    Each call draws a seed and a step ``t`` uniformly from ``steps`` and applies
    :class:`Diffeomorphic`. The field is diffeomorphic by construction (a composition of small
    smooth steps); ``subject["drdm"]["folding_ratio"]`` reports any folding its discretisation
    leaves.

    Args:
        steps: ``t`` or ``(t_min, t_max)``, within ``0 .. T-1`` (``T = 80`` for the packaged
            configs); larger steps deform more.
        scale: the per-step velocity scale as a fraction of the field of view (the forward
            process's ``v_scale`` times its ``crop_factor``; ``reference_2d``: 1.6e-4,
            ``reference_3d``: 8e-5); ``None``: the config's.
        scale_mm: the same in millimetres (divided by the subject's mean field of view).
        deformation: packaged config name or ``RandomDeformation`` arguments (``"auto"``:
            ``transform_2d`` / ``reference_3d`` by the subject's dimension).
        image_interpolation: ``linear`` (default), ``bicubic`` (2D) or ``nearest``.
        p: probability of deforming a subject.
        record: store the field and its statistics in ``subject["drdm"]``.
        **kwargs: :class:`torchio.transforms.Transform` arguments (``include``, ``exclude``).
    """

    def __init__(
        self,
        steps: int | Sequence[int] = (20, 48),
        scale: float | None = None,
        scale_mm: float | None = None,
        deformation: str | Mapping = "auto",
        image_interpolation: str = "linear",
        p: float = 1.0,
        record: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(p=p, record=record, **kwargs)
        self.steps = _as_range(steps, "steps", 0, 10**6)
        self.scale, self.scale_mm = scale, scale_mm
        self.deformation = deformation
        self.image_interpolation = image_interpolation
        # check the arguments now, not in the first worker
        Diffeomorphic(0, self.steps[0], scale, scale_mm, deformation, image_interpolation)

    def deterministic(self, seed: int) -> Diffeomorphic:
        t = int(torch.randint(self.steps[0], self.steps[1] + 1, (1,)))
        return Diffeomorphic(
            seed,
            t,
            self.scale,
            self.scale_mm,
            self.deformation,
            self.image_interpolation,
            self.record,
            **self._get_base_args(),
        )


class RandomDRDM(_RandomField):
    """A trained DRDM as a TorchIO augmentation: a new, plausible instance of the anatomy.

    Each call draws a seed and ``t0`` uniformly from ``t0`` and applies
    :class:`DRDMDeformation` (image and labels warped by the recovered field).

    Args:
        checkpoint: ``"default"`` (the packaged model), a Lightning ``.ckpt`` or the authors'
            ``.pth``.
        t0: ``t0`` or ``(min, max)``; ``None``: the model's ``t0_start`` (the checkpoint's
            recommendation, else ``0.6 T``).
        options: :class:`drdm.generation.DRDM` settings; ``None``: the shipped default.
        image_key, slice_axis, device: as :class:`DRDMDeformation`.
        image_interpolation, p, record, **kwargs: as :class:`RandomDiffeomorphic`.
    """

    def __init__(
        self,
        checkpoint: str = "default",
        t0: int | Sequence[int] | None = None,
        options: Mapping | None = None,
        image_key: str | None = None,
        slice_axis: int = 2,
        device: str = "cpu",
        image_interpolation: str = "linear",
        p: float = 1.0,
        record: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(p=p, record=record, **kwargs)
        self.checkpoint = str(checkpoint)
        self.options = dict(options or {})
        self.image_key, self.slice_axis, self.device = image_key, int(slice_axis), str(device)
        self.image_interpolation = image_interpolation
        drdm = _cached_drdm(self.checkpoint, json.dumps(self.options, sort_keys=True), self.device)
        default = drdm.t0_start if t0 is None else t0
        self.t0 = _as_range(default, "t0", 1, drdm.timesteps - 1)

    def deterministic(self, seed: int) -> DRDMDeformation:
        t0 = int(torch.randint(self.t0[0], self.t0[1] + 1, (1,)))
        return DRDMDeformation(
            seed,
            t0,
            self.checkpoint,
            self.options,
            self.image_key,
            self.slice_axis,
            self.device,
            self.image_interpolation,
            self.record,
            **self._get_base_args(),
        )


# ------------------------------------------------------------------ MONAI dictionary transforms


class _DictionaryTransform:
    """MONAI-style dictionary transform over a drdm TorchIO transform: ``keys`` in, ``keys`` out.

    Values are channel-first ``[C, H, W]`` (2D) or ``[C, H, W, D]`` arrays, tensors or MONAI
    ``MetaTensor``s (whose ``affine`` gives the geometry; identity otherwise); ``mode`` per key:
    ``"bilinear"`` for images, ``"nearest"`` for labels, as MONAI's ``Rand*d``. Each output keeps
    its input's type and metadata; ``data["drdm"]`` gets the record (module docstring).
    """

    def __init__(self, keys, mode, transform: _RandomField) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys) or set(modes) - {"bilinear", "nearest"}:
            raise ValueError(
                f"mode must be 'bilinear' or 'nearest', one or one per key {self.keys}: {mode}"
            )
        self.modes = modes
        self.transform = transform

    def __call__(self, data: Mapping) -> dict:
        missing = [key for key in self.keys if key not in data]
        if missing:
            raise KeyError(f"keys {missing} not in the data (it has {sorted(data)})")
        images = {}
        for key, mode in zip(self.keys, self.modes, strict=True):
            value = data[key]
            tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            if tensor.ndim not in (3, 4):
                raise ValueError(
                    f"{key}: expected [C, H, W] or [C, H, W, D], got {tuple(tensor.shape)}"
                )
            tensor = tensor[..., None] if tensor.ndim == 3 else tensor
            affine = np.asarray(getattr(value, "affine", np.eye(4)), dtype=np.float64)
            kind = tio.LabelMap if mode == "nearest" else tio.ScalarImage
            images[key] = kind(tensor=tensor.detach().cpu().clone(), affine=affine)
        out = self.transform(tio.Subject(images))
        result = dict(data)
        for key in self.keys:
            warped = out[key].data
            original = data[key]
            warped = warped[..., 0] if np.ndim(original) == 3 else warped
            if isinstance(original, np.ndarray):
                result[key] = warped.numpy().astype(original.dtype)
            else:
                copy = original.clone()
                copy[...] = warped.to(copy.dtype)
                result[key] = copy
        if RECORD_KEY in out:
            result[RECORD_KEY] = out[RECORD_KEY]
        return result


class RandDiffeomorphicd(_DictionaryTransform):
    """MONAI dictionary form of :class:`RandomDiffeomorphic` (``prob`` as MONAI's)."""

    def __init__(self, keys, mode="bilinear", prob: float = 1.0, **options) -> None:
        super().__init__(keys, mode, RandomDiffeomorphic(p=prob, **options))


class RandDRDMd(_DictionaryTransform):
    """MONAI dictionary form of :class:`RandomDRDM` (``image_key``: the first ``bilinear`` key)."""

    def __init__(self, keys, mode="bilinear", prob: float = 1.0, **options) -> None:
        keys_list = [keys] if isinstance(keys, str) else list(keys)
        modes = [mode] * len(keys_list) if isinstance(mode, str) else list(mode)
        images = [k for k, m in zip(keys_list, modes, strict=False) if m == "bilinear"]
        options.setdefault("image_key", images[0] if images else None)
        super().__init__(keys, mode, RandomDRDM(p=prob, **options))


# ------------------------------------------------------------------------- batched, on device


def _warp_batch(image, label, displacement, mode: str) -> dict:
    out = {"image": warp(image, displacement.to(image.dtype), mode=mode)}
    if label is not None:
        out["label"] = warp(label, displacement, mode="nearest")
    return out


class BatchDiffeomorphic:
    """:class:`RandomDiffeomorphic` for a batch on its device: ``[B, C, *S]`` in, one field each.

    ``steps``, ``scale`` (fraction of the field of view), ``deformation`` and
    ``image_interpolation`` as :class:`RandomDiffeomorphic`. Calling with ``image`` (float) and
    an optional integer ``label`` (``[B, 1, *S]``) returns ``{"image", "label", "displacement"
    ([B, ndims, *S] voxels), "t" ([B])}``; the fields are drawn on the image's device from
    ``generator`` (a ``torch.Generator`` there, for determinism) or the global state.
    """

    def __init__(
        self,
        ndims: int,
        steps: int | Sequence[int] = (20, 48),
        scale: float | None = None,
        deformation: str | Mapping = "auto",
        image_interpolation: str = "linear",
    ) -> None:
        self.process = forward_process(ndims, deformation, scale)
        self.steps = _as_range(steps, "steps", 0, self.process.timesteps - 1)
        self.mode = INTERPOLATIONS[image_interpolation]

    def __call__(self, image, label=None, generator: torch.Generator | None = None) -> dict:
        ndims = self.process.ndims
        if image.ndim != ndims + 2:
            raise ValueError(
                f"image must be [B, C, *S] with {ndims} spatial dims, got {tuple(image.shape)}"
            )
        low, high = self.steps
        t = torch.randint(
            low, high + 1, (image.shape[0],), generator=generator, device=image.device
        )
        displacement = self.process.diffused(tuple(image.shape[2:]), t, generator=generator)
        return {
            **_warp_batch(image, label, displacement, self.mode),
            "displacement": displacement,
            "t": t,
        }


class BatchDRDM:
    """:class:`RandomDRDM` for a batch on its device: ``[B, 1, *S]`` in, one recovered field each.

    ``checkpoint``, ``t0`` and ``options`` as :class:`RandomDRDM`; ``device``: where the network
    runs (the batch's device by default). Calling with ``image``, an optional ``label`` and a
    ``seed`` returns ``{"image", "label", "displacement", "t"}``: sample ``b`` is
    ``DRDM.generate``'s input ``b`` with that seed, so a seed reproduces the batch.
    """

    def __init__(
        self,
        checkpoint: str = "default",
        t0: int | Sequence[int] | None = None,
        options: Mapping | None = None,
        device: str = "cpu",
        image_interpolation: str = "linear",
    ) -> None:
        self.drdm = _cached_drdm(
            str(checkpoint), json.dumps(dict(options or {}), sort_keys=True), device
        )
        self.t0 = _as_range(
            self.drdm.t0_start if t0 is None else t0, "t0", 1, self.drdm.timesteps - 1
        )
        self.mode = INTERPOLATIONS[image_interpolation]

    def __call__(self, image, label=None, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(int(seed))
        low, high = self.t0
        t0 = torch.randint(low, high + 1, (image.shape[0],), generator=generator)
        fields = []
        for b in range(image.shape[0]):  # one t0 per sample; the batch's network calls per t0
            generated = self.drdm.generate(
                image[b : b + 1].float(), t0=int(t0[b]), seed=int(seed) + b
            )
            fields.append(generated.displacement.to(image.device, torch.float32))
        displacement = torch.cat(fields)
        return {
            **_warp_batch(image, label, displacement, self.mode),
            "displacement": displacement,
            "t": t0.to(image.device),
        }
