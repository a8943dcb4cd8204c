"""Augmentation strategies: TorchIO baselines, the DRDM batch transform, the offline pool."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from drdm.augmentation import AugmentationStrategy, DRDMBatchAugmentation, OfflineSyntheticPool
from drdm.data.io import save_nifti
from drdm.deform import RandomDeformation, warp
from drdm.field_sources import DRDMFieldSource, ForwardDiffusionFieldSource
from drdm.metrics import dice_score
from drdm.utils.instantiate import load_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SIZE = 64


def _blob_batch(batch_size: int = 2) -> dict:
    """Image with two blobs of different intensity; label 1 / 2 exactly on them."""
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    image = torch.zeros(batch_size, 1, SIZE, SIZE)
    label = torch.zeros(batch_size, 1, SIZE, SIZE, dtype=torch.long)
    for index in range(batch_size):
        centre = 22 + 4 * index
        disc = (rows - centre) ** 2 + (cols - 24) ** 2 <= 81
        square = (rows >= 36) & (rows < 50) & (cols >= 34) & (cols < 50)
        image[index, 0][disc] = 1.0
        image[index, 0][square] = 0.5
        label[index, 0][disc] = 1
        label[index, 0][square] = 2
    return {
        "image": image,
        "label": label,
        "has_label": torch.ones(batch_size, dtype=torch.bool),
        "spacing": torch.ones(batch_size, 2),
        "affine": torch.eye(4, dtype=torch.float64).expand(batch_size, 4, 4).clone(),
        "id": [f"s{i}" for i in range(batch_size)],
    }


def _labels_from_intensity(image: torch.Tensor) -> torch.Tensor:
    """Recover the label map from the blob intensities (1 -> class 1, 0.5 -> class 2)."""
    labels = torch.zeros(image.shape, dtype=torch.long)
    labels[image > 0.75] = 1
    labels[(image > 0.3) & (image <= 0.75)] = 2
    return labels


@pytest.mark.parametrize("label_mode", ["nearest", "onehot"])
def test_drdm_transform_moves_label_with_its_image(label_mode):
    torch.manual_seed(0)
    batch = _blob_batch()
    source = ForwardDiffusionFieldSource(RandomDeformation(ndims=2))
    transform = DRDMBatchAugmentation(source, ratio=1.0, t0_range=(50, 60), label_mode=label_mode)
    out = transform(batch)

    assert out["image"].shape == (4, 1, SIZE, SIZE) and out["label"].dtype == torch.long
    assert out["synthetic"].tolist() == [False, False, True, True]
    assert out["has_label"].all() and out["spacing"].shape == (4, 2)
    assert out["affine"].shape == (4, 4, 4) and len(out["id"]) == 4
    assert torch.equal(out["image"][:2], batch["image"])  # real samples untouched

    synthetic_image, synthetic_label = out["image"][2:], out["label"][2:]
    # the label set is kept (no new values, no class lost)
    for sample in synthetic_label:
        assert set(sample.unique().tolist()) == {0, 1, 2}
    # the samples really moved
    sources = [int(name.split("_")[0][1:]) for name in out["id"][2:]]
    moved = dice_score(synthetic_label, batch["label"][sources], 3)
    assert (moved < 0.97).any()
    # one field for both: each label blob still lies on its image blob
    agreement = dice_score(synthetic_label, _labels_from_intensity(synthetic_image), 3)
    assert (agreement > 0.9).all(), agreement


def test_drdm_ratio_and_labelled_sources_only():
    torch.manual_seed(1)
    batch = _blob_batch(4)
    batch["has_label"] = torch.tensor([True, False, True, False])
    batch["label"][~batch["has_label"]] = -1
    transform = DRDMBatchAugmentation(
        ForwardDiffusionFieldSource(RandomDeformation(ndims=2)), ratio=0.5, t0_range=(5, 10)
    )
    out = transform(batch)
    assert out["image"].shape[0] == 5  # round(0.5 * 2 labelled) = 1 appended
    assert out["label"][-1].min() >= 0 and out["id"][-1] in ("s0_drdm", "s2_drdm")
    assert transform.__class__(transform.source, ratio=0.0)(batch)["image"].shape[0] == 4


def test_drdm_source_needs_a_real_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        DRDMFieldSource(None)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        DRDMFieldSource(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="t0_range"):
        DRDMBatchAugmentation(lambda image, t0: image, t0_range=(10, 5))
    with pytest.raises(ValueError, match="label_mode"):
        DRDMBatchAugmentation(lambda image, t0: image, label_mode="linear")


def _strategy(name: str) -> AugmentationStrategy:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose(f"augmentation/{name}", overrides=["+data.ndims=2"])
    OmegaConf.set_struct(config, False)
    # drdm_forward interpolates ${deformation}: the root config's forward process
    config.deformation = load_config(CONF_DIR / "deformation" / "default.yaml")
    return instantiate(config.augmentation)


@pytest.mark.parametrize("name", ["none", "affine", "elastic", "affine_elastic", "bigaug"])
def test_baseline_strategies_run_on_a_batch(name):
    torch.manual_seed(2)
    batch = _blob_batch(4)
    strategy = _strategy(name)
    assert strategy.name == name and strategy.batch_transforms == []
    out = strategy.device(strategy.cpu(batch))
    assert out["image"].shape == batch["image"].shape
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.long
    assert set(out["label"].unique().tolist()) <= {0, 1, 2}
    changed = not torch.equal(out["image"], batch["image"])
    assert changed == (name != "none")
    # every sample keeps its anatomy: a transform that moves a one-voxel-thick 2D slice out of
    # its own plane returns a blank sample (the affine strategy's z translation once did)
    kept = (out["label"] > 0).flatten(1).sum(1) / (batch["label"] > 0).flatten(1).sum(1)
    assert ((kept > 0.5) & (kept < 1.5)).all(), kept.tolist()
    if name in ("affine", "elastic", "affine_elastic"):
        # spatial transforms move the label with the image
        agreement = dice_score(out["label"], _labels_from_intensity(out["image"]), 3)
        assert torch.nanmean(agreement) > 0.85


def test_unlabelled_samples_keep_ignore_label():
    batch = _blob_batch(2)
    batch["has_label"] = torch.tensor([True, False])
    batch["label"][1] = -1
    out = _strategy("affine").cpu(batch)
    assert (out["label"][1] == -1).all() and (out["label"][0] >= 0).all()


def test_combination_has_both_parts():
    strategy = _strategy("affine_elastic")
    assert len(strategy.torchio.transform.transforms) == 2
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose("augmentation/bigaug_drdm")
    assert config.augmentation.name == "bigaug_drdm"
    assert "drdm" in config.augmentation.batch and "elastic" in config.augmentation.torchio


def test_forward_strategy_from_config():
    torch.manual_seed(3)
    strategy = _strategy("drdm_forward")
    out = strategy.device(_blob_batch(2))
    assert out["image"].shape[0] == 4 and out["synthetic"][2:].all()


def _write_pairs(folder: Path, count: int, size: int = SIZE) -> None:
    batch = _blob_batch(count)
    for index in range(count):
        affine = np.eye(4)
        save_nifti(
            folder / f"case{index}_s00_image.nii.gz", batch["image"][index, 0, :size, :size], affine
        )
        save_nifti(
            folder / f"case{index}_s00_label.nii.gz",
            batch["label"][index, 0, :size, :size],
            affine,
            dtype=np.int16,
        )
    save_nifti(folder / "unpaired_image.nii.gz", np.zeros((size, size)), np.eye(4))


def test_offline_pool_appends_pairs_from_a_folder(tmp_path):
    _write_pairs(tmp_path / "generated", 3)
    pool = OfflineSyntheticPool(tmp_path, ratio=1.0)
    assert len(pool) == 3  # the image without a label file is skipped
    out = pool(_blob_batch(2))
    assert out["image"].shape == (4, 1, SIZE, SIZE) and out["synthetic"].tolist()[2:] == [1, 1]
    assert set(out["label"][2:].unique().tolist()) == {0, 1, 2}
    agreement = dice_score(out["label"][2:], _labels_from_intensity(out["image"][2:]), 3)
    assert (agreement == 1).all()


def test_offline_pool_errors(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        OfflineSyntheticPool(None)
    with pytest.raises(FileNotFoundError, match="no image/label pairs"):
        OfflineSyntheticPool(tmp_path)
    _write_pairs(tmp_path, 1, size=32)
    pool = OfflineSyntheticPool(tmp_path)
    with pytest.raises(ValueError, match="size"):
        pool(_blob_batch(1))


class _CountingSource(ForwardDiffusionFieldSource):
    """The forward process, counting how many fields it was asked to make."""

    def __init__(self, fields_per_image: int) -> None:
        super().__init__(RandomDeformation(ndims=2), fields_per_image=fields_per_image)
        self.fields = 0

    def generate(self, image, t0, generator):
        self.fields += image.shape[0]
        return super().generate(image, t0, generator)


def test_drdm_pool_generates_at_most_k_fields_per_sample_then_reuses_them():
    torch.manual_seed(4)
    source = _CountingSource(fields_per_image=2)
    transform = DRDMBatchAugmentation(source, ratio=2.0, t0_range=(40, 50))
    batch = _blob_batch(2)
    outputs = [transform(batch) for _ in range(6)]
    # 2 real samples x K = 2: never more than 4 fields, however many pairs are appended
    assert source.fields <= 4 and sum(len(out["image"]) - 2 for out in outputs) == 24
    pools = source.bank
    assert set(pools) == {"s0", "s1"} and all(len(pool) == 2 for pool in pools.values())
    last = outputs[-1]
    for index, name in enumerate(last["id"][2:], 2):
        source_index = int(name.split("_")[0][1:])
        # every synthetic pair is one of its sample's pooled fields applied to image and label
        matches = [
            torch.equal(
                last["image"][index : index + 1],
                warp(batch["image"][source_index : source_index + 1], field[None]),
            )
            for field in pools[f"s{source_index}"]
        ]
        assert any(matches)
        agreement = dice_score(
            last["label"][index : index + 1],
            _labels_from_intensity(last["image"][index : index + 1]),
            3,
        )
        assert (agreement > 0.85).all()  # the label blob stays on its image blob
    with pytest.raises(ValueError, match="fields_per_image"):
        _CountingSource(fields_per_image=-1)
    without_ids = {k: v for k, v in batch.items() if k != "id"}
    with pytest.raises(ValueError, match="'id'"):
        transform(without_ids)


def test_cpu_sized_drdm_strategy_config(tmp_path):
    checkpoint = tmp_path / "drdm.ckpt"
    checkpoint.write_bytes(b"")  # loaded lazily, on the first batch
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose("augmentation/drdm_cpu", overrides=[f"+drdm_checkpoint={checkpoint}"])
    strategy = instantiate(config.augmentation)
    (transform,) = strategy.batch_transforms
    assert strategy.name == "drdm_cpu" and transform.source.fields_per_image == 3
    assert transform.t0_per_batch and transform.t0_range == (16, 32)
    assert transform.source.checkpoint == checkpoint
    assert transform.source.options == {"start_step": "t0"}
