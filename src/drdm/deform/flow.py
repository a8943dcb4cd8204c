"""Integration of a stationary velocity by self-composition: ``k``-fold powers of ``x -> x + v(x)``.

``integrate(velocity, steps)`` returns the displacement of applying the map ``x -> x + v(x)``
``steps[b]`` times to sample ``b``: ``u_{j+1} = compose(u_j, v) = v + u_j o (id + v)``, ``u_0 = 0``.
It builds the binary powers ``v, v^2, v^4, ...`` by squaring (``compose(p, p)``) and multiplies
together the powers whose bit is set in each sample's step count, so a batch whose largest count
is ``K`` costs about ``2 log2(K)`` resamplings instead of ``K``. Samples with different counts share
every resampling: a per-sample mask (``torch.where``) decides which powers enter each result.

All powers of one map commute, so the order in which the powers are multiplied does not matter in
exact arithmetic; with linear interpolation the squaring result differs from the one-step-at-a-time
loop by interpolation error only (see the tests for the measured tolerance). The highest power is
only read at the output points, so with ``region`` (e.g. the part of a control grid that an image
crop touches) the last squaring and the last multiplication are evaluated on that box alone: in
3D with the 2x field of view that is an eighth of two of the ~``2 log2(K)`` resamplings.
"""

from __future__ import annotations

import torch

from drdm.deform.spatial import check_displacement, compose, warp


def _check_steps(velocity: torch.Tensor, steps: torch.Tensor) -> None:
    if (
        not isinstance(steps, torch.Tensor)
        or steps.ndim != 1
        or steps.is_floating_point()
        or steps.shape[0] != velocity.shape[0]
    ):
        shape = tuple(steps.shape) if isinstance(steps, torch.Tensor) else type(steps).__name__
        raise ValueError(
            f"steps must be an integer tensor of shape [B] = [{velocity.shape[0]}] for velocity "
            f"{tuple(velocity.shape)}, got {shape}"
        )
    if steps.device != velocity.device:
        raise ValueError(f"steps is on {steps.device} but velocity is on {velocity.device}")


def _batch_mask(flags: torch.Tensor, ndims: int) -> torch.Tensor:
    return flags.view(-1, *([1] * (ndims + 1)))


def _check_region(velocity: torch.Tensor, region) -> tuple[tuple[int, int], ...]:
    spatial = tuple(velocity.shape[2:])
    if region is None:
        return tuple((0, n) for n in spatial)
    region = tuple((int(start), int(size)) for start, size in region)
    if len(region) != len(spatial) or any(
        start < 0 or size < 1 or start + size > n for (start, size), n in zip(region, spatial)
    ):
        raise ValueError(
            f"region must be one (start, size) per axis inside the grid {spatial}, got {region}"
        )
    return region


def integrate(
    velocity: torch.Tensor,
    steps: torch.Tensor,
    max_steps: int | None = None,
    region=None,
) -> torch.Tensor:
    """Displacement of the ``steps``-fold self-composition of ``x -> x + velocity(x)``.

    Args:
        velocity: ``[B, ndims, *spatial]`` float, in voxels (displacement of one step).
        steps: int ``[B]`` on velocity's device, ``>= 0`` (0 gives a zero field).
        max_steps: an upper bound on ``steps``. When given, the number of squarings is fixed by it
            and ``steps`` is never read back to the host (no device sync on accelerators); when
            omitted, ``steps`` is read to skip powers that no sample needs.
        region: ``((start, size), ...)``, one pair per spatial axis: return the field only on
            that box of the grid (the powers still cover the whole grid). ``None``: everywhere.

    Returns:
        ``[B, ndims, *spatial]`` (or ``[B, ndims, *sizes]`` of ``region``) displacement in voxels,
        differentiable w.r.t. ``velocity``.
    """
    ndims = check_displacement(velocity, "velocity")
    _check_steps(velocity, steps)
    region = _check_region(velocity, region)
    if max_steps is None:
        host_steps = steps.tolist()
        if any(s < 0 for s in host_steps):
            raise ValueError(f"steps must be >= 0, got {host_steps}")
        largest = max(host_steps, default=0)
        needed_bits = {
            bit for bit in range(largest.bit_length()) if any(s >> bit & 1 for s in host_steps)
        }
    else:
        largest = int(max_steps)
        needed_bits = set(range(largest.bit_length()))
    offset = tuple(start for start, _ in region)
    box = (..., *[slice(start, start + size) for start, size in region])
    bits = largest.bit_length()
    result = torch.zeros_like(velocity)  # on the whole grid until the highest power
    power = velocity
    empty = True  # result is still the zero field: composing with it is a copy
    for bit in range(bits):
        last = bit == bits - 1
        if last:
            # the highest power is only read at the box's own points (below): square it there
            power = _compose_on_box(power, power, box, offset) if bit > 0 else power[box]
        elif bit > 0:
            power = compose(power, power)
        if bit not in needed_bits:
            continue
        take = _batch_mask(((steps >> bit) & 1).bool(), ndims)
        if empty:
            combined = power
        elif last:
            # compose(result, power) = power + result o (id + power), on the box only
            combined = power + warp(result, power, padding="border", offset=offset)
        else:
            combined = compose(result, power)
        result = torch.where(take, combined, result[box] if last else result)
        empty = False
    # still on the whole grid when no power was needed (all steps 0)
    return result[box] if result.shape == velocity.shape else result


def _compose_on_box(first, second, box, offset) -> torch.Tensor:
    """``compose(first, second)`` evaluated on a box of the grid only."""
    second_box = second[box]
    return second_box + warp(first, second_box, padding="border", offset=offset)


def integrate_sequential(
    velocity: torch.Tensor, steps: torch.Tensor, resample: str = "displacement"
) -> torch.Tensor:
    """Same map as :func:`integrate`, one composition per step: ``O(max(steps))`` resamplings.

    Args:
        velocity, steps: as in :func:`integrate`.
        resample: ``"displacement"``: ``u <- v + u o (id + v)``, the reference algorithm, which
            re-interpolates the accumulated field at every step; ``"velocity"``:
            ``u <- u + v o (id + u)``, which only ever samples ``v`` and so is exact for the
            (piecewise linear) velocity: the end point of each voxel traced through ``k`` steps.
    """
    ndims = check_displacement(velocity, "velocity")
    _check_steps(velocity, steps)
    if resample not in ("displacement", "velocity"):
        raise ValueError(f"resample must be 'displacement' or 'velocity', got {resample!r}")
    result = torch.zeros_like(velocity)
    for step in range(int(steps.max()) if steps.numel() else 0):
        active = _batch_mask(steps > step, ndims)
        if resample == "displacement":
            composed = compose(result, velocity)
        else:
            composed = compose(velocity, result)
        result = torch.where(active, composed, result)
    return result


def exponentiate(velocity: torch.Tensor, squarings: int) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity: the ``2**squarings``-fold composition of
    ``x -> x + velocity(x) / 2**squarings`` (diffeomorphic for moderate velocities).

    Args:
        velocity: ``[B, ndims, *spatial]`` in voxels.
        squarings: ``k >= 0``; ``0`` returns the velocity itself (one step).

    Returns:
        ``[B, ndims, *spatial]`` displacement in voxels, differentiable w.r.t. ``velocity``.
    """
    if squarings < 0:
        raise ValueError(f"squarings must be >= 0, got {squarings}")
    count = 2 ** int(squarings)
    steps = torch.full((velocity.shape[0],), count, dtype=torch.long, device=velocity.device)
    return integrate(velocity / count, steps, max_steps=count)
