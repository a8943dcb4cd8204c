"""Recovery networks: shapes, gradients, clamp, recursion, checkpoint loading, units, configs."""

import math
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from drdm.checkpoints import load_reference_checkpoint
from drdm.deform import RandomDeformation, identity_grid, warp
from drdm.deform import compose as compose_fields
from drdm.nets import RecResACNet, UNet, clamp_to_image, sinusoidal_table

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHECKPOINT = "cmr_recresacnet_reference.pth"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, spinning OpenMP workers make these
    small convolutions 10-100x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(cls, ndims, **kwargs):
    """Tiny networks for CPU tests (same code paths as the defaults)."""
    if cls is UNet:
        kwargs.setdefault("channels", (8, 16))
        kwargs.setdefault("groups", 4)
    return cls(ndims=ndims, timesteps=10, **kwargs)


def _inside_image(displacement: torch.Tensor) -> bool:
    spatial = displacement.shape[2:]
    positions = identity_grid(tuple(spatial)) + displacement
    last = torch.tensor([n - 1 for n in spatial], dtype=displacement.dtype)
    last = last.view(len(spatial), *([1] * len(spatial)))
    return bool((positions >= -1e-5).all() and (positions <= last + 1e-5).all())


@pytest.mark.parametrize("cls", [RecResACNet, UNet])
@pytest.mark.parametrize(
    "shape",
    [(32, 32), (30, 36), (16, 16, 16), (16, 12, 18)],
    ids=["2d", "2d-padded", "3d", "3d-padded"],
)
def test_output_shape_and_finite(cls, shape):
    torch.manual_seed(0)
    ndims = len(shape)
    net = _small(cls, ndims, in_channels=2)
    image = torch.rand(2, 2, *shape)
    displacement = net(image, torch.tensor([0, 9]))
    assert displacement.shape == (2, ndims, *shape)
    assert displacement.dtype == torch.float32
    assert torch.isfinite(displacement).all()
    assert net.timesteps == 10


def test_unet_starts_near_identity():
    torch.manual_seed(0)
    net = _small(UNet, 2)
    displacement = net(torch.rand(1, 1, 32, 32), torch.tensor([5]))
    assert 0 < displacement.abs().max() < 0.05


_MUST_LEARN = {
    RecResACNet: [
        "b1.0.conv0.weight",
        "b_mid.1.convs.1.weight",
        "te_mid.2.weight",
        "conv_out.weight",
    ],
    UNet: ["stem.weight", "middle.0.conv1.weight", "time_mlp.2.weight", "head.2.weight"],
}


@pytest.mark.parametrize("cls", [RecResACNet, UNet])
def test_gradient_reaches_the_trainable_parameters(cls):
    torch.manual_seed(0)
    net = _small(cls, 2)
    image = torch.rand(2, 1, 32, 32, requires_grad=True)
    displacement = net(image, torch.tensor([1, 7]))
    (displacement * torch.randn_like(displacement)).sum().backward()
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    # a step-MLP whose few hidden ReLU units are all inactive for these t passes no gradient
    # (te1 has a single hidden unit); everything else must receive some
    with_gradient = {name for name, p in trainable.items() if p.grad.any()}
    assert len(with_gradient) >= 0.9 * len(trainable)
    assert set(_MUST_LEARN[cls]) <= with_gradient
    assert image.grad is not None and image.grad.abs().sum() > 0
    # the sinusoidal step table is frozen
    assert not net.time_embed.weight.requires_grad and net.time_embed.weight.grad is None


def test_clamp_keeps_positions_inside_and_leaves_small_fields():
    torch.manual_seed(0)
    large = 40 * torch.randn(2, 2, 12, 16)
    clamped = clamp_to_image(large)
    assert _inside_image(clamped)
    assert not _inside_image(large)
    small = 0.4 * torch.rand(1, 3, 6, 7, 8) - 0.2
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert torch.equal(clamp_to_image(small)[interior], small[interior])


