"""The §4 training objective: each term's defining property, units and weighting."""

import pytest
import torch

from drdm.deform import compose, jacobian_determinant, warp
from drdm.losses import (
    DRDMLoss,
    direction_similarity,
    negative_jacobian_penalty,
    regularisation,
    relative_squared_error,
    smoothness_l1,
    to_normalised,
)


def smooth_field(shape, amplitude=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ndims = len(shape)
    coarse = torch.randn(1, ndims, *[4] * ndims, generator=generator) * amplitude
    mode = "bilinear" if ndims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(16, 20), (8, 10, 12)])
def test_relative_squared_error_is_zero_for_exact_recovery_and_one_for_none(shape):
    target = smooth_field(shape)
    assert relative_squared_error(-target, target) < 1e-6
    # predicting nothing leaves the whole target: |d|^2 / |d|^2 = 1 wherever d != 0
    assert relative_squared_error(torch.zeros_like(target), target) == pytest.approx(1.0, 1e-3)
    assert relative_squared_error(-0.5 * target, target) == pytest.approx(0.25, 1e-3)


def test_relative_squared_error_is_finite_for_a_zero_target():
    zero = torch.zeros(2, 2, 8, 8)
    value = relative_squared_error(torch.ones_like(zero), zero)
    assert torch.isfinite(value) and value > 0


def test_direction_similarity_is_minus_one_when_antiparallel():
    target = smooth_field((16, 16)) + 0.5  # no zero vectors
    assert direction_similarity(-3.0 * target, target) == pytest.approx(-1.0, abs=1e-4)
    assert direction_similarity(2.0 * target, target) == pytest.approx(1.0, abs=1e-4)
    rotated = torch.stack([-target[:, 1], target[:, 0]], dim=1)  # 90 degrees everywhere
    assert direction_similarity(rotated, target).abs() < 1e-4


def test_direction_similarity_is_zero_not_nan_for_zero_fields():
    zero = torch.zeros(1, 2, 8, 8)
    assert direction_similarity(zero, zero) == 0.0


def test_smoothness_ignores_translations_and_ripples_below_the_dead_zone():
    translation = torch.ones(1, 2, 16, 16) * 3.0
    assert smoothness_l1(translation) == 0.0
    ripple = torch.zeros(1, 2, 16, 16)
    ripple[:, :, ::2] = 1e-5  # difference 1e-5 voxels, far below 1e-4 normalised units
    assert smoothness_l1(ripple) == 0.0
    assert smoothness_l1(smooth_field((16, 16))) > 0


def test_smoothness_is_in_normalised_units():
    # a ramp of slope s voxels/voxel along axis 0 has normalised differences 2 s / (n - 1)
    n = 33
    ramp = torch.zeros(1, 2, n, n)
    ramp[:, 0] = 0.1 * torch.arange(n, dtype=torch.float32).view(n, 1)
    expected_axis0 = 0.1 * 2 / (n - 1) - 1e-4  # channel 0 along axis 0; others are 0
    # mean over (channels x positions): channel 0 of axis-0 differences only
    assert smoothness_l1(ramp).item() == pytest.approx(expected_axis0 / 2 / 2, rel=1e-4)
    assert to_normalised(ramp)[0, 0, -1, 0].item() == pytest.approx(0.1 * (n - 1) * 2 / (n - 1))


def test_negative_jacobian_penalty_sees_folding_only():
    assert negative_jacobian_penalty(0.3 * smooth_field((16, 16))) == 0.0
    n = 16
    mirror = torch.zeros(1, 2, n, n)
    # u = -2 x along axis 0: x + u = -x, det J = -1 everywhere
    mirror[:, 0] = -2.0 * torch.arange(n, dtype=torch.float32).view(n, 1)
    assert negative_jacobian_penalty(mirror).item() == pytest.approx(1.0, rel=1e-4)
    assert (jacobian_determinant(mirror) < 0).all()


def test_regularisation_has_gradients():
    field = smooth_field((12, 12), amplitude=4.0).requires_grad_(True)
    value = regularisation(field, folding_weight=2.0)
    value.backward()
    assert field.grad is not None and field.grad.abs().sum() > 0


