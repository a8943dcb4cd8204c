"""Synthetic pairs: MRBS fields (B-spline maths, seeding, scale) and the pair direction."""

import pytest
import torch

from drdm.deform import warp
from drdm.field_sources import (
    BSplineFieldSource,
    DRDMFieldSource,
    MultiResolutionBSpline,
    evaluate_bspline,
)
from drdm.field_sources.bspline import bspline_weights
from drdm.registration import make_pair


@pytest.mark.parametrize("cells", [1, 3, 8])
def test_bspline_weights_partition_of_unity(cells):
    weights = bspline_weights(33, cells, dtype=torch.float64)
    assert weights.shape == (33, cells + 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(33, dtype=torch.float64))


def test_bspline_reproduces_linear_fields_exactly():
    # cubic B-splines reproduce polynomials up to degree 1: control values sampled from a
    # linear function at the knot positions must give that linear function at every voxel
    shape, cells = (21, 17), (4, 2)
    spacing = [(n - 1) / c for n, c in zip(shape, cells)]
    knots = [torch.arange(-1, c + 2, dtype=torch.float64) * s for c, s in zip(cells, spacing)]
    grid_k = torch.meshgrid(*knots, indexing="ij")
    control = (0.3 * grid_k[0] - 0.2 * grid_k[1] + 1.5)[None, None]
    field = evaluate_bspline(control, shape)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    grid_x = torch.meshgrid(*axes, indexing="ij")
    torch.testing.assert_close(field[0, 0], 0.3 * grid_x[0] - 0.2 * grid_x[1] + 1.5)


@pytest.mark.parametrize("shape", [(32, 40), (12, 14, 16)])
def test_mrbs_shape_seed_and_scale(shape):
    ndims = len(shape)
    mrbs = MultiResolutionBSpline(ndims, cells=[2, 4], amplitudes=[2.0, 1.0])
    first = mrbs(shape, 3, generator=torch.Generator().manual_seed(1))
    again = mrbs(shape, 3, generator=torch.Generator().manual_seed(1))
    other = mrbs(shape, 3, generator=torch.Generator().manual_seed(2))
    assert first.shape == (3, ndims, *shape) and first.dtype == torch.float32
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    doubled = MultiResolutionBSpline(ndims, cells=[2, 4], amplitudes=[4.0, 2.0])
    scaled = doubled(shape, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled, 2 * first)


def test_mrbs_relative_amplitude_scales_with_axis_size():
    mrbs = MultiResolutionBSpline(2, cells=[2], amplitudes=[0.1], relative=True)
    field = mrbs((16, 64), 64, generator=torch.Generator().manual_seed(0))
    ratio = field[:, 1].std() / field[:, 0].std()
    assert 3.0 < ratio < 5.0  # axis 1 is four times longer


def test_mrbs_rejects_bad_configuration():
    with pytest.raises(ValueError, match="one amplitude per level"):
        MultiResolutionBSpline(2, cells=[2, 4], amplitudes=[1.0])
    with pytest.raises(ValueError, match="ndims"):
        MultiResolutionBSpline(4)
    with pytest.raises(ValueError, match="ndims=2"):
        MultiResolutionBSpline(2)((8, 8, 8))


def test_pair_direction_matches_pull_back():
    # fixed(x) = moving(x + 2 e0): the known field is the displacement a registration must output
    image = torch.rand(1, 1, 24, 20)
    shift = torch.zeros(1, 2, 24, 20)
    shift[:, 0] = 2.0
    label = (image > 0.5).long()
    pair = make_pair(image, shift, label)
    torch.testing.assert_close(pair.fixed[..., :-2, :], image[..., 2:, :])
    assert torch.equal(pair.fixed_label[..., :-2, :], label[..., 2:, :])
    assert pair.fixed_label.dtype == torch.int64
    torch.testing.assert_close(warp(pair.moving, pair.displacement), pair.fixed)


def test_bspline_source_follows_image_batch_and_device():
    source = BSplineFieldSource(ndims=2, cells=[2], amplitudes=[1.0])
    image = torch.rand(4, 1, 16, 16)
    field = source(image, generator=torch.Generator().manual_seed(0))
    assert field.shape == (4, 2, 16, 16)
    with pytest.raises(ValueError, match="ndims=2"):
        source(torch.rand(1, 1, 8, 8, 8))


def test_drdm_source_requires_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="model.field_sources.synthetic_drdm.checkpoint"):
        DRDMFieldSource(checkpoint=None)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        DRDMFieldSource(checkpoint=tmp_path / "missing.ckpt")


def test_drdm_source_rejects_a_negative_bank_size(tmp_path):
    checkpoint = tmp_path / "drdm.ckpt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="fields_per_image"):
        DRDMFieldSource(checkpoint=checkpoint, fields_per_image=-1)


def test_known_field_pairs_are_seeded_by_pair_and_warp_the_moving_sample():
    from drdm.deform import folding_ratio
    from drdm.field_sources import SmoothNoiseFieldSource
    from drdm.registration import KnownFieldTransform

    image = torch.rand(1, 24, 20, generator=torch.Generator().manual_seed(0))
    label = (image > 0.5).long()
    moving = {"image": image, "label": label, "id": "a", "keypoints": torch.zeros(3, 2)}
    fixed = {"image": torch.rand(1, 24, 20), "label": label, "id": "b"}
    transform = KnownFieldTransform(SmoothNoiseFieldSource(ndims=2, sigma=3.0, amplitude=1.5))
    pair = transform({"moving": moving, "fixed": fixed})
    field = pair["displacement"]
    assert field.shape == (2, 24, 20) and field.abs().max() > 0.5
    assert folding_ratio(field[None]).item() == 0.0  # integrated velocity: diffeomorphic
    torch.testing.assert_close(pair["fixed"]["image"], warp(image[None], field[None])[0])
    assert torch.equal(pair["fixed"]["label"], warp(label[None], field[None], mode="nearest")[0])
    assert "keypoints" not in pair["moving"] and "keypoints" not in pair["fixed"]
    # the same pair always gets the same field; another pair another one
    again = transform({"moving": moving, "fixed": fixed})
    torch.testing.assert_close(again["displacement"], field)
    other = transform({"moving": moving, "fixed": {**fixed, "id": "c"}})
    assert not torch.allclose(other["displacement"], field)
