"""The DRDM forward process: a random deformation whose size grows with the step ``t``.

For a batch of steps ``t`` (int ``[B]``), :class:`RandomDeformation` returns

* ``diffused``: the field that deforms the image at step ``t``: ``k_diff(t)``-fold self-composition
  of the perturbed velocity ``v0 = v + n o (id + v)``;
* ``target``: the recovery target, the ``k_rec(t)``-fold self-composition of the clean ``v``.

Both are ``[B, ndims, *shape]`` in image voxels. The velocities live on a control grid of
``control_size`` points per axis spanning ``crop_factor`` times the image (see
:mod:`drdm.deform.sampling`); integration happens on that grid and only the central, kept region
is resampled onto the image grid.

**Scale.** ``v_scale`` is the standard deviation of the finest noise level of the per-step
velocity, as a fraction of the control grid's field of view (``crop_factor`` x the image size,
per axis). Level ``s`` of ``levels`` gets ``v_scale * C / s``. The resulting field, as a fraction
of the image size, does not depend on the image resolution. The reference's ``v_scale = 4e-5``
has exactly this meaning at 128 voxels; its unit conversion multiplies the field by
``image_size / 128`` elsewhere (x2 at 256, x0.5 at 64). ``integrator="reference"`` keeps that
behaviour (one composition per step, the reference's conversion) for comparisons.

**Integrators.** ``"squaring"`` (default): binary powers of the map, ``O(log k)`` resamplings,
closer to the exact k-fold map than the one-step loop (see :mod:`drdm.deform.flow`), its last
squaring and multiplication evaluated only on the control points the kept image voxels read;
``"sequential"``: one composition per step, resampling only the velocity (the exact k-fold map of
the piecewise linear velocity, ``O(k)``; same units as ``"squaring"``); ``"reference"``: the
authors' loop (re-interpolating the accumulated field each step) and their resolution-dependent
unit conversion. ``refinement > 1`` integrates the same velocity on a grid that many times finer
than the control grid: the composed maps are represented more finely, which removes most of the
folding that large steps ``t`` show on the control grid (cost ``refinement**ndims``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drdm.deform.flow import integrate, integrate_sequential
from drdm.deform.sampling import kept_support, multiscale_noise, resample_box
from drdm.deform.schedule import power_steps, power_steps_bound
from drdm.deform.spatial import warp

INTEGRATORS = ("squaring", "sequential", "reference")
# the authors' v_scale, which means this only with integrator="reference" (their unit conversion);
# the default below is conf/deformation/base.yaml's (tests/test_deform_forward.py checks it)
REFERENCE_V_SCALE = 4e-5


class RandomDeformation(nn.Module):
    """DRDM forward process (method doc section 2); parameter-free, runs on ``t``'s device.

    Args:
        ndims: 2 or 3.
        timesteps: number of diffusion steps ``T`` (``t`` in ``0 .. T-1``).
        control_size: control-grid points per axis ``C``.
        levels: noise levels at sizes ``C, C/2, ..., C/2**(levels-1)``.
        v_scale: finest-level std of the per-step velocity, fraction of the control field of view.
        noise_ratio: amplitude of the perturbation ``n`` relative to ``v``.
        diffusion_factor, diffusion_exponent, diffusion_min_steps, diffusion_max_steps:
            ``k_diff(t) = clamp(floor(factor * t**exponent), min, max)``.
        recovery_factor, recovery_exponent: ``k_rec(t) = floor(factor * t**exponent)``.
        crop_factor: the control grid spans ``crop_factor`` x the image per axis.
        integrator: ``"squaring"``, ``"sequential"`` or ``"reference"`` (see module docstring).
        refinement: integrate on a grid ``refinement`` x finer than the control grid (int >= 1).
    """

    def __init__(
        self,
        ndims: int = 2,
        timesteps: int = 80,
        control_size: int = 64,
        levels: int = 4,
        v_scale: float = 8e-5,
        noise_ratio: float = 0.08,
        diffusion_factor: float = 2 / 3,
        diffusion_exponent: float = 1.3,
        diffusion_min_steps: int = 1,
        diffusion_max_steps: int = 200,
        recovery_factor: float = 1.0,
        recovery_exponent: float = 0.6,
        crop_factor: float = 2.0,
        integrator: str = "squaring",
        refinement: int = 1,
    ) -> None:
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
        if integrator == "reference" and refinement != 1:
            raise ValueError(
                f"integrator='reference' integrates on the control grid, refinement={refinement}"
            )
        if timesteps < 1 or control_size < 2 or v_scale < 0 or crop_factor < 1 or refinement < 1:
            raise ValueError(
                "need timesteps >= 1, control_size >= 2, v_scale >= 0, crop_factor >= 1, "
                f"refinement >= 1; got {timesteps}, {control_size}, {v_scale}, {crop_factor}, "
                f"{refinement}"
            )
        if levels < 1 or control_size % 2 ** (levels - 1) != 0:
            raise ValueError(
                f"control_size {control_size} must be divisible by 2**(levels - 1), levels={levels}"
            )
        self.ndims = ndims
        self.timesteps = timesteps
        self.control_size = control_size
        self.levels = levels
        self.v_scale = v_scale
        self.noise_ratio = noise_ratio
        self.diffusion_schedule = dict(
            factor=diffusion_factor,
            exponent=diffusion_exponent,
            min_steps=diffusion_min_steps,
            max_steps=diffusion_max_steps,
        )
        self.recovery_schedule = dict(factor=recovery_factor, exponent=recovery_exponent)
        self.crop_factor = crop_factor
        self.integrator = integrator
        self.refinement = refinement

    def extra_repr(self) -> str:
        return (
            f"ndims={self.ndims}, timesteps={self.timesteps}, control_size={self.control_size}, "
            f"levels={self.levels}, v_scale={self.v_scale}, integrator={self.integrator!r}"
        )

    def diffusion_steps(self, t: torch.Tensor) -> torch.Tensor:
        """``k_diff(t)``, int64 ``[B]`` on t's device."""
        return power_steps(t, **self.diffusion_schedule)

    def recovery_steps(self, t: torch.Tensor) -> torch.Tensor:
        """``k_rec(t)``, int64 ``[B]`` on t's device."""
        return power_steps(t, **self.recovery_schedule)

    def _check_call(self, shape, t: torch.Tensor) -> tuple[int, ...]:
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != self.ndims:
            raise ValueError(f"shape must be {self.ndims} ints for ndims={self.ndims}, got {shape}")
        shape = tuple(int(s) for s in shape)
        if min(shape) < 1:
            raise ValueError(f"shape must be positive, got {shape}")
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be an integer tensor of shape [B], got {got}")
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() >= self.timesteps):
            raise ValueError(f"t must lie in 0 .. {self.timesteps - 1}, got {t.tolist()}")
        return shape

    def velocities(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and perturbed per-step velocities on the control grid, in control voxels.

        Returns ``(v, v0)``, each ``[batch, ndims, C, ..., C]``: ``v0 = v + n o (id + v)``.
        """
        # a fraction f of the control field of view is f * C control voxels
        scale = self.v_scale * self.control_size
        args = (batch, self.ndims, self.control_size, self.levels)
        clean = multiscale_noise(*args, scale, generator, device, dtype)
        if self.noise_ratio == 0:
            return clean, clean
        noise = multiscale_noise(*args, scale * self.noise_ratio, generator, device, dtype)
        perturbed = clean + warp(noise, clean, padding="border")
        return clean, perturbed

    def _refine(self, velocity: torch.Tensor) -> torch.Tensor:
        """The same piecewise linear velocity on a ``refinement`` x finer grid, in its voxels."""
        if self.refinement == 1:
            return velocity
        mode = "bilinear" if self.ndims == 2 else "trilinear"
        fine = F.interpolate(velocity, scale_factor=self.refinement, mode=mode)
        return fine * self.refinement

    def _integrate(
        self, velocity: torch.Tensor, steps: torch.Tensor, bound: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The k-fold field on the image grid, in image voxels (see module docstring)."""
        velocity = self._refine(velocity)
        # the result is needed only at the control points that the kept image voxels read
        weights, region = kept_support(tuple(velocity.shape[2:]), shape, self.crop_factor)
        if self.integrator == "squaring":
            # on CPU reading steps is free and lets small t skip powers; elsewhere use the bound
            host_bound = None if steps.device.type == "cpu" else bound
            box = integrate(velocity, steps, host_bound, region=region)
        else:
            resample = "velocity" if self.integrator == "sequential" else "displacement"
            field = integrate_sequential(velocity, steps, resample=resample)
            box = field[(..., *[slice(first, first + n) for first, n in region])]
        return self._to_image_voxels(resample_box(box, weights), velocity.shape[2], shape)

    def _to_image_voxels(
        self, field: torch.Tensor, grid_size: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Grid voxels (of a ``grid_size`` grid) to image voxels, per axis."""
        size = torch.tensor(shape, device=field.device, dtype=field.dtype)
        if self.integrator == "reference":
            # reference: (control voxels / C) * S / C, read as a fraction of S -> S^2 / C^2
            factor = size**2 / self.control_size**2
        else:
            # one grid voxel is crop_factor * S / grid_size image voxels along each axis
            factor = size * self.crop_factor / grid_size
        return field * factor.view(1, self.ndims, *([1] * self.ndims))

    def forward(
        self,
        shape,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the diffused and recovery-target fields for steps ``t``.

        Args:
            shape: image shape, ``ndims`` ints.
            t: int ``[B]``; the fields are generated on ``t.device``.
            generator: a ``torch.Generator`` for determinism (CPU or on ``t.device``).
            dtype: float dtype of the outputs.

        Returns:
            ``(diffused, target)``, each ``[B, ndims, *shape]`` in image voxels.
        """
        shape = self._check_call(shape, t)
        clean, perturbed = self.velocities(t.shape[0], generator, t.device, dtype)
        target = self._integrate(
            clean,
            self.recovery_steps(t),
            power_steps_bound(self.timesteps, **self.recovery_schedule),
            shape,
        )
        return self._diffuse(perturbed, t, shape), target

    def diffused(
        self,
        shape,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Only the diffused field of :meth:`forward` (the same field for the same generator
        state), ``[B, ndims, *shape]`` image voxels: augmentation needs no recovery target, and
        skipping its integration halves the cost."""
        shape = self._check_call(shape, t)
        _, perturbed = self.velocities(t.shape[0], generator, t.device, dtype)
        return self._diffuse(perturbed, t, shape)

    def _diffuse(self, perturbed: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
        bound = power_steps_bound(self.timesteps, **self.diffusion_schedule)
        return self._integrate(perturbed, self.diffusion_steps(t), bound, shape)


def random_deformation(
    shape, t: torch.Tensor, generator: torch.Generator | None = None, **deformation
) -> torch.Tensor:
    """Diffused displacement ``[B, ndims, *shape]`` (voxels) at steps ``t`` (int ``[B]``).

    ``deformation`` holds any :class:`RandomDeformation` argument (``ndims``: from ``shape``).
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) not in (2, 3):
        raise ValueError(f"shape must be a tuple of 2 or 3 ints, got {shape}")
    deformation.setdefault("ndims", len(shape))
    return RandomDeformation(**deformation).diffused(shape, t, generator)
