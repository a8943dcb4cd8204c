"""warp / compose: the conventions every other module relies on."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drdm.deform import compose, warp


def _random_field(shape, amplitude=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ndims = len(shape)
    coarse = torch.randn(1, ndims, *[4] * ndims, generator=generator) * amplitude
    mode = "bilinear" if ndims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(32, 40), (16, 18, 20)])
def test_zero_field_is_identity(shape):
    image = torch.rand(2, 3, *shape)
    zero = torch.zeros(2, len(shape), *shape)
    torch.testing.assert_close(warp(image, zero), image)


@pytest.mark.parametrize("shape", [(32, 40), (16, 18, 20)])
def test_integer_shift_matches_roll(shape):
    ndims = len(shape)
    image = torch.rand(1, 1, *shape)
    shift = [2, -3, 1][:ndims]
    displacement = torch.zeros(1, ndims, *shape)
    for axis, s in enumerate(shift):
        displacement[:, axis] = s
    warped = warp(image, displacement)
    # pull-back by +s reads image(x + s): torch.roll by -s, valid away from the wrapped border
    rolled = torch.roll(image, shifts=[-s for s in shift], dims=list(range(2, 2 + ndims)))
    valid = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape, strict=True))
    torch.testing.assert_close(warped[(..., *valid)], rolled[(..., *valid)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_compose_matches_sequential_warps(shape):
    # a smooth image, so that the extra interpolation of the sequential path costs little
    image = _random_field(shape, amplitude=1.0, seed=3)[:, :1]
    first, second = _random_field(shape, seed=1), _random_field(shape, seed=2)
    sequential = warp(warp(image, first, padding="border"), second, padding="border")
    direct = warp(image, compose(first, second), padding="border")
    swapped = warp(image, compose(second, first), padding="border")
    inner = (..., *[slice(4, n - 4) for n in shape])
    error = (sequential - direct)[inner].abs().mean()
    # the order matters: the other order must be clearly worse, and ours close to exact
    assert error < 0.4 * (sequential - swapped)[inner].abs().mean()
    assert error < 0.15 * (sequential - image)[inner].abs().mean()


def test_compose_with_zero_is_identity():
    field = _random_field((24, 24))
    zero = torch.zeros_like(field)
    torch.testing.assert_close(compose(field, zero), field)
    torch.testing.assert_close(compose(zero, field), field)


def test_nearest_warp_keeps_label_set():
    label = torch.randint(0, 4, (1, 1, 32, 32))
    warped = warp(label, _random_field((32, 32), amplitude=3.0), mode="nearest", padding="border")
    assert warped.dtype == label.dtype
    assert set(warped.unique().tolist()) <= set(label.unique().tolist())


@pytest.mark.parametrize(
    ("image", "displacement", "match"),
    [
        (torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8), "channels"),
        (torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8), "shape"),
        (torch.rand(1, 1, 8, 9), torch.zeros(1, 2, 8, 8), r"\(1, 1, 8, 9\)"),
        (torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_input_raises_value_error_naming_shapes(image, displacement, match):
    with pytest.raises(ValueError, match=match):
        warp(image, displacement)


# property-based versions of the conventions above, over random shapes, shifts and fields
_shapes = st.one_of(
    st.tuples(st.integers(4, 24), st.integers(4, 24)),
    st.tuples(st.integers(4, 10), st.integers(4, 10), st.integers(4, 10)),
)


@settings(max_examples=8, deadline=None)
@given(shape=_shapes, data=st.data())
def test_integer_shift_matches_roll_for_any_shape_and_shift(shape, data):
    ndims = len(shape)
    shift = [data.draw(st.integers(-(n // 2), n // 2)) for n in shape]
    image = torch.rand(2, 2, *shape, dtype=torch.float64)
    displacement = torch.tensor(shift, dtype=torch.float64).view(1, ndims, *[1] * ndims)
    warped = warp(image, displacement.expand(2, ndims, *shape).contiguous())
    rolled = torch.roll(image, shifts=[-s for s in shift], dims=list(range(2, 2 + ndims)))
    valid = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape, strict=True))
    torch.testing.assert_close(warped[(..., *valid)], rolled[(..., *valid)])
    # outside the image, zeros padding reads zeros (up to rounding of the sampling positions)
    if any(shift):
        outside = torch.ones(shape, dtype=torch.bool)
        outside[valid] = False
        assert torch.all(warped[..., outside].abs() < 1e-9)


@settings(max_examples=8, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**16), amplitude=st.floats(0.0, 4.0))
def test_zero_field_identity_and_compose_with_zero(shape, seed, amplitude):
    ndims = len(shape)
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn(1, ndims, *shape, generator=generator, dtype=torch.float64) * amplitude
    zero = torch.zeros_like(field)
    image = torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(warp(image, zero), image)
    torch.testing.assert_close(compose(field, zero), field)
    torch.testing.assert_close(compose(zero, field), field)


@settings(max_examples=8, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**16), labels=st.integers(2, 6))
def test_nearest_warp_keeps_label_set_for_any_field(shape, seed, labels):
    ndims = len(shape)
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, labels, (1, 1, *shape), generator=generator)
    field = torch.randn(1, ndims, *shape, generator=generator) * 3
    warped = warp(label, field, mode="nearest", padding="border")
    assert warped.dtype == label.dtype
    assert set(warped.unique().tolist()) <= set(label.unique().tolist())


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((20, 24), (slice(3, 11), slice(0, 24))),
        ((10, 12, 14), (slice(2, 7), slice(5, 12), slice(1, 4))),
    ],
)
def test_warp_on_a_box_equals_the_box_of_the_full_warp(shape, box):
    image = torch.rand(2, 3, *shape, dtype=torch.float64)
    field = _random_field(shape).double().expand(2, -1, *shape)
    index = (..., *box)
    offset = tuple(part.start for part in box)
    on_box = warp(image, field[index].contiguous(), offset=offset)
    assert on_box.shape == (2, 3, *[part.stop - part.start for part in box])
    torch.testing.assert_close(on_box, warp(image, field)[index], atol=1e-12, rtol=0)


def test_warp_box_outside_the_image_raises():
    image = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\) at offset \(6, 0\)"):
        warp(image, torch.zeros(1, 2, 4, 4), offset=(6, 0))
