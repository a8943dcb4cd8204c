"""Registration end to end through Hydra: every training mode on the embedded default experiment
(real compose, real Trainer, a real DRDM checkpoint for ``synthetic_drdm``), and ``src/eval.py``
writing geometry-preserving NIfTI outputs and a per-pair CSV."""

import csv
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.overrides import TINY_REGISTRATION
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_train import compose_train

from drdm.apps.train import train
from drdm.deform import warp
from drdm.models.registration import RegistrationModule
from drdm.utils.instantiate import build

REPO = Path(__file__).resolve().parents[1]
MODES = [
    "unsupervised",
    "synthetic_bspline",
    "synthetic_bspline+real",
    "synthetic_drdm",
    "synthetic_drdm+real",
]


def _eval_script():
    spec = importlib.util.spec_from_file_location("drdm_eval_script", REPO / "src" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_drdm(tmp_path_factory) -> Path:
    """A one-step DRDM on the embedded default (32 x 32), saved as a Lightning checkpoint."""
    folder = tmp_path_factory.mktemp("drdm")
    cfg = compose_train(
        folder,
        [
            "~experiment",  # not the first run: a tiny net from scratch
            "torch_threads=1",
            "logger=csv",
            "callbacks=none",
            "data.image_size=[32,32]",
            "data.batch_size=2",
            "model.net.channels=[4,8,8]",
            "model.net.recursions=1",
            "model.figure_every_n_epochs=0",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=0",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
        ],
    )
    result = train(cfg)
    path = folder / "drdm.ckpt"
    result["trainer"].save_checkpoint(path)
    return path


@pytest.mark.slow
def test_every_mode_trains_through_hydra_and_evaluates(tmp_path, tiny_drdm):
    for mode in MODES:
        folder = tmp_path / mode.replace("+", "_")
        cfg = compose_train(
            folder,
            [
                *TINY_REGISTRATION,
                f"model.mode={mode}",
                f"model.field_sources.synthetic_drdm.checkpoint={tiny_drdm}",
                "model.field_sources.synthetic_drdm.t0=[4]",
                "model.field_sources.synthetic_drdm.fields_per_image=1",
            ],
        )
        result = train(cfg)
        metrics, model = result["metrics"], result["model"]
        assert result["trainer"].global_step == 1, mode
        assert np.isfinite(metrics["train/loss"]), mode
        # held-out pairs carry their true field: every metric of the issue is reported
        for name in ("dice", "hd95", "asd", "field_error", "folding_ratio", "sd_log_jacobian"):
            assert np.isfinite(metrics[f"val/{name}"]), (mode, name)
        assert ("train/synthetic_field_error" in metrics) == (mode != "unsupervised"), mode
        assert ("train/real_dissimilarity" in metrics) == (
            mode == "unsupervised" or mode.endswith("+real")
        ), mode
        assert model.hparams.mode == mode
        if mode.startswith("synthetic_drdm"):
            # the DRDM bank holds fields_per_image fields per training image it has seen
            bank = model.field_source.bank
            assert bank and all(
                len(fields) == 1 and fields[0].shape == (2, 32, 32) for fields in bank.values()
            )


@pytest.mark.slow
def test_eval_writes_geometry_preserving_outputs(tmp_path, capfd):
    cfg = compose_train(tmp_path / "train", [*TINY_REGISTRATION, "model.mode=synthetic_bspline"])
    result = train(cfg)
    checkpoint = tmp_path / "registration.ckpt"
    result["trainer"].save_checkpoint(checkpoint)

    output = tmp_path / "eval"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        eval_cfg = compose(
            "eval",
            overrides=[
                "experiment=default_registration",
                f"checkpoint={checkpoint}",
                f"output_dir={output}",
                "device=cpu",
                "data.image_size=[32,32]",
                "data.eval_batch_size=2",
                "data.pairs.max_pairs_eval=2",
            ],
        )
    csv_path = _eval_script().evaluate(eval_cfg)
    # a progress bar over the pairs on stderr (tqdm: "2/2 [..., x.xx pair/s]")
    progress = capfd.readouterr().err
    assert "2/2" in progress and "pair/s" in progress, progress[-500:]

    with open(csv_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and all(row["mode"] == "synthetic_bspline" for row in rows)
    for name in ("dice", "hd95", "asd", "field_error", "folding_ratio", "sd_log_jacobian"):
        assert all(np.isfinite(float(row[name])) for row in rows), name
    assert (output / "summary.csv").is_file()

    # the same pairs, as the evaluation saw them
    datamodule = build(eval_cfg.data)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    model = RegistrationModule.load_from_checkpoint(checkpoint, mode="unsupervised").eval()
    with torch.no_grad():
        predicted = model(batch["moving"], batch["fixed"])
    for index, pair_id in enumerate(batch["id"]):
        folder = output / "pairs" / pair_id
        affine = batch["affine"][index].numpy()
        warped = nib.load(folder / "warped.nii.gz")
        label = nib.load(folder / "warped_label.nii.gz")
        field = nib.load(folder / "displacement.nii.gz")
        for image in (warped, label, field):
            np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert field.shape == (32, 32, 1, 1, 2)
        assert int(field.header["intent_code"]) == 1006  # NIFTI_INTENT_DISPVECT
        # mm (world frame) back to voxels with the affine's in-plane block, then re-apply
        millimetres = np.asarray(field.dataobj)[:, :, 0, 0, :]  # [X, Y, 2]
        voxels = np.einsum("ij,xyj->ixy", np.linalg.inv(affine[:2, :2]), millimetres)
        voxels = torch.from_numpy(voxels).float()[None]
        torch.testing.assert_close(voxels, predicted[index : index + 1], atol=1e-4, rtol=1e-4)
        rewarped = warp(batch["moving"][index : index + 1], voxels)[0, 0].numpy()
        np.testing.assert_allclose(np.asarray(warped.dataobj)[..., 0], rewarped, atol=1e-4)
        relabelled = warp(batch["moving_label"][index : index + 1], voxels, mode="nearest")
        assert np.array_equal(np.asarray(label.dataobj)[..., 0], relabelled[0, 0].numpy())


@pytest.mark.parametrize(
    ("experiment", "ndims", "pair_mode", "monitor"),
    [
        ("acdc_registration", 2, "source", "val/dice"),
        ("acdc_registration_3d", 3, "source", "val/dice"),
        ("lungct_registration", 3, "source", "val/tre"),
        ("default_registration", 2, "across", "val/field_error"),
    ],
)
def test_registration_experiments_compose(tmp_path, experiment, ndims, pair_mode, monitor):
    cfg = compose_train(tmp_path, [f"experiment={experiment}", "data.root=/nonexistent"])
    assert cfg.data.task == "registration" and cfg.data.ndims == ndims
    assert cfg.data.pairs.mode == pair_mode
    assert cfg.callbacks.model_checkpoint.monitor == monitor
    assert cfg.model.net.ndims == ndims
    assert cfg.model.field_sources.synthetic_bspline.ndims == ndims
    # the configured network and MRBS source run at the experiment's size
    model = build(cfg.model, mode="synthetic_bspline")
    shape = [min(size, 32) for size in cfg.data.image_size]
    images = torch.rand(1, 1, *shape)
    assert model(images, images).shape == (1, ndims, *shape)
    assert model.field_source(images).shape == (1, ndims, *shape)
