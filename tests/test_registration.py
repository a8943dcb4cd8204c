"""RegistrationModule and RegistrationUNet: modes, losses, a real Lightning fit and test."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from drdm.deform import folding_ratio, warp
from drdm.field_sources import BSplineFieldSource
from drdm.metrics.pairwise import endpoint_error
from drdm.models.registration import RegistrationModule, parse_mode
from drdm.nets.registration_unet import RegistrationUNet
from drdm.registration import make_pair

SMALL_NET = {
    "_target_": "drdm.nets.registration_unet.RegistrationUNet",
    "ndims": 2,
    "encoder_channels": [8, 16, 16],
    "decoder_channels": [16, 16, 16],
    "final_channels": [8],
}
BSPLINE = {
    "_target_": "drdm.field_sources.BSplineFieldSource",
    "ndims": 2,
    "cells": [2, 4],
    "amplitudes": [2.0, 1.0],
}


def adam(lr: float) -> dict:
    """A partial Adam config, as conf/model/registration.yaml writes it."""
    return {"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr}


def _blobs(count: int, shape, seed: int) -> torch.Tensor:
    """Smooth random images ``[count, 1, *shape]`` in 0..1 (structure at several scales)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, *[6] * len(shape), generator=generator)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


class ShiftPairs(Dataset):
    """Real-pair stand-in: fixed = moving shifted by a known amount, labels and landmarks."""

    def __init__(self, count: int = 4, shape=(32, 32), seed: int = 0):
        self.images = _blobs(count, shape, seed)
        self.shape = shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        ndims = len(self.shape)
        moving = self.images[index]
        shift = torch.zeros(1, ndims, *self.shape)
        shift[:, 0] = 1.5
        fixed = warp(moving[None], shift)[0]
        label = (moving > 0.5).long()
        points = torch.tensor([[10.0] * ndims, [20.0] * ndims])
        return {
            "moving": moving,
            "fixed": fixed,
            "moving_label": label,
            "fixed_label": warp(label[None], shift, mode="nearest")[0],
            "moving_keypoints": points + torch.tensor([1.5] + [0.0] * (ndims - 1)),
            "fixed_keypoints": points,
            "displacement": shift[0],
            "spacing": torch.ones(ndims),
            "affine": torch.eye(4, dtype=torch.float64),
            "id": f"pair{index}",
        }


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("unsupervised", ("unsupervised", False)),
        ("synthetic_bspline", ("synthetic_bspline", False)),
        ("synthetic_drdm+real", ("synthetic_drdm", True)),
    ],
)
def test_parse_mode(mode, expected):
    assert parse_mode(mode) == expected


@pytest.mark.parametrize("mode", ["unsupervised+real", "synthetic", "synthetic_bspline+fake"])
def test_parse_mode_rejects_unknown_names(mode):
    with pytest.raises(ValueError, match="model.mode must be one of"):
        parse_mode(mode)


def test_synthetic_modes_need_their_field_source():
    with pytest.raises(ValueError, match="model.field_sources.synthetic_bspline"):
        RegistrationModule(SMALL_NET, mode="synthetic_bspline")
    unset_drdm = {"_target_": "drdm.field_sources.DRDMFieldSource", "checkpoint": None}
    with pytest.raises(ValueError, match="model.field_sources.synthetic_drdm.checkpoint"):
        RegistrationModule(
            SMALL_NET, mode="synthetic_drdm", field_sources={"synthetic_drdm": unset_drdm}
        )
    # an unused, unset DRDM source is never built
    RegistrationModule(SMALL_NET, mode="unsupervised", field_sources={"synthetic_drdm": unset_drdm})


@pytest.mark.parametrize("shape", [(24, 28), (12, 16, 10)])
@pytest.mark.parametrize("integration_steps", [0, 4])
def test_net_shapes_and_identity_start(shape, integration_steps):
    net = RegistrationUNet(
        ndims=len(shape),
        encoder_channels=[4, 8],
        decoder_channels=[8, 8],
        final_channels=[4],
        integration_steps=integration_steps,
    )
    moving, fixed = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    displacement = net(moving, fixed)
    assert displacement.shape == (2, len(shape), *shape)
    assert displacement.abs().max() < 1e-2  # near-zero head: training starts at identity
    with pytest.raises(ValueError, match="must both be"):
        net(moving, fixed[:1])


