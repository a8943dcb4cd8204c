"""The field sources share one interface and one bank (drdm.field_sources.bank)."""

import pytest
import torch

from drdm.deform import RandomDeformation
from drdm.field_sources import (
    BSplineFieldSource,
    DRDMFieldSource,
    ForwardDiffusionFieldSource,
    SmoothNoiseFieldSource,
)

SHAPE = (32, 32)


def make_source(name: str, fields_per_image: int = 0):
    """One source of each family, 2D, at a cheap setting."""
    if name == "drdm":  # the packaged model, a 4-call chain from t0 - 1
        return DRDMFieldSource(
            "default", t0=[3, 4], options={"start_step": "t0"}, fields_per_image=fields_per_image
        )
    if name == "forward":
        return ForwardDiffusionFieldSource(
            RandomDeformation(ndims=2), t0=[20, 30], fields_per_image=fields_per_image
        )
    if name == "bspline":
        return BSplineFieldSource(
            ndims=2, cells=[2], amplitudes=[1.5], fields_per_image=fields_per_image
        )
    return SmoothNoiseFieldSource(ndims=2, sigma=3.0, fields_per_image=fields_per_image)


SOURCES = ("drdm", "forward", "bspline", "smooth_noise")


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SOURCES)
def test_every_source_answers_the_same_call_and_is_seeded_by_its_generator(name):
    source = make_source(name)
    batch = images(3)
    first = source(batch, generator=torch.Generator().manual_seed(5))
    again = source(batch, generator=torch.Generator().manual_seed(5))
    other = source(batch, generator=torch.Generator().manual_seed(6))
    assert first.shape == (3, 2, *SHAPE) and first.dtype == batch.dtype
    assert torch.isfinite(first).all() and first.abs().max() > 0
    assert torch.equal(first, again) and not torch.equal(first, other)
    # t0 as an int, one per image, or drawn: the same call for every family
    assert source(batch, t0=4).shape == source(batch, t0=torch.tensor([3, 4, 4])).shape
    with pytest.raises(TypeError, match="generator="):
        source(batch, torch.Generator())
    with pytest.raises(ValueError, match="ndims=2|2D DRDM"):
        source(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="2 keys for a batch of 3"):
        source(batch, keys=["a", "b"])


@pytest.mark.parametrize("name", SOURCES)
def test_one_bank_policy_for_every_source(name):
    torch.manual_seed(0)
    source = make_source(name, fields_per_image=2)
    made = []
    generate = source.generate

    def counting(image, t0, generator):
        made.append(image.shape[0])
        return generate(image, t0, generator)

    source.generate = counting
    batch = images(3)
    outputs = [source(batch, keys=["a", "b", "c"]) for _ in range(5)]
    # 3 images x K = 2: two calls make new fields, the other three re-draw banked ones
    assert sum(made) == 6 and set(source.bank) == {"a", "b", "c"}
    for row, key in enumerate("abc"):
        banked = source.bank[key]
        assert len(banked) == 2 and not torch.equal(banked[0], banked[1])
        assert all(any(torch.equal(out[row], field) for field in banked) for out in outputs)
    # without keys an image is named by its content: the same slice hits the same entry
    source.bank.clear()
    source(batch[:1])
    source(batch[:1].clone())
    source(batch[:1])
    assert len(source.bank) == 1 and sum(made) == 8
    with pytest.raises(ValueError, match="fields_per_image"):
        make_source(name, fields_per_image=-1)


def test_forward_diffusion_source_deforms_more_at_larger_t0():
    source = ForwardDiffusionFieldSource(RandomDeformation(ndims=2), t0=[10])
    batch = images(8)
    small = source(batch, t0=5, generator=torch.Generator().manual_seed(0)).norm(dim=1).mean()
    large = source(batch, t0=60, generator=torch.Generator().manual_seed(0)).norm(dim=1).mean()
    assert large > 2 * small


def test_drdm_source_groups_images_by_t0_and_matches_generate():
    from drdm.generation import DRDM

    source = make_source("drdm")
    batch = images(3)
    t0 = torch.tensor([4, 3, 4])
    field = source(batch, t0=t0, generator=torch.Generator().manual_seed(1))
    # the same seeds, drawn in the same order: one per distinct t0 (ascending)
    draws = torch.Generator().manual_seed(1)
    drdm = DRDM.load("default", start_step="t0")
    for start in (3, 4):
        seed = int(torch.randint(0, 2**62, (1,), generator=draws))
        chosen = (t0 == start).nonzero().flatten()
        expected = drdm.generate(batch[chosen], num_samples=1, t0=start, seed=seed).displacement
        torch.testing.assert_close(field[chosen], expected)
