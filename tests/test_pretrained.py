"""The packaged default DRDM (drdm.pretrained): it loads, recovers, and is what the tools use."""

import subprocess
import sys
from pathlib import Path

import lightning
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from drdm.checkpoints import export_checkpoint, resolve_checkpoint
from drdm.generation import DRDM
from drdm.metrics.recovery import evaluate_recovery, fixed_validation_fields
from drdm.models import DRDMModule
from drdm.pretrained import DEFAULT_MODEL
from drdm.utils.instantiate import build

REPO = Path(__file__).resolve().parents[1]
# measured for the shipped file by experiments/default_model (README there); a retrained model
# must stay well below 1 ("predicts nothing") on the fixed validation fields
MAX_RECOVERY_ERROR = 0.9


def embedded_validation_images() -> torch.Tensor:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused"])
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    batches = datamodule.dataloader("val", shuffle=False)
    return torch.cat([batch["image"] for batch in batches]).float()


def test_default_resolves_to_the_packaged_file():
    assert resolve_checkpoint("default") == DEFAULT_MODEL
    assert DEFAULT_MODEL.is_file()
    assert DEFAULT_MODEL.stat().st_size < 4 * 2**20  # a few MB at most
    assert resolve_checkpoint("x/y.ckpt") == Path("x/y.ckpt")


def test_the_packaged_model_recovers_on_held_out_slices():
    drdm = DRDM.load("default")
    assert drdm.image_size == (64, 64) and drdm.timesteps == 80
    deformed, t, target = fixed_validation_fields(embedded_validation_images(), drdm.deformation)
    measured = evaluate_recovery(drdm.net, deformed, t, target)
    assert measured["recovery_error"] < MAX_RECOVERY_ERROR, measured
    assert measured["folding_ratio"] < 0.01, measured


def test_packaged_samples_move_the_anatomy_without_folding():
    drdm = DRDM.load("default")
    images = embedded_validation_images()[:2]
    out = drdm.generate(images, num_samples=2, seed=0)
    displacement = torch.as_tensor(out.displacement)
    assert displacement.abs().amax() > 1.0  # voxels: a visible deformation, not the identity
    assert float(torch.as_tensor(out.folding_ratio).max()) < 0.01


@pytest.mark.parametrize("layout", ["weight_averaging", "legacy"])
def test_export_keeps_the_ema_weights_and_drops_the_training_state(tmp_path, layout):
    module = DRDMModule(
        net={"_target_": "drdm.nets.RecResACNet", "channels": [4, 4, 4], "recursions": 1},
        deformation={"_target_": "drdm.deform.RandomDeformation", "ndims": 2, "control_size": 16},
        image_size=(32, 32),
        ema_decay=0.9,
    )
    trained = module.state_dict()
    averaged = {k: v + 0.5 if v.is_floating_point() else v for k, v in trained.items()}
    if layout == "weight_averaging":  # Lightning's WeightAveraging: the average in state_dict
        checkpoint = {"state_dict": averaged, "current_model_state": trained}
    else:  # before the callback: the average beside the net as ema.module.*
        ema = {"ema.module." + k[len("net.") :]: v for k, v in averaged.items()}
        checkpoint = {"state_dict": {**trained, **ema}}
    full = tmp_path / "full.ckpt"
    version = {"pytorch-lightning_version": lightning.__version__}
    torch.save({**checkpoint, "hyper_parameters": dict(module.hparams), **version}, full)
    slim = export_checkpoint(full, tmp_path / "slim.ckpt")
    loaded = DRDMModule.load_from_checkpoint(slim)
    assert loaded.hparams.ema_decay is None and "current_model_state" not in torch.load(slim)
    for name, tensor in loaded.net.state_dict().items():
        assert torch.equal(tensor, averaged["net." + name]), name
    # the trained weights on request, and a legacy checkpoint loads as the module it was
    raw = export_checkpoint(full, tmp_path / "raw.ckpt", use_ema=False)
    for name, tensor in DRDMModule.load_from_checkpoint(raw).net.state_dict().items():
        assert torch.equal(tensor, trained["net." + name]), name
    restored = DRDMModule.load_from_checkpoint(full)
    for name, tensor in restored.net.state_dict().items():
        assert torch.equal(tensor, averaged["net." + name]), name


@pytest.mark.slow
def test_augment_uses_the_packaged_model_by_default(tmp_path):
    image = embedded_validation_images()[0, 0].numpy()
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    source = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(image[..., None].astype(np.float32), affine), source)
    output = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "src" / "augment.py"),
        f"input={source}",
        f"output_dir={output}",
        "num_samples=1",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sample = nib.load(output / "image" / "slice_0.nii.gz")
    np.testing.assert_allclose(sample.affine, affine)
    assert not np.allclose(np.asarray(sample.dataobj)[..., 0], image, atol=1e-3)


def test_the_packaged_recommendation_applies_only_where_the_caller_sets_nothing():
    drdm = DRDM.load("default")
    assert (drdm.t0_start, drdm.start_step) == (24, "t0")
    # None means "not set" (conf/augment.yaml's nulls); an explicit value wins
    drdm = DRDM.load("default", t0_start=None, start_step="T", margin=None)
    assert (drdm.t0_start, drdm.start_step, drdm.margin) == (24, "T", 8)


def test_the_embedded_experiments_use_the_packaged_model_through_their_configs():
    from drdm.field_sources import DRDMFieldSource

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        fewshot = compose("train", overrides=["experiment=default_fewshot", "augmentation=drdm"])
        registration = compose("train", overrides=["experiment=default_registration"])
        augment = compose("augment", overrides=["input=x", "output_dir=y"])
    strategy = build(fewshot.augmentation)
    sources = [t.source for t in strategy.batch_transforms if hasattr(t, "source")]
    assert sources and all(source.checkpoint == DEFAULT_MODEL for source in sources)
    field_source = build(registration.model.field_sources.synthetic_drdm)
    assert isinstance(field_source, DRDMFieldSource) and field_source.checkpoint == DEFAULT_MODEL
    assert resolve_checkpoint(augment.ckpt_path) == DEFAULT_MODEL
