"""Registration metrics: TRE, field error, NCC, smoothness and the per-pair metric set."""

import pytest
import torch

from drdm.deform import warp
from drdm.losses import gradient_smoothness, local_ncc
from drdm.metrics.pairwise import (
    endpoint_error,
    pair_metrics,
    sample_at_points,
    target_registration_error,
)


def _affine_field(shape, matrix, offset):
    """``u(x) = A x + b`` on the voxel grid, ``[1, ndims, *shape]`` float64."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [ndims, *shape]
    field = torch.einsum("ij,j...->i...", matrix, grid) + offset.view(-1, *[1] * len(shape))
    return field[None]


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_tre_of_analytic_displacement_is_exact(shape):
    ndims = len(shape)
    generator = torch.Generator().manual_seed(0)
    matrix = 0.05 * torch.randn(ndims, ndims, generator=generator, dtype=torch.float64)
    offset = torch.randn(ndims, generator=generator, dtype=torch.float64)
    displacement = _affine_field(shape, matrix, offset)
    upper = torch.tensor(shape, dtype=torch.float64) - 1
    fixed = torch.rand(1, 7, ndims, generator=generator, dtype=torch.float64) * upper
    residual = torch.randn(1, 7, ndims, generator=generator, dtype=torch.float64)
    # linear interpolation reproduces an affine field exactly at off-grid points
    moving = fixed + fixed @ matrix.T + offset + residual
    spacing = torch.tensor([1.5, 0.7, 2.0][:ndims], dtype=torch.float64)
    tre = target_registration_error(displacement, fixed, moving, spacing)
    expected = (residual * spacing).norm(dim=-1)
    torch.testing.assert_close(tre, expected)
    # a perfect field has zero error
    perfect = target_registration_error(displacement, fixed, fixed + fixed @ matrix.T + offset)
    torch.testing.assert_close(perfect, torch.zeros(1, 7, dtype=torch.float64))


def test_sample_at_points_hits_grid_values():
    field = torch.rand(2, 3, 8, 9)
    points = torch.tensor([[[0.0, 0.0], [7.0, 8.0], [3.0, 5.0]]]).expand(2, -1, -1)
    sampled = sample_at_points(field, points)
    torch.testing.assert_close(sampled[:, 2], field[:, :, 3, 5])
    torch.testing.assert_close(sampled[:, 1], field[:, :, 7, 8])
    with pytest.raises(ValueError, match=r"points must be \[B, N, 2\]"):
        sample_at_points(field, torch.zeros(2, 3, 3))


def test_endpoint_error_of_a_shift_in_mm():
    shift = torch.zeros(2, 3, 6, 7, 8)
    shift[:, 0] = 3.0
    shift[:, 2] = 4.0
    spacing = torch.tensor([2.0, 1.0, 1.0])
    error = endpoint_error(torch.zeros_like(shift), shift, spacing)
    torch.testing.assert_close(error, torch.full((2,), 52.0**0.5))  # (6, 0, 4) mm
    mask = torch.zeros(2, 1, 6, 7, 8, dtype=torch.bool)
    mask[:, :, :2] = True
    torch.testing.assert_close(endpoint_error(shift, shift, spacing, mask), torch.zeros(2))


def test_local_ncc_and_smoothness():
    image = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(local_ncc(image, 3 * image + 1), torch.ones(2), atol=1e-3, rtol=0)
    assert (local_ncc(image, -image) < -0.99).all()
    assert (local_ncc(image, torch.rand(2, 1, 24, 24)).abs() < 0.2).all()
    # u_0 = 0.5 * x_1: squared difference 0.25 in one of 2 channels along one of 2 axes
    field = torch.zeros(1, 2, 10, 10)
    field[:, 0] = 0.5 * torch.arange(10.0)
    torch.testing.assert_close(gradient_smoothness(field), torch.tensor([0.25 / 4]))


def _square_labels(shape, low, high):
    label = torch.zeros(1, 1, *shape, dtype=torch.int64)
    label[0, 0, low[0] : high[0], low[1] : high[1]] = 1
    label[0, 0, low[0] : low[0] + 3, low[1] : high[1]] = 2
    return label


def test_pair_metrics_recover_a_known_shift():
    shape = (40, 40)
    moving_label = _square_labels(shape, (10, 12), (24, 26))
    shift = torch.zeros(1, 2, *shape)
    shift[:, 0], shift[:, 1] = 3.0, -2.0
    fixed_label = warp(moving_label, shift, mode="nearest")
    fixed_points = torch.tensor([[[15.0, 20.0], [20.0, 18.0]]])
    batch = {
        "moving_label": moving_label,
        "fixed_label": fixed_label,
        "fixed_keypoints": fixed_points,
        "moving_keypoints": fixed_points + torch.tensor([3.0, -2.0]),
        "displacement": shift,
        "spacing": torch.tensor([[1.0, 2.0]]),
    }
    exact = pair_metrics(shift, batch)
    torch.testing.assert_close(exact["dice"], torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(exact["hd95"], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(exact["asd"], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(exact["tre"], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(exact["field_error"], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(exact["folding_ratio"], torch.zeros(1, dtype=torch.float64))
    identity = pair_metrics(torch.zeros_like(shift), batch)
    assert identity["dice"].item() < 0.9
    assert identity["hd95"].item() > 1.0
    # every keypoint is off by (3, -2) voxels = (3, -4) mm
    torch.testing.assert_close(identity["tre"], torch.tensor([5.0], dtype=torch.float64))
    torch.testing.assert_close(identity["field_error"], torch.tensor([5.0], dtype=torch.float64))


def test_pair_metrics_skip_unlabelled_samples():
    shape = (16, 16)
    label = _square_labels(shape, (4, 4), (12, 12)).expand(2, -1, -1, -1).clone()
    label[1] = -1  # "no label" fill for the second sample
    batch = {"moving_label": label, "fixed_label": label}
    metrics = pair_metrics(torch.zeros(2, 2, *shape), batch)
    assert metrics["dice"][0].item() == pytest.approx(1.0)
    assert torch.isnan(metrics["dice"][1])
    assert "tre" not in metrics and "field_error" not in metrics


@pytest.mark.parametrize("shape", [(16, 18), (8, 10, 12)])
def test_identity_has_no_folding_and_zero_sd_log_jacobian(shape):
    zero = torch.zeros(2, len(shape), *shape)
    metrics = pair_metrics(zero, {})
    torch.testing.assert_close(metrics["folding_ratio"], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(metrics["sd_log_jacobian"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(16, 18), (8, 10, 12)])
def test_affine_field_jacobian_metrics(shape):
    # u(x) = A x + b has the constant Jacobian determinant det(I + A): no spread of log det J,
    # and every voxel folds exactly when det(I + A) <= 0
    ndims = len(shape)
    generator = torch.Generator().manual_seed(1)
    matrix = 0.1 * torch.randn(ndims, ndims, generator=generator, dtype=torch.float64)
    offset = torch.randn(ndims, generator=generator, dtype=torch.float64)
    smooth = _affine_field(shape, matrix, offset)
    metrics = pair_metrics(smooth, {})
    torch.testing.assert_close(metrics["folding_ratio"], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(
        metrics["sd_log_jacobian"], torch.zeros(1, dtype=torch.float64), atol=1e-6, rtol=0
    )
    flip = torch.zeros(ndims, ndims, dtype=torch.float64)
    flip[0, 0] = -1.5  # det(I + A) = -0.5 along axis 0
    folded = pair_metrics(_affine_field(shape, flip, offset), {})
    torch.testing.assert_close(folded["folding_ratio"], torch.ones(1, dtype=torch.float64))


def test_pair_metrics_recover_a_known_3d_affine_in_mm():
    # the moving landmarks follow an affine map exactly: its field gives TRE 0, the identity
    # gives the landmark displacement scaled by the anisotropic spacing
    shape = (12, 14, 10)
    generator = torch.Generator().manual_seed(2)
    matrix = 0.05 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    offset = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    field = _affine_field(shape, matrix, offset)
    fixed = torch.rand(1, 5, 3, generator=generator, dtype=torch.float64) * 8 + 1
    moving = fixed + fixed @ matrix.T + offset
    spacing = torch.tensor([[0.8, 1.2, 2.5]], dtype=torch.float64)
    batch = {"fixed_keypoints": fixed, "moving_keypoints": moving, "spacing": spacing}
    exact = pair_metrics(field, batch)
    torch.testing.assert_close(exact["tre"], torch.zeros(1, dtype=torch.float64))
    identity = pair_metrics(torch.zeros_like(field), {**batch, "displacement": field})
    expected = ((moving - fixed) * spacing).norm(dim=-1).mean(1)
    torch.testing.assert_close(identity["tre"], expected)
    millimetres = (field * spacing.view(1, 3, 1, 1, 1)).norm(dim=1).mean()
    torch.testing.assert_close(identity["field_error"], millimetres.view(1))
