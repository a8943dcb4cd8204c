"""Fine-tuning from the authors' weights: strict initialisation and a short fine-tune.

Runs the real Trainer on the shared ACDC slices (skipped without ``../shared``) written as
NIfTI files, through ``experiment=finetune_reference``.
"""

import nibabel as nib
import numpy as np
import pytest
import torch
from test_train import compose_train

from drdm.apps.train import train
from drdm.checkpoints import initialise_from, load_reference_checkpoint
from drdm.nets import RecResACNet

CHECKPOINT = "cmr_recresacnet_reference.pth"


def write_acdc_halves(reference, root):
    """Slices 0-4 and 5-9 of the ACDC volume as two subjects, plus the unlabelled slice."""
    volume = nib.load(reference / "acdc_patient001_frame01.nii.gz")
    data = np.asarray(volume.dataobj)
    (root / "images").mkdir(parents=True)
    for name, part in (("acdc_a", slice(0, 5)), ("acdc_b", slice(5, 10))):
        image = nib.Nifti1Image(data[..., part], volume.affine, volume.header)
        nib.save(image, root / "images" / f"{name}.nii.gz")
    unlabelled = nib.load(reference / "cmr_unlabelled_162867.nii.gz")
    slab = np.asarray(unlabelled.dataobj, dtype=np.float32)[..., None]
    nib.save(nib.Nifti1Image(slab, unlabelled.affine), root / "images" / "unlabelled.nii.gz")


@pytest.mark.slow
def test_finetune_from_the_authors_checkpoint_starts_good_and_does_not_get_worse(
    tmp_path, reference_dir
):
    reference = reference_dir
    data_root = tmp_path / "data"
    write_acdc_halves(reference, data_root)
    cfg = compose_train(
        tmp_path / "run",
        [
            "experiment=finetune_reference",
            "data=nifti_folder",
            f"data.root={data_root}",
            "data.source.labels=null",
            "data.split.train_ids=[acdc_a]",
            "data.split.val_ids=[acdc_b]",
            "data.split.test_ids=[unlabelled]",
            "data.batch_size=1",
            "data.eval_batch_size=5",
            "data.num_workers=0",
            f"model.init_weights={reference / CHECKPOINT}",
            "model.figure_every_n_epochs=0",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.check_val_every_n_epoch=1",
            "logger=csv",
            "callbacks=none",
            "torch_threads=2",
        ],
    )
    result = train(cfg)
    before = result["metrics_at_start"]["val/recovery_error"]
    after = result["metrics"]["val/recovery_error"]
    # the authors' weights were loaded: their network recovers a good part of the field
    assert before < 0.9, before
    assert result["trainer"].global_step == 3
    # same fixed validation fields before and after: only the weights changed
    assert after <= before * 1.01, (before, after)
    # the step-0 value reached the logger
    metrics = (tmp_path / "run" / "csv").rglob("metrics.csv")
    text = next(metrics).read_text()
    assert "val/recovery_error" in text.splitlines()[0]


def test_initialise_from_a_pth_copies_the_authors_weights(reference_dir):
    path = reference_dir / CHECKPOINT
    net = RecResACNet()
    initialise_from(net, path)
    authors = load_reference_checkpoint(path)
    for name, tensor in authors.state_dict().items():
        assert torch.equal(net.state_dict()[name], tensor), name


def test_initialise_from_names_the_mismatched_keys(reference_dir):
    path = reference_dir / CHECKPOINT
    with pytest.raises(ValueError, match=CHECKPOINT) as error:
        initialise_from(RecResACNet(channels=(8, 16, 32)), path)
    assert "b1.0.conv0.weight" in str(error.value)
    with pytest.raises(ValueError, match=r"unexpected keys \['b1\.0\.convs\.1\.bias'"):
        initialise_from(RecResACNet(recursions=1, atrous_rates=(1,)), path)


def test_initialise_from_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        initialise_from(RecResACNet(), tmp_path / "nothing.pth")
