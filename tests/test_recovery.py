"""The recovery chain (drdm.generation.chain): full and few-step chains, and DRDM's options."""

import re

import pytest
import torch

from drdm.deform import RandomDeformation, integrate
from drdm.generation import DRDM
from drdm.generation.chain import block_starts, displacement_power, recover, step_plan
from drdm.nets import RecResACNet

SHAPE = (24, 24)


def smooth_field(scale: float = 0.3) -> torch.Tensor:
    """A smooth, non-constant ``[1, 2, 24, 24]`` field in voxels."""
    x = torch.linspace(0, 3.1416, SHAPE[0])
    a, b = torch.meshgrid(x, x, indexing="ij")
    return scale * torch.stack([torch.sin(a) * torch.cos(b), torch.cos(2 * a) * torch.sin(b)])[None]


class FixedNet(torch.nn.Module):
    """A stand-in network: ``weight(t) * field``, whatever the image (the chain's rules are
    exact for some of these: a constant prediction for ``repeat``, ``k_rec(t)`` for ``k_rec``)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, image, t):
        return self.weight(t).float().view(-1, 1, 1, 1) * smooth_field().expand(len(t), -1, -1, -1)


def test_blocks_cover_the_chain_once_and_calls_are_capped_by_its_length():
    for first, calls in [(79, 10), (47, 10), (79, 80), (79, 7), (3, 10), (0, 5)]:
        starts = block_starts(first, calls)
        assert starts[0] == first and starts == sorted(starts, reverse=True)
        assert len(starts) == min(calls, first + 1)
        lengths = [a - b for a, b in zip(starts, [*starts[1:], -1])]
        assert sum(lengths) == first + 1 and max(lengths) - min(lengths) <= 1
    assert block_starts(79, 10) == [79, 71, 63, 55, 47, 39, 31, 23, 15, 7]
    assert block_starts(5, None) == [5, 4, 3, 2, 1, 0]


def test_the_plan_aligns_chains_of_different_lengths_at_step_zero():
    plan = step_plan(torch.tensor([5, 2]), None)
    assert plan.steps[:, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert plan.active[:, 1].tolist() == [False, False, False, True, True, True]
    assert plan.steps[3:, 1].tolist() == [2, 1, 0] and plan.single == [True] * 6
    few = step_plan(torch.tensor([79, 47]), 10, "repeat")
    assert few.calls == 10 and bool(few.active.all())
    assert few.power.sum(0).tolist() == [80.0, 48.0]  # every step stood for once
    # the default rule applies each call once: the chain just visits fewer steps
    assert bool((step_plan(torch.tensor([79]), 10).power == 1).all())


def test_k_rec_powers_are_the_blocks_recovery_over_the_calls():
    k_rec = RandomDeformation(ndims=2).recovery_steps
    plan = step_plan(torch.tensor([79]), 10, "k_rec", RandomDeformation(ndims=2))
    values = k_rec(torch.arange(80)).tolist()
    starts = block_starts(79, 10)
    for call, (start, end) in enumerate(zip(starts, [*starts[1:], -1])):
        expected = sum(values[end + 1 : start + 1]) / values[start]
        assert plan.power[call, 0].item() == pytest.approx(expected)
    # k_rec falls towards t = 0: the last block stands for fewer steps than it has
    assert plan.power[-1, 0] < 8
    with pytest.raises(ValueError, match="needs the forward process"):
        step_plan(torch.tensor([79]), 10, "k_rec")


def test_uncorrelated_powers_add_the_blocks_steps_in_quadrature():
    schedule = RandomDeformation(ndims=2)
    values = schedule.recovery_steps(torch.arange(80)).double()
    starts = block_starts(79, 10)
    uncorrelated = step_plan(torch.tensor([79]), 10, "uncorrelated", schedule).power[:, 0]
    k_rec = step_plan(torch.tensor([79]), 10, "k_rec", schedule).power[:, 0]
    for call, (start, end) in enumerate(zip(starts, [*starts[1:], -1])):
        block = values[end + 1 : start + 1]
        expected = float(block.square().sum().sqrt() / values[start])
        assert uncorrelated[call].item() == pytest.approx(expected)
    # more than applying each call once, less than adding the steps in one direction
    assert bool((uncorrelated[:-1] > 1).all()) and bool((uncorrelated <= k_rec + 1e-6).all())


class AutocastProbe(torch.nn.Module):
    """Wraps a network and records whether each call ran under CPU bf16 autocast."""

    def __init__(self, net):
        super().__init__()
        self.net, self.timesteps, self.calls = net, net.timesteps, []

    def forward(self, image, t):
        self.calls.append(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        return self.net(image, t)


def test_bf16_precision_autocasts_the_network_only_and_stays_close_to_fp32():
    torch.manual_seed(0)
    net = AutocastProbe(RecResACNet(ndims=2, timesteps=8).eval())
    deformation = RandomDeformation(ndims=2, timesteps=8, control_size=16, levels=2)
    image = torch.rand(*SHAPE)
    runs = {}
    for precision in ("fp32", "bf16"):
        net.calls.clear()
        drdm = DRDM(net, deformation, SHAPE, precision=precision, t0_start=6, margin=0)
        runs[precision] = drdm.generate(image, num_samples=2, seed=3)
        assert net.calls and all(net.calls) == (precision == "bf16"), precision
        assert runs[precision].displacement.dtype == torch.float32
    fp32, bf16 = runs["fp32"].displacement, runs["bf16"].displacement
    assert not torch.equal(fp32, bf16)
    assert (bf16 - fp32).norm() < 0.1 * fp32.norm()  # bf16 rounding, not another field
    with pytest.raises(ValueError, match=re.escape("precision must be one of fp32 | bf16")):
        DRDM(net, deformation, SHAPE, precision="fp16")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(sampling_steps=0), "sampling_steps must be an int >= 1"),
        (dict(sampling_steps=2.5), "sampling_steps must be an int >= 1"),
        (dict(sampling_steps=4, skipped_steps="linear"), "skipped_steps must be one of"),
    ],
)
def test_bad_few_step_options_are_refused_by_name(options, match):
    net = RecResACNet(ndims=2, timesteps=8)
    with pytest.raises(ValueError, match=match):
        DRDM(net, RandomDeformation(ndims=2, timesteps=8), SHAPE, **options)


def test_displacement_power_integer_parts_compose_and_fractions_are_continuous():
    field = smooth_field().repeat(3, 1, 1, 1)
    assert torch.equal(displacement_power(field, torch.ones(3)), field)
    powers = torch.tensor([0.0, 2.0, 5.0])
    exact = integrate(field, powers.long())
    assert torch.allclose(displacement_power(field, powers), exact)
    below = displacement_power(field, torch.tensor([0.999, 1.999, 4.999]))
    above = displacement_power(field, torch.tensor([1.001, 2.001, 5.001]))
    # +-0.001 in the power moves the field by about 0.002 of its own size, no jump at integers
    assert (
        (below - above).abs().flatten(1).max(1).values
        < 0.01 * exact.abs().flatten(1).max(1).values.clamp_min(0.3)
    ).all()
    half = displacement_power(field[:1], torch.tensor([0.5]))
    assert torch.allclose(half, 0.5 * field[:1])


@pytest.mark.parametrize("rule", ["repeat", "k_rec", "remaining", "uncorrelated"])
def test_one_call_per_step_is_the_full_chain_bit_for_bit(rule):
    torch.manual_seed(0)
    net = RecResACNet(ndims=2, timesteps=8).eval()
    deformation = RandomDeformation(ndims=2, timesteps=8, control_size=16, levels=2)
    image = torch.rand(2, 1, *SHAPE)
    t0 = torch.tensor([5, 7])
    diffused, _ = deformation(SHAPE, t0, generator=torch.Generator().manual_seed(1))
    first = torch.tensor([7, 4])
    full = recover(net, image, diffused, first)
    same = recover(
        net,
        image,
        diffused,
        first,
        sampling_steps=8,
        skipped_steps=rule,
        deformation=deformation,
    )
    assert torch.equal(full, same)
    few = recover(net, image, diffused, first, sampling_steps=2)
    assert not torch.allclose(few, full)


def test_each_rule_is_exact_for_the_prediction_it_assumes():
    """``repeat`` reproduces the full chain of a network whose answer does not change over a
    block; ``k_rec`` that of one whose answer scales with ``k_rec(t)``; each misses the other."""
    schedule = RandomDeformation(ndims=2)
    k_rec = schedule.recovery_steps
    image = torch.rand(1, 1, *SHAPE)
    start = torch.zeros(1, 2, *SHAPE)
    first = torch.tensor([79])
    nets = {
        "repeat": FixedNet(lambda t: torch.full_like(t, 1) / 40),
        "k_rec": FixedNet(lambda t: k_rec(t) / 400),
    }
    for assumed, net in nets.items():
        full = recover(net, image, start, first)
        errors = {
            rule: (
                recover(
                    net,
                    image,
                    start,
                    first,
                    sampling_steps=8,
                    skipped_steps=rule,
                    deformation=schedule,
                )
                - full
            )
            .abs()
            .max()
            for rule in ("repeat", "k_rec")
        }
        other = "k_rec" if assumed == "repeat" else "repeat"
        assert errors[assumed] < 0.02 * full.abs().max(), (assumed, errors)
        assert errors[other] > 5 * errors[assumed], (assumed, errors)


def test_generate_with_few_steps_is_deterministic_and_keeps_its_outputs_linked():
    torch.manual_seed(0)
    net = RecResACNet(ndims=2, timesteps=8)
    deformation = RandomDeformation(ndims=2, timesteps=8, control_size=16, levels=2)
    drdm = DRDM(net, deformation, SHAPE, sampling_steps=3, start_step="T")
    image = torch.rand(*SHAPE)
    first = drdm.generate(image, num_samples=2, seed=4)
    second = drdm.generate(image, num_samples=2, seed=4)
    assert torch.equal(first.displacement, second.displacement)
    from drdm.deform import warp

    warped = warp(image[None, None].expand(2, -1, -1, -1), first.displacement, mode="bicubic")
    assert torch.allclose(warped, first.image, atol=1e-5)
    drdm.sampling_steps = None
    assert not torch.equal(
        drdm.generate(image, num_samples=2, seed=4).displacement, first.displacement
    )


class BorderFoldNet(torch.nn.Module):
    """Predicts a steep bump of displacement at the image's first row, whatever the image: the
    kind of fold a network makes at an edge of its input."""

    timesteps = 8

    def forward(self, image, t):
        rows = torch.arange(float(image.shape[2])).view(-1, 1)
        cols = torch.arange(float(image.shape[3])).view(1, -1)
        bump = 6.0 * torch.exp(-((rows - 1) ** 2 + (cols - 12) ** 2) / 8.0)
        field = torch.stack([bump, torch.zeros_like(bump)])[None]
        return field.expand(image.shape[0], -1, -1, -1)


def test_fold_repair_unfolds_the_samples_and_keeps_them_linked_to_their_fields():
    from drdm.deform import folding_ratio, warp

    deformation = RandomDeformation(ndims=2, timesteps=8, control_size=16, levels=2)
    image, label = torch.rand(*SHAPE), (torch.rand(*SHAPE) > 0.5).long()
    runs = {}
    for repair in (False, True):
        drdm = DRDM(BorderFoldNet(), deformation, SHAPE, margin=0, sampling_steps=1)
        drdm.fold_repair = repair
        runs[repair] = drdm.generate(image, label, num_samples=2, seed=1, t0=4)
    raw, repaired = runs[False], runs[True]
    assert (raw.folding_ratio > 0).all() and (raw.repaired_ratio == 0).all()
    assert (repaired.folding_ratio == 0).all() and (repaired.repaired_ratio > 0).all()
    assert torch.equal(folding_ratio(repaired.displacement), repaired.folding_ratio)
    far = slice(12, None)  # the bump is at the first rows: the rest of the field is as recovered
    assert torch.equal(raw.displacement[..., far, :], repaired.displacement[..., far, :])
    originals = image[None, None].expand(2, -1, -1, -1)
    warped = warp(originals, repaired.displacement, mode="bicubic")
    assert torch.allclose(warped, repaired.image, atol=1e-5)
    labels = warp(label[None, None].expand(2, -1, -1, -1), repaired.displacement, mode="nearest")
    assert torch.equal(labels, repaired.label)
    with pytest.raises(ValueError, match="fold_repair must be true or false"):
        DRDM(BorderFoldNet(), deformation, SHAPE, fold_repair="yes")
    with pytest.raises(ValueError, match="dilation must be an int >= 0"):
        DRDM(BorderFoldNet(), deformation, SHAPE, fold_repair_dilation=-2)