def test_drdm_loss_is_the_weighted_sum_of_its_terms():
    shape = (16, 16)
    target = smooth_field(shape, seed=1)
    prediction = smooth_field(shape, seed=2)
    recovered = warp(prediction, target, padding="border")
    loss = DRDMLoss(rse_weight=2.0, direction_weight=0.5, regularisation_weight=3.0)
    terms = loss(prediction, recovered, target)
    expected = (
        2.0 * terms["rse"]
        + 0.5 * terms["direction"]
        + 3.0 * (terms["smoothness"] + 2.0 * terms["folding"])
    )
    assert torch.allclose(terms["loss"], expected)
    assert set(terms) == {"loss", "rse", "direction", "smoothness", "folding"}


def test_drdm_loss_is_small_for_the_true_inverse():
    # p = inverse of d, by the fixed point p = -d o (id + p); for a diffeomorphism the right
    # inverse is also the left one, so p o (id + d) ~ -d as the loss asks
    target = smooth_field((24, 24), amplitude=1.0, seed=3)
    inverse = -target
    for _ in range(30):
        inverse = -warp(target, inverse, padding="border")
    recovered = warp(inverse, target, padding="border")
    assert compose(target, inverse).abs().max() < 1e-3  # p then d is the identity
    terms = DRDMLoss()(inverse, recovered, target)
    assert terms["rse"] < 1e-2
    assert terms["direction"] < -0.99
    wrong = DRDMLoss()(target, warp(target, target, padding="border"), target)
    assert terms["loss"] < wrong["loss"]


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="must match"):
        relative_squared_error(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError):
        smoothness_l1(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("reduction", ["voxel", "sample", "batch"])
def test_every_rse_reduction_is_zero_for_recovery_and_one_for_none(reduction):
    target = torch.cat([smooth_field((16, 16), seed=s) for s in range(3)])
    assert relative_squared_error(-target, target, reduction=reduction) < 1e-6
    none = relative_squared_error(torch.zeros_like(target), target, reduction=reduction)
    assert none == pytest.approx(1.0, 1e-3)


def test_batch_rse_weighs_samples_by_target_energy_and_sample_rse_does_not():
    big, small = smooth_field((16, 16), seed=0), 0.1 * smooth_field((16, 16), seed=1)
    target = torch.cat([big, small])
    # recover the big sample exactly, the small one not at all
    recovered = torch.cat([-big, torch.zeros_like(small)])
    per_sample = relative_squared_error(recovered, target, reduction="sample")
    assert per_sample == pytest.approx(0.5, 1e-3)
    energy = small.square().sum() / (big.square().sum() + small.square().sum())
    batch = relative_squared_error(recovered, target, reduction="batch")
    assert batch == pytest.approx(float(energy), rel=1e-3)


def test_batch_rse_of_a_zero_target_asks_for_no_motion_without_blowing_up():
    target = torch.cat([smooth_field((16, 16)), torch.zeros(1, 2, 16, 16)])
    moved = torch.cat([-target[:1], torch.full((1, 2, 16, 16), 0.1)])
    voxel = relative_squared_error(moved, target, reduction="voxel")
    batch = relative_squared_error(moved, target, reduction="batch")
    assert 0 < batch < 1 < voxel


def test_unknown_rse_reduction_is_refused():
    target = smooth_field((8, 8))
    with pytest.raises(ValueError, match="reduction must be one of"):
        relative_squared_error(target, target, reduction="mean")


def test_recovery_error_metric_sums_over_batches():
    from drdm.metrics.recovery import RecoveryError

    target = torch.cat([smooth_field((16, 16), seed=s) for s in range(4)])
    recovered = -0.5 * target
    metric = RecoveryError()
    metric.update(recovered[:1], target[:1])
    metric.update(recovered[1:], target[1:])
    # q = -d / 2 leaves half of every vector: sqrt(1/4)
    assert float(metric.compute()) == pytest.approx(0.5, 1e-4)
    with pytest.raises(ValueError, match="must be equal"):
        metric.update(recovered[:, :1], target)
