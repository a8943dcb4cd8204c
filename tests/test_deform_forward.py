"""RandomDeformation / random_deformation: the DRDM forward process and its configs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st

from drdm.deform import (
    RandomDeformation,
    displacement_stats,
    folding_ratio,
    integrate_sequential,
    random_deformation,
    upsample_crop,
)
from drdm.deform.sampling import multiscale_noise
from drdm.deform.spatial import compose
from drdm.utils.instantiate import load_config

SCHEDULES = Path(__file__).resolve().parents[1] / "conf" / "deformation"


def _schedule(name: str) -> RandomDeformation:
    return instantiate(load_config(SCHEDULES / f"{name}.yaml"))


def test_step_schedules_match_the_reference_formulas():
    t = torch.arange(80)
    rd = RandomDeformation()
    # the reference: floor_divide(2 * t**1.3, 3) clamped to [1, 200], and floor(t**0.6), in float32
    expected_diffusion = torch.clamp(torch.floor_divide(2 * torch.pow(t, 1.3), 3), 1, 200).long()
    expected_recovery = torch.floor(torch.pow(t, 0.6)).long()
    assert torch.equal(rd.diffusion_steps(t), expected_diffusion)
    assert torch.equal(rd.recovery_steps(t), expected_recovery)
    assert rd.diffusion_steps(torch.tensor([79])).item() == 195


@settings(max_examples=6, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(3, 40), st.integers(3, 40)),
        st.tuples(st.integers(3, 12), st.integers(3, 12), st.integers(3, 12)),
    ),
    control_size=st.sampled_from([8, 16]),
)
def test_upsample_crop_equals_interpolate_then_crop(shape, control_size):
    ndims = len(shape)
    field = torch.randn(1, ndims, *[control_size] * ndims, dtype=torch.float64)
    mode = "bilinear" if ndims == 2 else "trilinear"
    full = F.interpolate(field, size=[2 * n for n in shape], mode=mode)
    centre = full[(..., *[slice(n // 2, n // 2 + n) for n in shape])]
    torch.testing.assert_close(upsample_crop(field, shape, 2.0), centre, atol=1e-12, rtol=0)


def _reference_forward(rd: RandomDeformation, size: int, t: torch.Tensor, seed: int):
    """The authors' algorithm written out: loop per step, full 2x grid, crop, their units."""
    generator = torch.Generator().manual_seed(seed)
    ndims, control = rd.ndims, rd.control_size
    args = (t.shape[0], ndims, control, rd.levels)
    # reference units: fractions of the control grid (resampling reads d * C control voxels)
    clean = multiscale_noise(*args, rd.v_scale, generator)
    noise = multiscale_noise(*args, rd.v_scale * rd.noise_ratio, generator)
    perturbed = clean + compose(noise * control, clean * control) / control - clean
    diffused = integrate_sequential(perturbed * control, rd.diffusion_steps(t)) / control
    mode = "bilinear" if ndims == 2 else "trilinear"
    full = F.interpolate(diffused * size / control, size=[2 * size] * ndims, mode=mode)
    crop = (..., *[slice(size // 2, size // 2 + size)] * ndims)
    return full[crop] * size  # their image resampler reads d * S voxels


@pytest.mark.parametrize(("ndims", "size"), [(2, 40), (3, 12)])
def test_reference_integrator_reproduces_the_reference_algorithm(ndims, size):
    rd = RandomDeformation(ndims=ndims, control_size=16, levels=3, integrator="reference")
    t = torch.tensor([5, 30])
    diffused, _ = rd((size,) * ndims, t, torch.Generator().manual_seed(3))
    expected = _reference_forward(rd, size, t, seed=3)
    torch.testing.assert_close(diffused, expected, atol=1e-5, rtol=1e-4)


def test_scale_means_the_same_at_every_resolution():
    # ours: the field as a fraction of the image is the same at 32 and 64 px (resampled only);
    # the reference's conversion doubles it
    t = torch.tensor([30, 60])

    def mean_fraction(size, integrator):
        rd = RandomDeformation(integrator=integrator)
        diffused, _ = rd((size, size), t, torch.Generator().manual_seed(0))
        return displacement_stats(diffused)["mean_fraction"]

    ours = mean_fraction(64, "squaring")
    torch.testing.assert_close(ours, mean_fraction(32, "squaring"), rtol=0.03, atol=0)
    ratio = mean_fraction(64, "reference") / mean_fraction(32, "reference")
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), rtol=0.03, atol=0)


def test_same_generator_seed_gives_identical_fields():
    rd = RandomDeformation(control_size=32, levels=3, refinement=2)
    t = torch.tensor([3, 40, 79])
    first = rd((32, 32), t, torch.Generator().manual_seed(7))
    second = rd((32, 32), t, torch.Generator().manual_seed(7))
    other = rd((32, 32), t, torch.Generator().manual_seed(8))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], other[0])


