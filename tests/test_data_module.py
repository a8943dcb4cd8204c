"""SubjectDataModule: splits, few-shot selection, 2D slicing, pairs, patches, configs, errors."""

import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers.data_trees import write_acdc_tree, write_learn2reg_tree, write_nifti_folder
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from drdm.data import ACDCSource, Learn2RegSource, NiftiFolderSource, SubjectDataModule, save_nifti
from drdm.data.io import load_nifti
from drdm.data.preprocessing import PreprocessingConfig, preprocess_volume
from drdm.data.slicing import extract_slices

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ACDC_CLASSES = ["background", "rv", "myocardium", "lv"]


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return write_acdc_tree(tmp_path_factory.mktemp("acdc"), n_patients=8)


def acdc_module(root, **overrides):
    options = dict(
        ndims=2,
        image_size=[32, 32],
        class_names=ACDC_CLASSES,
        preprocessing={"canonical": False},
        batch_size=64,
    )
    options.update(overrides)
    return SubjectDataModule(ACDCSource(root), **options)


def groups_of(ids):
    return {i.split("_")[0] for i in ids}


def all_batches(module, split):
    return list(module.dataloader(split, shuffle=False))


def test_acdc_2d_counts_batch_contract_and_alignment(acdc_root):
    module = acdc_module(acdc_root)
    module.setup()
    summary = module.summary()
    # 8 patients -> 6/1/1 by patient; 2 frames x 6 slices per patient
    assert [summary[f"{s}_groups"] for s in ("train", "val", "test")] == [6, 1, 1]
    assert [summary[f"{s}_samples"] for s in ("train", "val", "test")] == [72, 12, 12]
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (64, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (64, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["has_label"].dtype == torch.bool and batch["has_label"].all()
    assert batch["spacing"].shape == (64, 2) and batch["spacing"].dtype == torch.float32
    torch.testing.assert_close(batch["spacing"][0], torch.tensor([1.5, 1.5]))
    assert batch["affine"].shape == (64, 4, 4) and batch["affine"].dtype == torch.float64
    assert len(batch["id"]) == 64 and "_s0" in batch["id"][0]
    assert set(batch["label"].unique().tolist()) == {0, 1, 2, 3}
    image, label = batch["image"], batch["label"]
    assert image[label == 3].mean() > 0.85 and image[label == 0].mean() < 0.2
    assert image[label == 1].mean() > 0.8  # the second bright structure too
    # affine of the 32 x 32 centre crop: pixel (0, 0) is voxel (4, 8) of the 40 x 48 slice
    sample = batch["id"].index("patient001_ED_s002") if "patient001_ED_s002" in batch["id"] else 0
    slice_index = int(batch["id"][sample].rsplit("_s", 1)[1])
    expected = np.diag([-1.5, -1.5, 10.0, 1.0]) @ [4.0, 8.0, slice_index, 1.0]
    np.testing.assert_allclose(batch["affine"][sample, :3, 3].numpy(), expected[:3])


def test_split_is_by_patient_and_deterministic(acdc_root):
    first, second, other = (acdc_module(acdc_root, seed=s) for s in (3, 3, 4))
    for module in (first, second, other):
        module.setup()
    assert first.splits == second.splits
    assert other.splits != first.splits  # 8 patients: seeds 3 and 4 permute differently
    ids = {split: [s["id"] for s in first.subjects(split)] for split in ("train", "val", "test")}
    groups = {split: groups_of(values) for split, values in ids.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    explicit = acdc_module(
        acdc_root, split={"val_ids": ["patient002"], "test_ids": ["patient005", "patient006"]}
    )
    explicit.setup()
    assert explicit.splits["test"] == ["patient005", "patient006"]
    assert len(explicit.splits["train"]) == 5


def test_few_shot_selection_keeps_labels_of_n_patients(acdc_root):
    module = acdc_module(acdc_root, task="segmentation", n_labelled=2, skip_empty_slices=True)
    module.setup()
    assert len(module.labelled_groups) == 2
    batches = all_batches(module, "train")
    has_label = torch.cat([b["has_label"] for b in batches])
    ids = [i for b in batches for i in b["id"]]
    labelled_ids = [i for i, flag in zip(ids, has_label.tolist()) if flag]
    assert groups_of(labelled_ids) == set(module.labelled_groups)
    assert has_label.sum() == 2 * 2 * 6 and (~has_label).sum() == 4 * 2 * 6
    unlabelled = torch.cat([b["label"][~b["has_label"]] for b in batches])
    assert (unlabelled == -1).all()
    assert all(b["has_label"].all() for b in all_batches(module, "val"))
    again = acdc_module(acdc_root, task="segmentation", n_labelled=2)
    again.setup()
    assert again.labelled_groups == module.labelled_groups
    with pytest.raises(ValueError, match="n_labelled=7 but the training split has 6"):
        acdc_module(acdc_root, task="segmentation", n_labelled=7).setup()


def test_acdc_registration_pairs_ed_to_es_slice_by_slice(acdc_root):
    module = acdc_module(acdc_root, task="registration", pairs={"mode": "source"})
    module.setup()
    assert module.summary()["train_pairs"] == 6 * 6
    batch = next(iter(module.dataloader("val", shuffle=False)))
    assert batch["moving"].shape == batch["fixed"].shape == (6, 1, 32, 32)
    assert batch["moving_label"].shape == (6, 1, 32, 32)
    for moving, fixed in zip(batch["moving_id"], batch["fixed_id"]):
        assert moving.replace("_ED_", "_ES_") == fixed
    # ED disc (radius 7) is larger than ES (radius 5)
    assert (batch["moving_label"] == 3).sum() > (batch["fixed_label"] == 3).sum()


def test_learn2reg_3d_pairs_keypoints_and_patch_mode(tmp_path):
    root = write_learn2reg_tree(tmp_path, n_cases=4)
    module = SubjectDataModule(
        Learn2RegSource(root),
        ndims=3,
        image_size=[16, 16, 16],
        task="registration",
        class_names=ACDC_CLASSES,
        split={"ratios": [0.5, 0.25, 0.25]},
        pairs={"mode": "source"},
        batch_size=2,
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["moving"].shape == (2, 1, 16, 16, 16)
    assert batch["moving_keypoints"].shape == (2, 3, 3)
    assert batch["spacing"][0].tolist() == [2.0, 2.0, 2.5]
    # keypoints follow the canonical flip and the crop: they still sit on the bright disc
    for index in range(2):
        points = batch["fixed_keypoints"][index].round().long()
        values = batch["fixed"][index, 0][points[:, 0], points[:, 1], points[:, 2]]
        assert (values > 0.8).all()
    patches = SubjectDataModule(
        Learn2RegSource(root),
        ndims=3,
        image_size=[8, 8, 8],
        split={"ratios": [0.5, 0.25, 0.25]},
        patch={"enabled": True, "samples_per_volume": 2, "max_length": 8},
        batch_size=4,
    )
    train = all_batches(patches, "train")
    assert sum(len(b["id"]) for b in train) == 4 * 2  # 4 training volumes x 2 patches
    assert train[0]["image"].shape == (4, 1, 8, 8, 8)
    assert next(iter(patches.val_dataloader()))["image"].shape[2:] == (8, 8, 8)


def test_bad_input_is_refused_at_setup_with_its_name(tmp_path):
    root = write_nifti_folder(tmp_path / "nan", n_cases=4)
    image, affine = load_nifti(root / "images" / "case_03.nii.gz")
    image[0, 0, 0] = np.inf
    save_nifti(root / "images" / "case_03.nii.gz", image, affine)
    module = SubjectDataModule(NiftiFolderSource(root), image_size=[16, 16])
    with pytest.raises(ValueError, match="case_03.nii.gz holds 1 non-finite"):
        module.setup()
    root = write_nifti_folder(tmp_path / "classes", n_cases=4)
    label, affine = load_nifti(root / "labels" / "case_01.nii.gz")
    label[0, 0, 0] = 5
    save_nifti(root / "labels" / "case_01.nii.gz", label.astype(np.int16), affine)
    module = SubjectDataModule(
        NiftiFolderSource(root), image_size=[16, 16], class_names=["bg", "a"]
    )
    with pytest.raises(ValueError, match=r"case_01.nii.gz: label values \[5\] are outside"):
        module.setup()
    root = write_nifti_folder(tmp_path / "ok", n_cases=4)
    empty_val = SubjectDataModule(NiftiFolderSource(root), split={"ratios": [0.9, 0.0, 0.1]})
    with pytest.raises(ValueError, match="leaves 'val' empty"):
        empty_val.setup()
    with pytest.raises(ValueError, match="leaves 'test' empty"):
        SubjectDataModule(NiftiFolderSource(root), split={"ratios": [0.8, 0.2, 0.05]}).setup()
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        SubjectDataModule(NiftiFolderSource(root), preprocessing={"spacng": 1.0})
    with pytest.raises(ValueError, match="task=segmentation needs labels"):
        SubjectDataModule(NiftiFolderSource(root, labels=None), task="segmentation").setup()


def compose_data(config_name, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+data={config_name}", *overrides])


@pytest.mark.parametrize("config_name", ["default", "default_3d"])
def test_embedded_default_loads_offline_from_config(config_name, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    cfg = compose_data(config_name)
    module = instantiate(cfg.data)
    module.setup()
    size = tuple(cfg.data.image_size)
    assert module.ndims == cfg.data.ndims and len(size) == cfg.data.ndims
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape[1:] == (1, *size)
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert set(batch["label"].unique().tolist()) >= {0, 2, 3}
    # the derived labels sit on the anatomy: white matter is brighter than grey matter on T1
    image, label = batch["image"], batch["label"]
    assert image[label == 3].mean() > image[label == 2].mean() > image[label == 0].mean()
    assert "nilearn" in module.source_data.subjects[0]["source_path"]
    summary = module.summary()
    assert summary["val_samples"] > 0 and summary["test_samples"] > 0
    if config_name == "default":
        assert summary["train_groups"] == 6 and summary["train_samples"] >= 24


def test_folder_configs_compose_with_root(acdc_root, tmp_path):
    cfg = compose_data("acdc", f"data.root={acdc_root}", "data.image_size=[32,32]")
    module = instantiate(cfg.data, num_workers=0)
    assert module.source.root == str(acdc_root)
    module.setup()
    assert module.summary()["train_samples"] == 72
    learn2reg = write_learn2reg_tree(tmp_path / "l2r", n_cases=4)
    cfg = compose_data("learn2reg", f"data.root={learn2reg}", "data.image_size=[16,16,16]")
    module = instantiate(cfg.data, num_workers=0, split={"ratios": [0.5, 0.25, 0.25]})
    assert next(iter(module.train_dataloader()))["moving"].shape == (1, 1, 16, 16, 16)
    folder = write_nifti_folder(tmp_path / "folder", n_cases=4)
    cfg = compose_data("nifti_folder", f"data.root={folder}", "data.image_size=[16,16]")
    module = instantiate(cfg.data, num_workers=0, class_names=["bg", "blob"])
    assert next(iter(module.val_dataloader()))["image"].shape[1:] == (1, 16, 16)
    cfg = compose_data("nifti_folder", f"data.root={tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError, match="absent"):
        instantiate(cfg.data).setup()


class _MeanModule(L.LightningModule):
    """The smallest model that consumes the batch contract."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["image"].shape))
        return ((self.scale * batch["image"]).mean() - 0.5) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val_mean", batch["image"].mean(), batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_consumes_the_datamodule(acdc_root):
    module = acdc_module(acdc_root, batch_size=8, num_workers=1)
    model = _MeanModule()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=module)
    assert model.seen == [(8, 1, 32, 32)] * 3
    assert "val_mean" in trainer.callback_metrics


def test_reference_acdc_sample_loads(reference_dir):
    source = NiftiFolderSource(
        reference_dir,
        images=".",
        labels=".",
        image_pattern="acdc_*_frame[0-9][0-9].nii.gz",
        label_pattern="acdc_*_gt.nii.gz",
        label_suffix="_gt",
    )
    data = source.load()
    assert len(data.subjects) == 1 and "label" in data.subjects[0]
    volume = preprocess_volume(data.subjects[0], PreprocessingConfig(canonical=False), 2)
    np.testing.assert_allclose(volume["image"].spacing, (1.5625, 1.5625, 10.0))
    slices = extract_slices(volume, axis=2)
    assert len(slices) == 10
    labels = torch.stack([s["label"].data for s in slices])
    images = torch.stack([s["image"].data for s in slices])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    # cine MRI: blood in the LV cavity (3) is brighter than the myocardium (2)
    assert images[labels == 3].mean() > images[labels == 2].mean() + 0.2


def test_explicit_train_ids_leave_other_groups_out_and_repeats_fill_an_epoch(acdc_root):
    """Single-subject few-shot studies: only the listed groups are used, each training sample
    appears train_repeats times per epoch."""
    split = {"train_ids": ["patient001"], "val_ids": ["patient002"], "test_ids": ["patient003"]}
    once = acdc_module(acdc_root, task="segmentation", split=split, batch_size=4)
    once.setup()
    used = {
        g
        for name in ("train", "val", "test")
        for g in groups_of(s["id"] for s in once.samples[name])
    }
    assert used == {"patient001", "patient002", "patient003"}
    repeated = acdc_module(
        acdc_root, task="segmentation", split=split, batch_size=4, train_repeats=3
    )
    ids_once = [i for b in all_batches(once, "train") for i in b["id"]]
    ids_thrice = [i for b in all_batches(repeated, "train") for i in b["id"]]
    assert sorted(ids_thrice) == sorted(ids_once * 3)
    with pytest.raises(ValueError, match="train_repeats"):
        acdc_module(acdc_root, train_repeats=0)