@pytest.mark.parametrize("cls", [RecResACNet, UNet])
def test_output_stays_within_the_image_even_for_huge_predictions(cls):
    torch.manual_seed(0)
    net = _small(cls, 2)
    final = net.conv_out if cls is RecResACNet else net.head[-1]
    with torch.no_grad():
        final.bias.copy_(torch.tensor([3.0, -3.0]))  # raw 3 = 3 image sizes
    displacement = net(torch.rand(1, 1, 24, 32), torch.tensor([4]))
    assert _inside_image(displacement)
    # the bound is reached: the clamp was active, not vacuous
    positions = identity_grid((24, 32)) + displacement[0]
    assert torch.isclose(positions[0].max(), torch.tensor(23.0), atol=1e-4)
    assert torch.isclose(positions[1].min(), torch.tensor(0.0), atol=1e-4)


@pytest.mark.parametrize("cls", [RecResACNet, UNet])
def test_recursion_composes_second_pass_after_first(cls):
    torch.manual_seed(0)
    net = _small(cls, 2).eval()
    with torch.no_grad():  # visible but moderate displacements
        final = net.conv_out if cls is RecResACNet else net.head[-1]
        final.weight.mul_(200 if cls is UNet else 2000)  # both heads start near zero
        image = torch.rand(1, 1, 32, 32)
        t = torch.tensor([6])
        first = net(image, t, recursions=1)
        second = net(warp(image, first), t, recursions=1)
        twice = net(image, t)
    assert net.recursions == 2
    assert first.abs().max() > 0.1
    torch.testing.assert_close(twice, compose_fields(first, second), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(twice, first, atol=1e-3)


def test_recresacnet_parameter_count_matches_method_doc():
    net = RecResACNet()
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert total - trainable == 80 * 100  # the frozen step table
    assert abs(total - 0.44e6) < 0.005e6
    assert abs(trainable - 0.435e6) < 0.005e6


def test_sinusoidal_table_is_the_transformer_encoding():
    table = sinusoidal_table(80, 100)
    assert table.shape == (80, 100)
    t, k = 37, 6
    frequency = 10_000 ** (-2 * k / 100)
    assert math.isclose(table[t, 2 * k].item(), math.sin(t * frequency), abs_tol=1e-6)
    assert math.isclose(table[t, 2 * k + 1].item(), math.cos(t * frequency), abs_tol=1e-6)
    with pytest.raises(ValueError, match="even dim"):
        sinusoidal_table(10, 7)


@pytest.mark.parametrize(
    ("image", "t", "message"),
    [
        (torch.rand(1, 2, 32, 32), torch.tensor([0]), "expects an image"),
        (torch.rand(1, 1, 16, 16, 16), torch.tensor([0]), "expects an image"),
        (torch.rand(1, 1, 32, 32).long(), torch.tensor([0]), "float image"),
        (torch.rand(2, 1, 32, 32), torch.tensor([0, 10]), r"0 \.\. 9"),
        (torch.rand(2, 1, 32, 32), torch.tensor([0.5, 1.0]), "integer steps"),
        (torch.rand(2, 1, 32, 32), torch.tensor([1, 2, 3]), r"shape \[2\]"),
    ],
)
def test_bad_input_raises_clear_error(image, t, message):
    with pytest.raises(ValueError, match=message):
        _small(RecResACNet, 2)(image, t)


def test_scalar_step_is_broadcast_to_the_batch():
    torch.manual_seed(0)
    net = _small(RecResACNet, 2).eval()
    image = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(image, 3), net(image, torch.tensor([3, 3])))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="ndims"):
        RecResACNet(ndims=4)
    with pytest.raises(ValueError, match="groups"):
        UNet(channels=(12, 24), groups=8)
    with pytest.raises(ValueError, match="recursions"):
        UNet(recursions=0)


# ---------------------------------------------------------------- checkpoint loading


def test_reference_checkpoint_loads_strictly(reference_dir):
    path = reference_dir / CHECKPOINT
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = load_reference_checkpoint(path)
    assert isinstance(net, RecResACNet) and not net.training
    assert (net.ndims, net.in_channels, net.timesteps) == (2, 1, 80)
    loaded = net.state_dict()
    assert list(loaded) == list(state) and len(loaded) == 193
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not net.time_embed.weight.requires_grad
    # a freshly built default net has exactly this layout too
    RecResACNet().load_state_dict(state, strict=True)


