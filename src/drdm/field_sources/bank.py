"""Field sources: one interface for every family of random displacement fields.

A field source is called as ``source(image, t0=None, generator=None, keys=None) -> field``:

* ``image`` ``[B, C, *S]`` float on any device; ``field`` ``[B, ndims, *S]`` voxels on the
  image's device, ``warp(image, field)`` being the deformed image (pull-back convention);
* ``t0``: the diffusion step of each field (an int for all, ``[B]`` long, or ``None``: drawn
  per call from the source's own ``t0`` list); families without steps ignore it;
* ``generator``: the ``torch.Generator`` of every random draw (``None``: torch's global one,
  seeded by ``seed_everything``);
* ``keys``: one string per image naming it (a sample id) for the bank below; ``None``: each
  image is named by its content (shape and values).

Sources:

* :class:`DRDMFieldSource`: a frozen, trained DRDM (diffuse to ``t0``, recover to 0) for that
  very image; the field of DRDM augmentation and of synthetic DRDM registration pairs;
* :class:`ForwardDiffusionFieldSource`: the forward process alone (``RandomDeformation`` at
  ``t0``, no recovery): an ablation, needs no trained model;
* :class:`BSplineFieldSource`: multi-resolution random B-splines (the MRBS baseline);
* :class:`SmoothNoiseFieldSource`: smoothed-noise velocities, integrated (held-out evaluation
  pairs from a family neither synthetic training mode uses).

**One caching policy, the bank** (:class:`FieldSource`): with ``fields_per_image = K > 0`` every
named image gets at most ``K`` generated fields. While it has fewer, a call generates a new one
(at the call's ``t0``) and keeps it; after that, calls draw one of its ``K`` at random. This is
the paper's offline set-up (a fixed number of DRDM samples per training image) made lazily on
the training device; it bounds the generation cost to ``K`` fields per image per run. Images
augmented before the source sees them (TorchIO) never repeat their content, so their callers
pass ``keys`` (sample ids). ``K = 0``: a new field on every call. Memory: ``K x images x ndims x
S`` floats on the device.

Pure torch: no Lightning or Hydra.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from drdm.checkpoints import resolve_checkpoint
from drdm.deform import gaussian_smooth, integrate
from drdm.field_sources.bspline import MultiResolutionBSpline
from drdm.generation import DRDM
from drdm.utils.instantiate import build


class FieldSource:
    """Base of the field sources: the call interface, ``t0`` handling and the bank.

    Subclasses set :attr:`ndims` (``None``: any) and implement :meth:`generate`.

    Args:
        t0: the steps ``t0=None`` calls draw from (one per call); ``None``: the family has no
            steps (a call's ``t0`` is ignored).
        fields_per_image: ``K`` of the bank (module docstring); 0: no bank.
    """

    ndims: int | None = None

    def __init__(self, t0: int | Sequence[int] | None = None, fields_per_image: int = 0) -> None:
        if t0 is None:
            self.t0 = None
        else:
            self.t0 = [int(t) for t in t0] if isinstance(t0, Sequence) else [int(t0)]
            if not self.t0 or any(t < 0 for t in self.t0):
                raise ValueError(f"{type(self).__name__}: t0 must be steps >= 0, got {t0}")
        if isinstance(fields_per_image, bool) or int(fields_per_image) < 0:
            raise ValueError(
                f"{type(self).__name__}: fields_per_image must be an int >= 0 (0: no bank), "
                f"got {fields_per_image!r}"
            )
        self.fields_per_image = int(fields_per_image)
        # image key -> its generated fields [ndims, *S], on the device they were made on
        self.bank: dict[str | bytes, list[torch.Tensor]] = {}

    def generate(
        self, image: torch.Tensor, t0: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """New fields ``[B, ndims, *S]`` for ``image`` ``[B, C, *S]`` at ``t0`` ``[B]`` long."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        t0: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``[B, ndims, *S]`` voxels for ``image`` ``[B, C, *S]`` (module docstring)."""
        if isinstance(t0, torch.Generator):
            raise TypeError(
                f"{type(self).__name__}: pass the generator by name, source(image, "
                "generator=...); the second argument is t0"
            )
        if not isinstance(image, torch.Tensor) or image.ndim < 4:
            raise ValueError(f"{type(self).__name__}: image must be [B, C, *S], got {image!r}")
        if self.ndims is not None and image.ndim != self.ndims + 2:
            raise ValueError(
                f"{type(self).__name__}: image {tuple(image.shape)} does not match ndims="
                f"{self.ndims}"
            )
        if keys is not None and len(keys) != image.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {image.shape[0]} images")
        steps = self._steps(image, t0, generator)
        if not self.fields_per_image:
            return self._generate(image, steps, generator)
        return self._from_bank(image, steps, generator, keys)

    def _steps(self, image, t0, generator) -> torch.Tensor | None:
        """``t0`` as ``[B]`` long on the image's device (drawn from :attr:`t0` if ``None``)."""
        if self.t0 is None:
            return None
        if t0 is None:
            t0 = self.t0[int(torch.randint(len(self.t0), (1,), generator=generator))]
        steps = torch.as_tensor(t0, dtype=torch.long, device=image.device)
        return steps.expand(image.shape[0]) if steps.ndim == 0 else steps

    def _generate(self, image, steps, generator) -> torch.Tensor:
        field = self.generate(image, steps, generator)
        return field.to(image.device, image.dtype)

    def _from_bank(self, image, steps, generator, keys) -> torch.Tensor:
        """New fields for images with fewer than ``K`` banked, one of theirs for the others."""
        keys = [content_key(one) for one in image] if keys is None else [str(k) for k in keys]
        fresh = [
            row
            for row, key in enumerate(keys)
            if len(self.bank.get(key, ())) < self.fields_per_image
        ]
        field = torch.empty(
            image.shape[0], image.ndim - 2, *image.shape[2:], device=image.device, dtype=image.dtype
        )
        if fresh:
            rows = torch.tensor(fresh, device=image.device)
            made = self._generate(image[rows], None if steps is None else steps[rows], generator)
            field[rows] = made
            for row, one in zip(fresh, made):
                banked = self.bank.setdefault(keys[row], [])
                # an image picked twice in a batch may get two new fields: keep at most K
                if len(banked) < self.fields_per_image:
                    banked.append(one)
        for row, key in enumerate(keys):
            if row not in fresh:
                banked = self.bank[key]
                field[row] = banked[int(torch.randint(len(banked), (1,), generator=generator))]
        return field


def content_key(image: torch.Tensor) -> bytes:
    """A key naming an image by its shape and values (the same slice gives the same key)."""
    array = image.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.blake2b(str(array.shape).encode(), digest_size=16)
    digest.update(array.tobytes())
    return digest.digest()


class DRDMFieldSource(FieldSource):
    """Fields from a frozen, trained DRDM (``drdm.generation.DRDM``) for each given image.

    The DRDM is loaded lazily on first use and moved to the image's device, so fields are made
    on the training device inside the step. Images sharing a ``t0`` share one batched recovery
    chain; each such group draws one generation seed from ``generator``.

    Args:
        checkpoint: a trained DRDM (Lightning ``.ckpt``, the authors' ``.pth``, or ``"default"``:
            the packaged model); required, there is no silent fallback.
        t0: the diffusion start step(s) of ``t0=None`` calls; a list draws one per call.
        options: keyword arguments of :meth:`drdm.generation.DRDM.load` (e.g. ``start_step:
            t0``: the chain starts at ``t0 - 1``, not ``T - 1``; ``sampling_steps``).
        fields_per_image: the bank's ``K`` (module docstring); 0: no bank.
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        t0: int | Sequence[int] = 48,
        options: dict | None = None,
        fields_per_image: int = 0,
    ) -> None:
        if checkpoint is None or str(checkpoint) in ("", "???", "None"):
            raise ValueError(
                "the DRDM field source needs a trained DRDM checkpoint: set its checkpoint "
                "(model.field_sources.synthetic_drdm.checkpoint=path/to/drdm.ckpt for "
                "registration, drdm_checkpoint=path/to/drdm.ckpt for the drdm augmentation)"
            )
        super().__init__(t0, fields_per_image)
        self.checkpoint = resolve_checkpoint(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"DRDM checkpoint not found: {self.checkpoint}")
        self.options = dict(options or {})
        self._drdm = None

    def _model(self, device: torch.device):
        if self._drdm is None:
            self._drdm = DRDM.load(self.checkpoint, **self.options)
            for parameter in self._drdm.net.parameters():
                parameter.requires_grad_(False)
        if self._drdm.device != device:
            self._drdm.to(device)
        return self._drdm

    def generate(self, image, t0, generator) -> torch.Tensor:
        drdm = self._model(image.device)
        if image.ndim != drdm.ndims + 2:
            raise ValueError(
                f"image {tuple(image.shape)} does not match the {drdm.ndims}D DRDM "
                f"{self.checkpoint}"
            )
        ndims = image.ndim - 2
        field = torch.empty(image.shape[0], ndims, *image.shape[2:], device=image.device)
        # DRDM.generate takes one t0 per sample index, shared by its inputs
        for start in t0.unique().tolist():
            chosen = (t0 == start).nonzero().flatten()
            # generate() seeds each field from (seed, input, k): a fresh seed per group gives
            # new fields every call while a seeded generator keeps runs reproducible
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            out = drdm.generate(image[chosen], num_samples=1, t0=int(start), seed=seed)
            field[chosen] = out.displacement.reshape(len(chosen), ndims, *image.shape[2:]).to(field)
        return field


class ForwardDiffusionFieldSource(FieldSource):
    """The forward process only: a ``RandomDeformation`` field at step ``t0`` (no recovery).

    Args:
        deformation: a ``drdm.deform.RandomDeformation`` (or its Hydra config), the forward
            process of the DRDM it stands in for.
        t0, fields_per_image: as :class:`DRDMFieldSource`.
    """

    def __init__(
        self, deformation, t0: int | Sequence[int] = 48, fields_per_image: int = 0
    ) -> None:
        super().__init__(t0, fields_per_image)
        self.deformation = build(deformation)
        self.ndims = self.deformation.ndims

    def generate(self, image, t0, generator) -> torch.Tensor:
        process = self.deformation.to(image.device)
        return process.diffused(tuple(image.shape[2:]), t0, generator=generator)


class BSplineFieldSource(FieldSource):
    """MRBS fields: :class:`MultiResolutionBSpline` fields, independent of the image.

    Args:
        fields_per_image: the bank's ``K``.
        **spline: the arguments of :class:`MultiResolutionBSpline` (``ndims``, grid ``cells``,
            ``amplitudes`` in voxels or, with ``relative``, fractions of each axis,
            ``integration_steps``).
    """

    def __init__(self, fields_per_image: int = 0, **spline) -> None:
        super().__init__(None, fields_per_image)
        self.spline = MultiResolutionBSpline(**spline)
        self.ndims = self.spline.ndims

    def generate(self, image, t0, generator) -> torch.Tensor:
        return self.spline(
            image.shape[2:], image.shape[0], generator=generator, device=image.device
        )


class SmoothNoiseFieldSource(FieldSource):
    """Smoothed-noise stationary velocity fields, integrated (diffeomorphic).

    Args:
        ndims: 2 or 3.
        sigma: Gaussian smoothing of the noise in voxels (larger: smoother, more global).
        amplitude: standard deviation of the velocity after smoothing, in voxels.
        integration_steps: ``2^k`` scaling-and-squaring compositions.
        fields_per_image: the bank's ``K``.
    """

    def __init__(
        self,
        ndims: int = 2,
        sigma: float = 6.0,
        amplitude: float = 2.0,
        integration_steps: int = 5,
        fields_per_image: int = 0,
    ) -> None:
        if ndims not in (2, 3) or sigma <= 0 or amplitude < 0 or integration_steps < 0:
            raise ValueError(
                "SmoothNoiseFieldSource needs ndims in (2, 3), sigma > 0, amplitude >= 0, "
                f"integration_steps >= 0; got {ndims}, {sigma}, {amplitude}, {integration_steps}"
            )
        super().__init__(None, fields_per_image)
        self.ndims, self.sigma, self.amplitude = ndims, sigma, amplitude
        self.integration_steps = integration_steps

    def generate(self, image, t0, generator) -> torch.Tensor:
        shape = (image.shape[0], self.ndims, *image.shape[2:])
        # noise drawn where the generator lives (a CPU generator: the same field on any device)
        device = generator.device if generator is not None else image.device
        noise = torch.randn(shape, generator=generator, device=device)
        velocity = gaussian_smooth(noise, self.sigma)
        velocity = velocity * (self.amplitude / velocity.std().clamp(min=1e-8))
        count = 2**self.integration_steps
        steps = torch.full((shape[0],), count, dtype=torch.long, device=device)
        return integrate(velocity / count, steps, max_steps=count)