def test_outputs_shapes_dtype_device_and_growth_with_t():
    rd = RandomDeformation(control_size=32, levels=3, v_scale=8e-5)
    t = torch.tensor([0, 10, 40, 79])
    diffused, target = rd((24, 20), t, torch.Generator().manual_seed(0))
    assert diffused.shape == target.shape == (4, 2, 24, 20)
    assert diffused.dtype == target.dtype == torch.float32 and diffused.device == t.device
    assert torch.count_nonzero(target[0]) == 0  # k_rec(0) = 0: nothing to recover
    magnitude = displacement_stats(diffused)["mean_voxels"]
    assert torch.all(magnitude[1:] > magnitude[:-1])
    double, _ = rd((24, 20), t, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), diffused, atol=1e-3, rtol=1e-3)


def test_random_deformation_function_matches_module():
    t = torch.tensor([12, 50])
    schedule = dict(v_scale=4e-5, control_size=16, levels=2)
    field = random_deformation((16, 16, 16), t, torch.Generator().manual_seed(1), **schedule)
    assert field.shape == (2, 3, 16, 16, 16)
    module = RandomDeformation(ndims=3, **schedule)
    expected, _ = module((16, 16, 16), t, torch.Generator().manual_seed(1))
    assert torch.equal(field, expected)


@pytest.mark.parametrize(
    ("name", "shape", "fold_ts"),
    [("reference_2d", (128, 128), (20, 48)), ("reference_3d", (48, 48, 48), (20, 48, 79))],
)
def test_experiment_scales_are_large_and_do_not_fold(name, shape, fold_ts):
    rd = _schedule(name)
    t = torch.tensor(sorted({*fold_ts, 79}))
    diffused, _ = rd(shape, t, torch.Generator().manual_seed(0))
    folding = folding_ratio(diffused)
    assert torch.all(folding[: len(fold_ts)] < 0.01), folding
    # the paper's claim: deformation scale above 10% of the image at the last step
    assert displacement_stats(diffused)["max_fraction"][-1] > 0.10


@pytest.mark.parametrize(
    ("shape", "t", "match"),
    [
        ((32, 32, 32), torch.tensor([1]), r"2 ints.*\(32, 32, 32\)"),
        ((32, 32), torch.tensor([1.0]), "integer"),
        ((32, 32), torch.tensor([[1]]), r"\(1, 1\)"),
        ((32, 32), torch.tensor([80]), "0 .. 79"),
    ],
)
def test_bad_input_raises_value_error(shape, t, match):
    with pytest.raises(ValueError, match=match):
        RandomDeformation(ndims=2)(shape, t)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="integrator"):
        RandomDeformation(integrator="euler")
    with pytest.raises(ValueError, match="ndims"):
        RandomDeformation(ndims=4)


def test_the_diffused_field_alone_is_forwards_first_field():
    process = RandomDeformation(ndims=2, control_size=16, timesteps=20)
    t = torch.tensor([3, 17])
    both, _ = process((24, 20), t, generator=torch.Generator().manual_seed(4))
    alone = process.diffused((24, 20), t, generator=torch.Generator().manual_seed(4))
    assert torch.equal(both, alone) and alone.abs().max() > 0


def test_python_defaults_are_the_config_defaults():
    """One source of truth: ``RandomDeformation()`` is ``conf/deformation/base.yaml``."""
    import inspect

    from drdm.utils.instantiate import load_config

    base = dict(load_config(Path(__file__).resolve().parents[1] / "conf/deformation/base.yaml"))
    assert base.pop("_target_") == "drdm.deform.RandomDeformation"
    signature = inspect.signature(RandomDeformation).parameters
    assert set(base) == set(signature)
    differing = {k: (v, signature[k].default) for k, v in base.items() if signature[k].default != v}
    assert not differing, differing