def test_velocity_integration_prevents_folding():
    torch.manual_seed(0)
    net = RegistrationUNet(2, encoder_channels=[4], decoder_channels=[4], final_channels=[])
    net_svf = RegistrationUNet(
        2, encoder_channels=[4], decoder_channels=[4], final_channels=[], integration_steps=6
    )
    with torch.no_grad():  # a large, rough output field
        torch.nn.init.normal_(net.flow.weight, std=10.0)
    net_svf.load_state_dict(net.state_dict())
    moving = _blobs(1, (32, 32), 0)
    fixed = _blobs(1, (32, 32), 1)
    assert folding_ratio(net(moving, fixed)).item() > 0.05
    assert folding_ratio(net_svf(moving, fixed)).item() < 0.01


@pytest.mark.parametrize("mode", ["unsupervised", "synthetic_bspline", "synthetic_bspline+real"])
def test_fit_and_test_each_mode(mode):
    L.seed_everything(0)
    model = RegistrationModule(
        SMALL_NET,
        mode=mode,
        field_sources={"synthetic_bspline": BSPLINE},
        optimizer=adam(1e-3),
        ncc_window=5,
    )
    loader = DataLoader(ShiftPairs(), batch_size=2)
    trainer = _trainer(steps=2)
    trainer.fit(model, loader, loader)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert "val/dice" in logged and "val/tre" in logged and "val/field_error" in logged
    if mode != "unsupervised":
        assert "train/synthetic_field_error" in logged
    assert ("train/real_dissimilarity" in logged) == (mode != "synthetic_bspline")
    trainer.test(model, loader)
    assert [row["id"] for row in model.test_rows] == [f"pair{i}" for i in range(4)]
    assert {"dice", "hd95", "asd", "tre", "field_error", "folding_ratio"} <= set(model.test_rows[0])


@pytest.mark.slow
def test_synthetic_training_learns_the_field():
    # the field loss must actually teach the network: endpoint error on held-out MRBS pairs
    # (fields and images the training never saw) drops clearly below the identity's error
    # (about 0.8x after 250 steps; a network that ignores its inputs stays at 1x).
    # The module's own training_step drives a plain Adam loop (a Trainer adds only overhead).
    torch.manual_seed(0)
    source = BSplineFieldSource(ndims=2, cells=[1], amplitudes=[2.0])
    model = RegistrationModule(
        SMALL_NET,
        mode="synthetic_bspline",
        field_sources={"synthetic_bspline": source},
        similarity_weight=0.0,
        smoothness_weight=0.0,
        optimizer=adam(3e-3),
    )
    optimizer = model.configure_optimizers()
    images = torch.sigmoid(10 * (_blobs(16, (32, 32), seed=3) - 0.5))  # sharp edges
    for step in range(250):
        batch = {"image": images[torch.randperm(16)[:8]]}
        loss = model.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out_images = torch.sigmoid(10 * (_blobs(8, (32, 32), seed=99) - 0.5))
    held_out = make_pair(
        held_out_images, source(held_out_images, generator=torch.Generator().manual_seed(9))
    )
    with torch.no_grad():
        predicted = model(held_out.moving, held_out.fixed)
    identity_error = endpoint_error(torch.zeros_like(predicted), held_out.displacement).mean()
    learned_error = endpoint_error(predicted, held_out.displacement).mean()
    assert learned_error < 0.9 * identity_error, (learned_error, identity_error)


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    model = RegistrationModule(
        SMALL_NET, mode="synthetic_bspline", field_sources={"synthetic_bspline": BSPLINE}
    )
    trainer = _trainer(steps=1)
    trainer.fit(model, DataLoader(ShiftPairs(count=2), batch_size=2))
    path = tmp_path / "registration.ckpt"
    trainer.save_checkpoint(path)
    loaded = RegistrationModule.load_from_checkpoint(path)
    assert loaded.hparams.mode == "synthetic_bspline"
    pair = ShiftPairs(count=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pair["moving"][None], pair["fixed"][None]),
            model(pair["moving"][None], pair["fixed"][None]),
        )
