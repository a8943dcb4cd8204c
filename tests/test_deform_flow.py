"""integrate: binary powers of a map against one composition per step."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from drdm.deform import integrate, integrate_sequential


def _smooth_velocity(shape, amplitude=0.15, batch=2, seed=0):
    """A smooth velocity (bicubic/trilinear from a 5-point grid), float64, in voxels per step."""
    generator = torch.Generator().manual_seed(seed)
    ndims = len(shape)
    coarse = torch.randn(batch, ndims, *[5] * ndims, generator=generator, dtype=torch.float64)
    mode = "bicubic" if ndims == 2 else "trilinear"
    return F.interpolate(coarse * amplitude, size=shape, mode=mode, align_corners=True)


def _relative_error(result, truth, margin=0):
    inner = (..., *[slice(margin, n - margin) for n in truth.shape[2:]])
    return ((result - truth)[inner].norm(dim=1).mean() / truth[inner].norm(dim=1).mean()).item()


@pytest.mark.parametrize(("shape", "tolerance"), [((32, 32), 0.02), ((16, 16, 16), 0.04)])
def test_integrate_matches_exact_step_by_step_map(shape, tolerance):
    # resample="velocity" traces every voxel through k steps of the piecewise linear velocity:
    # the exact k-fold map at the grid points. Squaring re-interpolates log2(k) times: it stays
    # within 2% (2D, 32^2) / 4% (3D, a coarse 16^3 grid) of it, in mean length, up to k = 40
    # (measured: 0.9% / 3.5% at k = 40, where the reference's one-step loop is off by 7% / 17%).
    velocity = _smooth_velocity(shape)
    for k in (1, 2, 5, 13, 40):
        steps = torch.tensor([k, k])
        exact = integrate_sequential(velocity, steps, resample="velocity")
        assert _relative_error(integrate(velocity, steps), exact) < tolerance, k


def test_integrate_is_closer_to_exact_than_the_reference_loop():
    # the reference loop re-interpolates the accumulated field every step; squaring does it
    # log2(k) times, so it is the more accurate of the two
    velocity = _smooth_velocity((32, 32))
    steps = torch.tensor([40, 40])
    exact = integrate_sequential(velocity, steps, resample="velocity")
    loop = integrate_sequential(velocity, steps, resample="displacement")
    assert _relative_error(integrate(velocity, steps), exact) < 0.5 * _relative_error(loop, exact)


def test_integrate_matches_reference_loop_for_few_steps():
    velocity = _smooth_velocity((32, 32))
    for k in (1, 2, 3, 7):
        steps = torch.tensor([k, k])
        loop = integrate_sequential(velocity, steps)
        # 1 and 2 steps are the same resamplings; up to 7 steps within 1.5% (mean length)
        assert _relative_error(integrate(velocity, steps), loop) < (1e-12 if k <= 2 else 0.015)


@settings(max_examples=8, deadline=None)
@given(
    steps=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    shift=st.tuples(st.floats(-0.4, 0.4), st.floats(-0.4, 0.4)),
)
def test_constant_velocity_integrates_to_k_times_it(steps, shift):
    # a translation composes exactly (border padding keeps it constant): k steps move k * shift
    velocity = torch.tensor(shift, dtype=torch.float64).view(1, 2, 1, 1).expand(len(steps), 2, 8, 9)
    result = integrate(velocity.contiguous(), torch.tensor(steps))
    expected = torch.tensor(steps, dtype=torch.float64).view(-1, 1, 1, 1) * velocity
    torch.testing.assert_close(result, expected, atol=1e-9, rtol=1e-9)


def test_per_sample_steps_equal_separate_runs():
    velocity = _smooth_velocity((24, 24), batch=3)
    steps = torch.tensor([0, 5, 12])
    batched = integrate(velocity, steps)
    assert torch.count_nonzero(batched[0]) == 0
    for b in range(3):
        alone = integrate(velocity[b : b + 1], steps[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone)
    # an upper bound instead of reading steps gives the same field
    torch.testing.assert_close(integrate(velocity, steps, max_steps=200), batched)


def test_integrate_is_differentiable():
    velocity = _smooth_velocity((16, 16), batch=1).requires_grad_(True)
    integrate(velocity, torch.tensor([6])).square().sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("velocity", "steps", "match"),
    [
        (torch.zeros(2, 2, 8, 8), torch.tensor([1, 2, 3]), r"\[2\].*\(3,\)"),
        (torch.zeros(2, 2, 8, 8), torch.tensor([1.0, 2.0]), "integer"),
        (torch.zeros(2, 2, 8, 8, dtype=torch.int32), torch.tensor([1, 2]), r"\(2, 2, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), r"\(2, 3, 8, 8\)"),
        (torch.zeros(2, 2, 8, 8), torch.tensor([1, -2]), ">= 0"),
    ],
)
def test_bad_input_raises_value_error(velocity, steps, match):
    with pytest.raises(ValueError, match=match):
        integrate(velocity, steps)


@settings(max_examples=6, deadline=None)
@given(
    steps=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    start=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    size=st.tuples(st.integers(1, 10), st.integers(1, 10)),
)
def test_region_equals_the_box_of_the_full_field(steps, start, size):
    # only the last squaring and multiplication are restricted to the box: same numbers
    velocity = _smooth_velocity((16, 16), batch=len(steps))
    steps = torch.tensor(steps)
    region = tuple(zip(start, size))
    box = (..., *[slice(s, s + n) for s, n in region])
    on_box = integrate(velocity, steps, region=region)
    assert on_box.shape == (len(steps), 2, *size)
    torch.testing.assert_close(on_box, integrate(velocity, steps)[box], atol=1e-12, rtol=0)
    torch.testing.assert_close(
        integrate(velocity, steps, max_steps=64, region=region), on_box, atol=1e-12, rtol=0
    )


def test_region_outside_the_grid_raises():
    with pytest.raises(ValueError, match=r"region.*\(8, 8\)"):
        integrate(torch.zeros(1, 2, 8, 8), torch.tensor([3]), region=((4, 6), (0, 8)))
