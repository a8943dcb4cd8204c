"""SegmentationModule and its U-Net: shapes, loss, a real fit + test on the embedded data."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from drdm.losses import soft_dice_loss
from drdm.models.segmentation import SegmentationModule
from drdm.nets.segmentation_unet import SegmentationUNet
from drdm.utils.instantiate import load_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def test_unet_shapes_2d_and_3d():
    net = SegmentationUNet(ndims=2, in_channels=1, num_classes=4, channels=[4, 8, 16])
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 4, 32, 32)
    net3d = SegmentationUNet(ndims=3, in_channels=1, num_classes=3, channels=[4, 8])
    assert net3d(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="ndims"):
        SegmentationUNet(ndims=4)


def test_soft_dice_loss_is_zero_for_a_confident_correct_prediction():
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[:, :, 4:10, 4:10] = 1
    label[:, :, 11:15, 2:6] = 2
    logits = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 20
    assert soft_dice_loss(logits, label).item() == pytest.approx(0.0, abs=1e-4)
    wrong = torch.roll(logits, shifts=1, dims=1)
    assert soft_dice_loss(wrong, label).item() > 0.9


def test_class_names_must_match_the_net():
    with pytest.raises(ValueError, match="4 classes"):
        SegmentationModule(SegmentationUNet(num_classes=4), class_names=["bg", "a", "b"])
    with pytest.raises(ValueError, match="num_classes=4"):
        SegmentationModule(
            {"_target_": "drdm.nets.segmentation_unet.SegmentationUNet", "num_classes": 4},
            class_names=["bg", "a"],
        )


def _embedded_segmentation_data(n_labelled: int = 1):
    config = load_config(CONF_DIR / "data" / "default.yaml")
    config.task = "segmentation"
    config.n_labelled = n_labelled
    config.split.val_ids = ["icbm152_b00_00_04"]
    config.split.test_ids = ["icbm152_b00_00_02", "icbm152_b00_00_06"]
    return instantiate(config)


def _strategy(name: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose(f"augmentation/{name}", overrides=["+data.ndims=2"])
    OmegaConf.set_struct(config, False)
    # drdm_forward interpolates ${deformation}: the root config's forward process
    config.deformation = load_config(CONF_DIR / "deformation" / "default.yaml")
    return config.augmentation


@pytest.mark.slow
def test_fit_and_test_log_per_class_metrics_and_figures(tmp_path):
    L.seed_everything(0)
    data = _embedded_segmentation_data()
    model = SegmentationModule(
        net={
            "_target_": "drdm.nets.segmentation_unet.SegmentationUNet",
            "ndims": 2,
            "channels": [4, 8],
        },
        class_names=data.class_names,
        augmentation=_strategy("drdm_forward"),
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3},
        figure_every_n_epochs=1,
        figure_samples=2,
    )
    trainer = L.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data)[0]

    classes = ["csf_other_brain", "grey_matter", "white_matter"]
    for metric in ("dice", "sensitivity", "precision", "hd95"):
        for name in [*classes, "mean"]:
            assert f"test/{metric}_{name}" in results
    assert 0.0 <= results["test/dice_mean"] <= 1.0
    assert results["test/hd95_mean"] >= 0.0

    document = json.loads((tmp_path / "test_metrics.json").read_text())
    assert document["augmentation"] == "drdm_forward"
    assert document["num_test_samples"] == len(data.samples["test"])
    assert document["metrics"]["dice_mean"] == pytest.approx(results["test/dice_mean"])
    assert {"id", "dice_grey_matter", "hd95_white_matter"} <= set(document["per_sample"][0])

    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert [f.name for f in figures] == ["predictions_epoch001.png", "predictions_epoch002.png"]

    # the DRDM batch transform ran on training batches: synthetic samples were seen
    with open(next(tmp_path.glob("csv/*/metrics.csv"))) as stream:
        rows = list(csv.DictReader(stream))
    fractions = [
        float(r["train/synthetic_fraction"]) for r in rows if r["train/synthetic_fraction"]
    ]
    assert fractions and max(fractions) > 0
    assert model.hparams["net"]["channels"] == [4, 8]  # the config is in the checkpoint