def test_checkpoint_round_trip_infers_a_3d_layout(tmp_path):
    torch.manual_seed(0)
    # a .pth loads with the authors' bound on the displacement components
    net = RecResACNet(
        ndims=3,
        in_channels=2,
        timesteps=12,
        time_dim=16,
        channels=(4, 8, 8),
        displacement_limit="component",
    )
    path = tmp_path / "net3d.pth"
    torch.save(net.state_dict(), path)
    loaded = load_reference_checkpoint(path)
    assert (loaded.ndims, loaded.in_channels, loaded.timesteps) == (3, 2, 12)
    assert loaded.displacement_limit == "component"
    image = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, 5), net.eval()(image, 5))


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_reference_checkpoint(tmp_path / "missing.pth")

    state = _small(RecResACNet, 2).state_dict()
    broken = dict(state)
    del broken["b2.1.convs.0.weight"]
    broken["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match="broken.pth") as error:
        load_reference_checkpoint(path)
    assert "b2.1.convs.0.weight" in str(error.value) and "extra.weight" in str(error.value)

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    with pytest.raises(ValueError, match="not a plain state_dict"):
        load_reference_checkpoint(wrapped)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        load_reference_checkpoint(text)


def test_reference_net_recovers_a_deformation_in_voxels(reference_dir):
    """The authors' weights + our unit conversion undo a deformation of the reference scale.

    The net was trained on fields of the reference schedule; at step t it predicts the recovery
    target k_rec(t) (not the whole deformation), so (1) warping the deformed image by the
    prediction must bring it closer to the original, and (2) the prediction, resampled at the
    target's end points, must cancel the target with a best scalar factor near 1 (a factor-2 unit
    error or swapped channels fail this: ~0.45 / ~1.8 or ~0).
    """
    torch.manual_seed(0)
    image = nib.load(reference_dir / "cmr_unlabelled_162867.nii.gz").get_fdata()
    image = torch.as_tensor(image, dtype=torch.float32)[None, None]
    assert image.shape == (1, 1, 256, 256)
    net = load_reference_checkpoint(reference_dir / CHECKPOINT)
    t = torch.tensor([15])
    process = RandomDeformation(ndims=2, timesteps=80, integrator="reference", v_scale=4e-5)
    diffused, target = process((256, 256), t, generator=torch.Generator().manual_seed(0))
    deformed = warp(image, diffused)
    with torch.no_grad():
        prediction = net(deformed, t)
    recovered = warp(deformed, prediction)
    mse_deformed = F.mse_loss(deformed, image)
    mse_recovered = F.mse_loss(recovered, image)
    assert mse_recovered < 0.9 * mse_deformed
    resampled = warp(prediction, target, padding="border")
    best_scale = -(resampled * target).sum() / (resampled * resampled).sum()
    assert 0.7 < best_scale < 1.3
    relative_error = (resampled + target).pow(2).sum() / target.pow(2).sum()
    assert relative_error < 0.4


# ---------------------------------------------------------------- Hydra configs


@pytest.mark.parametrize(("name", "cls"), [("recresacnet", RecResACNet), ("unet", UNet)])
def test_hydra_config_instantiates_the_network(name, cls):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+net={name}"])
        cfg3 = compose(config_name=None, overrides=[f"+net={name}", "net.ndims=3"])
    net = instantiate(cfg.net)
    assert type(net) is cls and net.ndims == 2 and net.timesteps == cfg.net.timesteps
    net3 = instantiate(cfg3.net)
    assert net3.ndims == 3
    with torch.no_grad():
        assert net(torch.rand(1, 1, 16, 16), torch.tensor([2])).shape == (1, 2, 16, 16)


def test_hydra_reference_config_loads_the_checkpoint(reference_dir):
    path = reference_dir / CHECKPOINT
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+net=reference", f"net.path={path}"])
    net = instantiate(cfg.net)
    assert isinstance(net, RecResACNet) and net.timesteps == 80
