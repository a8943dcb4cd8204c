"""DRDMModule: the training step, determinism of the on-device fields, learning, checkpoints."""

import lightning as L
import pytest
import torch

from drdm.deform import warp
from drdm.generation import DRDM
from drdm.models import DRDMModule


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run much faster on one thread on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(ndims=2, size=32, timesteps=20, **kwargs):
    net = {
        "_target_": "drdm.nets.RecResACNet",
        "ndims": ndims,
        "timesteps": timesteps,
        "channels": [4, 8, 8],
        "recursions": 1,
    }
    schedule = {
        "_target_": "drdm.deform.RandomDeformation",
        "ndims": ndims,
        "timesteps": timesteps,
        "control_size": 16,
        "v_scale": 8e-5,
    }
    return DRDMModule(net, schedule, image_size=[size] * ndims, ndims=ndims, **kwargs)


def blob_images(batch=2, size=32, ndims=2):
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size)] * ndims, indexing="ij")
    radius = sum(a**2 for a in axes).sqrt()
    image = (radius < 0.6).float() * 0.5 + (radius < 0.3).float() * 0.5
    return image.expand(batch, 1, *[size] * ndims).clone()


def test_fields_are_reproducible_and_depend_on_the_step_keys():
    module = tiny_module()
    image = blob_images()
    first = module._forward_process(image, module._generator(0, 3))
    again = module._forward_process(image, module._generator(0, 3))
    other = module._forward_process(image, module._generator(0, 4))
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], other[1])


def test_training_step_gives_a_finite_loss_with_gradients():
    module = tiny_module()
    terms, parts = module._step(module.net, blob_images(), module._generator(0, 0))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in module.net.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert parts["prediction"].shape == (2, 2, 32, 32)


def test_bad_batches_and_mismatched_parts_raise():
    module = tiny_module()
    with pytest.raises(ValueError, match="image"):
        module._check_batch({"label": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        module._check_batch({"image": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match="timesteps"):
        DRDMModule(
            {"_target_": "drdm.nets.RecResACNet", "timesteps": 10, "channels": [4, 8, 8]},
            {"_target_": "drdm.deform.RandomDeformation", "timesteps": 20},
            image_size=[32, 32],
        )


def test_loss_decreases_on_a_tiny_fixed_problem():
    torch.manual_seed(0)
    module = tiny_module()
    optimizer = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    image = blob_images(batch=4)
    losses = []
    for _ in range(30):
        # the same t and fields at every step: a fixed regression problem
        generator = module._generator(0, 0)
        generator_t = torch.Generator().manual_seed(1)
        t = torch.randint(5, module.timesteps, (4,), generator=generator_t)
        diffused, target = module.deformation((32, 32), t, generator=generator)
        prediction = module.net(warp(image, diffused), t)
        terms = module.loss(prediction, warp(prediction, target, padding="border"), target)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def _fit(module, tmp_path, steps=2, size=32, ndims=2, **trainer_options):
    images = blob_images(batch=8, size=size, ndims=ndims)
    data = [{"image": images[i]} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        **trainer_options,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, loader, loader)
    return trainer


def test_checkpoint_round_trip_rebuilds_the_module(tmp_path):
    module = tiny_module(ema_decay=0.9, figure_every_n_epochs=1, figure_t0=6)
    trained = {}

    class KeepTrainedWeights(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            trained.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    trainer = _fit(module, tmp_path, callbacks=[KeepTrainedWeights()])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # after fitting the module holds the EMA weights, not the last trained ones
    assert not torch.equal(trained["conv_out.weight"], module.net.conv_out.weight)
    assert (tmp_path / "figures").is_dir() and any((tmp_path / "figures").glob("*.png"))

    loaded = DRDMModule.load_from_checkpoint(path, map_location="cpu")
    image, t = blob_images(), torch.tensor([3, 7])
    module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(module(image, t), loaded(image, t))
        assert torch.allclose(module.net(image, t), loaded.net(image, t))

    drdm = DRDM.load(path)
    assert drdm.image_size == (32, 32) and drdm.timesteps == 20
    out = drdm.generate(blob_images(1)[0, 0], num_samples=2, t0=5, seed=3)
    assert out.displacement.shape == (2, 2, 32, 32)


def test_three_dimensional_module_trains_a_step(tmp_path):
    module = tiny_module(ndims=3, size=16, figure_every_n_epochs=0)
    trainer = _fit(module, tmp_path, steps=1, size=16, ndims=3)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_ema_updates_once_per_optimiser_step_with_accumulated_gradients(tmp_path):
    """4 batches with accumulate_grad_batches=2 are 2 optimiser steps: 2 EMA updates, and the
    EMA is the warmed-up average of the weights after each of those steps (a per-batch update
    would count 4 and average in the unchanged weights of the in-between batches)."""
    from drdm.models.ema import WarmedUpEMA

    module = tiny_module(ema_decay=0.5, figure_every_n_epochs=0)
    after_steps = []

    class WeightsAfterEachStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % 2 == 0:
                after_steps.append(pl_module.net.conv_out.weight.detach().clone())

    # after the EMA callback (the module's callbacks come last): see the weights it averaged
    trainer = _fit(
        module, tmp_path, steps=4, accumulate_grad_batches=2, callbacks=[WeightsAfterEachStep()]
    )
    ema = next(c for c in trainer.callbacks if isinstance(c, WarmedUpEMA))
    assert trainer.global_step == 2 and int(ema._average_model.n_averaged) == 2
    # first update copies, the second uses weight min(0.5, 2/11) for the old average
    expected = after_steps[0].lerp(after_steps[1], 1 - 2 / 11)
    averaged = ema.averaged_module.net.conv_out.weight
    torch.testing.assert_close(module.net.conv_out.weight, expected)  # left in the module
    assert torch.equal(averaged, module.net.conv_out.weight)


def test_ema_warm_up_follows_early_and_averages_late():
    from drdm.models.ema import warmed_up_ema

    average = warmed_up_ema(0.999)
    early = average(torch.zeros(()), torch.ones(()), torch.tensor(1))
    late = average(torch.zeros(()), torch.ones(()), torch.tensor(100_000))
    # after one update the weight of the new value is 1 - 2/11; late it is 1 - decay
    assert float(early) == pytest.approx(9 / 11)
    assert float(late) == pytest.approx(0.001)
