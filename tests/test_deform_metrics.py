"""Field metrics and units: Jacobian, folding, magnitude, inverse consistency, world mm."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drdm.deform import (
    displacement_stats,
    displacement_to_world,
    folding_ratio,
    identity_grid,
    inverse_consistency_error,
    jacobian_determinant,
    sd_log_jacobian,
)

_matrix_entries = st.floats(-0.6, 0.6, allow_nan=False)


def _affine_field(matrix: torch.Tensor, shape) -> torch.Tensor:
    """Displacement ``u(x) = (A - I) x`` of the linear map ``x -> A x``, ``[1, ndims, *shape]``."""
    grid = identity_grid(shape, dtype=torch.float64)
    mapped = torch.einsum("ij,j...->i...", matrix, grid)
    return (mapped - grid).unsqueeze(0)


@settings(max_examples=10, deadline=None)
@given(entries=st.lists(_matrix_entries, min_size=9, max_size=9), ndims=st.sampled_from([2, 3]))
def test_jacobian_of_linear_map_is_its_determinant_everywhere(entries, ndims):
    matrix = torch.eye(ndims, dtype=torch.float64) + torch.tensor(entries[: ndims * ndims]).view(
        ndims, ndims
    ).to(torch.float64)
    shape = (9, 8, 7)[:ndims]
    det = jacobian_determinant(_affine_field(matrix, shape))
    assert det.shape == (1, *shape)
    # central and one-sided differences are both exact for a linear field, borders included
    torch.testing.assert_close(det, torch.full_like(det, torch.linalg.det(matrix).item()))


@settings(max_examples=6, deadline=None)
@given(spacing=st.lists(st.floats(0.3, 4.0), min_size=3, max_size=3))
def test_determinant_of_voxel_field_does_not_depend_on_spacing(spacing):
    generator = torch.Generator().manual_seed(0)
    field = torch.randn(2, 3, 6, 7, 8, generator=generator, dtype=torch.float64) * 0.3
    plain = jacobian_determinant(field)
    torch.testing.assert_close(jacobian_determinant(field, spacing=spacing), plain)
    batched = torch.tensor([spacing, spacing[::-1]], dtype=torch.float64)
    torch.testing.assert_close(jacobian_determinant(field, spacing=batched), plain)


def test_folding_ratio_counts_a_mirrored_region():
    # x -> -x along axis 1 on the right half of the image: det = -1 there, +1 elsewhere
    shape = (10, 20)
    grid = identity_grid(shape)
    displacement = torch.zeros(1, 2, *shape)
    displacement[0, 1, :, 12:] = -2 * grid[1, :, 12:] + 31  # mirrored columns 12..19 onto 19..12
    ratio = folding_ratio(displacement)
    # columns 13..19 are mirrored; column 12's central difference spans 11 -> 11 and 13 -> 18,
    # which still increases: 7 of 20 columns fold
    assert ratio.shape == (1,)
    assert ratio.item() == pytest.approx(7 / 20)
    assert folding_ratio(torch.zeros(3, 2, *shape)).tolist() == [0.0, 0.0, 0.0]


def test_jacobian_determinant_is_differentiable_for_a_folding_loss():
    field = (torch.randn(1, 2, 12, 12) * 2).requires_grad_(True)
    loss = torch.relu(-jacobian_determinant(field)).mean()
    assert loss > 0
    loss.backward()
    assert field.grad is not None and field.grad.abs().sum() > 0


def test_sd_log_jacobian_is_zero_for_translations_and_grows_with_roughness():
    shape = (16, 16)
    translation = torch.full((1, 2, *shape), 3.5)
    assert sd_log_jacobian(translation).item() == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 2, *shape, generator=generator)
    assert sd_log_jacobian(0.05 * noise) < sd_log_jacobian(0.2 * noise)


def test_displacement_stats_in_voxels_and_fractions():
    displacement = torch.zeros(2, 2, 40, 20)
    displacement[0, 0] = 4.0  # 4 voxels along axis 0 = 10% of 40
    displacement[1, 1, 0, 0] = 5.0  # one voxel moves 5 voxels along axis 1 = 25% of 20
    stats = displacement_stats(displacement)
    torch.testing.assert_close(stats["max_voxels"], torch.tensor([4.0, 5.0]))
    torch.testing.assert_close(stats["mean_voxels"], torch.tensor([4.0, 5.0 / 800]))
    torch.testing.assert_close(stats["max_fraction"], torch.tensor([0.1, 0.25]))
    torch.testing.assert_close(stats["mean_fraction"], torch.tensor([0.1, 0.25 / 800]))


def test_inverse_consistency_error_of_exact_and_wrong_pairs():
    shift = torch.zeros(1, 3, 8, 8, 8)
    shift[:, 0] = 1.5
    assert inverse_consistency_error(shift, -shift).item() == pytest.approx(0.0, abs=1e-6)
    # the same shift twice is off by twice its length
    assert inverse_consistency_error(shift, shift).item() == pytest.approx(3.0, rel=1e-5)


def test_displacement_to_world_applies_the_linear_part():
    affine = torch.tensor(
        [[0.0, 0.0, 2.0, 10.0], [-1.5, 0.0, 0.0, 5.0], [0.0, 3.0, 0.0, -7.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )  # axis 0 -> -y (1.5 mm), axis 1 -> z (3 mm), axis 2 -> x (2 mm); translation ignored
    displacement = torch.zeros(2, 3, 4, 5, 6)
    displacement[:, 0] = 1.0
    displacement[1, 2] = -2.0
    world = displacement_to_world(displacement, affine)
    assert world.shape == displacement.shape and world.dtype == displacement.dtype
    torch.testing.assert_close(world[0, :, 0, 0, 0], torch.tensor([0.0, -1.5, 0.0]))
    torch.testing.assert_close(world[1, :, 3, 4, 5], torch.tensor([-4.0, -1.5, 0.0]))
    # 2D fields: a homogeneous 3x3 per sample, or the top-left block of a 4x4
    planar = torch.ones(2, 2, 3, 3)
    scales = torch.stack([torch.diag(torch.tensor([2.0, 3.0, 1.0]))] * 2)
    torch.testing.assert_close(
        displacement_to_world(planar, scales)[:, :, 0, 0], torch.tensor([[2.0, 3.0]] * 2)
    )
    torch.testing.assert_close(
        displacement_to_world(planar, affine)[0, :, 1, 1], torch.tensor([0.0, -1.5])
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: jacobian_determinant(torch.zeros(1, 3, 8, 8)), r"\(1, 3, 8, 8\)"),
        (lambda: jacobian_determinant(torch.zeros(1, 2, 8, 8), spacing=[1.0, 2.0, 3.0]), r"\(3,\)"),
        (lambda: folding_ratio(torch.zeros(1, 2, 8, 8, dtype=torch.int64)), "floating-point"),
        (lambda: displacement_to_world(torch.zeros(1, 3, 4, 4, 4), torch.eye(2)), r"\(1, 2, 2\)"),
        (
            lambda: inverse_consistency_error(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9)),
            r"\(1, 2, 8, 9\)",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()
