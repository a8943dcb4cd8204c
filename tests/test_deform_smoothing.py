"""Field smoothing (drdm.deform.smoothing): the Gaussian blur and the local fold repair."""

import pytest
import torch

from drdm.deform import folding_ratio, gaussian_smooth, repair_folding
from drdm.deform.smoothing import dilate


def folded_field(shape=(32, 32), amplitude: float = 6.0, centre=None) -> torch.Tensor:
    """``[1, ndims, *shape]`` voxels: a Gaussian bump of axis-0 displacement, steep enough that
    ``1 + d u_0 / d x_0 < 0`` on one flank (a fold) and zero far from it."""
    ndims = len(shape)
    centre = [n / 2 for n in shape] if centre is None else centre
    grids = torch.meshgrid(*[torch.arange(float(n)) for n in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    field = torch.zeros(1, ndims, *shape)
    field[0, 0] = amplitude * torch.exp(-r2 / (2 * 2.0**2))
    return field


def test_a_folded_field_is_unfolded_and_changed_only_near_the_fold():
    field = folded_field()
    assert folding_ratio(field) > 0.01  # the case is a real fold
    repaired, changed = repair_folding(field, sigma=2.0, dilation=2)
    assert folding_ratio(repaired) == 0
    difference = (repaired - field).abs().sum(1)[0] > 0
    assert 0 < changed.item() < 0.5
    assert difference.float().mean() <= changed.item()  # changed counts every touched voxel
    assert not difference[:4].any() and not difference[-4:].any()  # far from the bump: as given


def test_fields_that_do_not_fold_come_back_bit_for_bit():
    folded, smooth = folded_field(), folded_field(amplitude=0.5)
    assert folding_ratio(smooth) == 0
    repaired, changed = repair_folding(torch.cat([folded, smooth]))
    assert torch.equal(repaired[1:], smooth) and changed[1] == 0
    assert folding_ratio(repaired[:1]) == 0 and changed[0] > 0


def test_3d_folds_are_repaired_and_zero_iterations_change_nothing():
    field = folded_field((20, 20, 20), amplitude=6.0)
    assert folding_ratio(field) > 0
    repaired, _ = repair_folding(field, sigma=2.0, dilation=2)
    assert folding_ratio(repaired) == 0
    untouched, changed = repair_folding(field, max_iterations=0)
    assert torch.equal(untouched, field) and changed.item() == 0


def test_separable_dilation_is_the_cube_max_pool():
    mask = (torch.rand(2, 1, 17, 19) > 0.97).float()
    expected = torch.nn.functional.max_pool2d(mask, 7, 1, 3)
    assert torch.equal(dilate(mask, 3), expected)
    volume = (torch.rand(1, 1, 9, 10, 11) > 0.98).float()
    assert torch.equal(dilate(volume, 2), torch.nn.functional.max_pool3d(volume, 5, 1, 2))


def test_gaussian_smooth_keeps_constants_and_lowers_the_peak():
    constant = torch.full((1, 2, 16, 16), 3.0)
    assert torch.allclose(gaussian_smooth(constant, 2.0), constant)
    bump = folded_field((16, 16))
    assert gaussian_smooth(bump, 2.0).max() < bump.max()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(sigma=0), "sigma must be a number of voxels > 0"),
        (dict(dilation=-1), "dilation must be an int >= 0"),
        (dict(max_iterations=2.5), "max_iterations must be an int >= 0"),
    ],
)
def test_bad_repair_options_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        repair_folding(folded_field(), **options)
