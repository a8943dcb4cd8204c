"""drdm.transforms: DRDM deformations as real TorchIO transforms (Compose, history, inverse,
SubjectsLoader with workers, ITK-readable fields)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio

from drdm.deform import invert, warp
from drdm.transforms import (
    Diffeomorphic,
    RandomDiffeomorphic,
    RandomDRDM,
    forward_process,
    write_field,
)
from drdm.transforms import voxel_field as drdm_voxel_field

AFFINE_2D = np.array([[0.0, -1.2, 0, 30.0], [1.1, 0.0, 0, -4.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])


def _blob(shape, seed=0):
    """A disc/sphere with a ring: label 1 outside radius 0.35, 2 inside; image = 60 * label."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.15, 0.15, len(shape))
    radius = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True)))
    label = (radius < 0.6).astype(np.int64) + (radius < 0.35).astype(np.int64)
    return torch.from_numpy(label * 60.0).float(), torch.from_numpy(label)


def subject_2d(size=48, seed=0) -> tio.Subject:
    image, label = _blob((size, size), seed)
    return tio.Subject(
        image=tio.ScalarImage(tensor=image[None, ..., None], affine=AFFINE_2D),
        label=tio.LabelMap(tensor=label[None, ..., None], affine=AFFINE_2D),
        id=f"case{seed}",
    )


def subject_3d(size=24) -> tio.Subject:
    image, label = _blob((size, size, size))
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    return tio.Subject(
        image=tio.ScalarImage(tensor=image[None], affine=affine),
        label=tio.LabelMap(tensor=label[None], affine=affine),
    )


def voxel_field(subject: tio.Subject) -> torch.Tensor:
    """The recorded field (mm, RAS) back in voxels of the array axes, ``[1, n, *S]``."""
    return drdm_voxel_field(subject)[None].float()


def test_image_and_label_follow_one_field_and_keep_their_geometry():
    torch.manual_seed(0)
    subject = subject_2d()
    out = RandomDiffeomorphic(steps=(30, 40))(subject)
    field = voxel_field(out)
    assert field.abs().max() > 1.0  # it deformed
    label = subject["label"].data[..., 0][None]
    assert torch.equal(out["label"].data[..., 0][None], warp(label, field, mode="nearest"))
    image = subject["image"].data[..., 0][None]
    assert torch.allclose(out["image"].data[..., 0][None], warp(image, field), atol=1e-4)
    assert out["label"].data.dtype == subject["label"].data.dtype
    for key in ("image", "label"):
        assert np.array_equal(out[key].affine, AFFINE_2D)
    record = out["drdm"]
    assert 30 <= record["t"] <= 40 and record["folding_ratio"] < 0.01
    assert record["jacobian_min"] > 0 and record["max_mm"] >= record["mean_mm"] > 0


def test_history_replays_and_the_inverse_undoes_it():
    torch.manual_seed(1)
    subject = subject_2d()
    out = tio.Compose([RandomDiffeomorphic(steps=(24, 32)), tio.RescaleIntensity((0, 1))])(subject)
    replayed = out.get_composed_history()(subject)
    assert torch.equal(replayed["image"].data, out["image"].data)
    assert torch.equal(replayed["label"].data, out["label"].data)

    deformed = RandomDiffeomorphic(steps=(24, 32))(subject)
    back = deformed.apply_inverse_transform()
    residual = back["drdm"]
    assert residual["inverse_residual_mean"] < 1e-3 and residual["inverse_residual_max"] < 1.0
    change = (deformed["label"].data != subject["label"].data).float().mean()
    left = (back["label"].data != subject["label"].data).float().mean()
    assert change > 0.02 and left < change / 5


def test_include_exclude_probability_and_errors():
    torch.manual_seed(2)
    subject = subject_2d()
    out = RandomDiffeomorphic(steps=30, exclude=["label"])(subject)
    assert torch.equal(out["label"].data, subject["label"].data)
    assert not torch.equal(out["image"].data, subject["image"].data)
    skipped = RandomDiffeomorphic(p=0.0)(subject)
    assert torch.equal(skipped["image"].data, subject["image"].data)
    assert skipped["drdm"]["t"] == -1 and skipped["drdm"]["max_mm"] == 0
    with pytest.raises(ValueError, match="not both"):
        RandomDiffeomorphic(scale=1e-4, scale_mm=0.1)
    with pytest.raises(ValueError, match="steps"):
        RandomDiffeomorphic(steps=(40, 20))
    with pytest.raises(FileNotFoundError, match="known"):
        RandomDiffeomorphic(deformation="no_such_config")(subject)
    with pytest.raises(ValueError, match="outside"):
        Diffeomorphic(seed=0, t=500)(subject)


def test_scale_as_fraction_or_millimetres():
    subject = subject_2d()
    fraction = 2e-4
    fov = float(np.mean(np.asarray(subject["image"].spacing[:2]) * 48))
    by_fraction = Diffeomorphic(seed=5, t=30, scale=fraction)(subject)
    by_mm = Diffeomorphic(seed=5, t=30, scale_mm=fraction * fov)(subject)
    assert torch.allclose(by_fraction["drdm"]["field_mm"], by_mm["drdm"]["field_mm"], atol=1e-5)
    smaller = Diffeomorphic(seed=5, t=30, scale=fraction / 2)(subject)
    assert smaller["drdm"]["mean_mm"] < 0.7 * by_fraction["drdm"]["mean_mm"]
    default = forward_process(2)
    assert Diffeomorphic(seed=5, t=30, scale=default.v_scale * 2.0)(subject)["drdm"][
        "mean_mm"
    ] == pytest.approx(Diffeomorphic(seed=5, t=30)(subject)["drdm"]["mean_mm"], rel=1e-5)


def test_3d_field_is_what_itk_reads(tmp_path):
    torch.manual_seed(3)
    subject = subject_3d()
    out = RandomDiffeomorphic(steps=(30, 40))(subject)
    assert out["drdm"]["field_mm"].shape == (3, 24, 24, 24)
    path = write_field(out, tmp_path / "field.nii.gz")
    image_path = tmp_path / "image.nii.gz"
    subject["image"].save(image_path)
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.ReadImage(str(image_path))
    resampled = sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)
    itk = torch.from_numpy(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0).copy()).float()
    inner = (slice(4, -4),) * 3
    difference = (itk[inner] - out["image"].data[0][inner]).abs()
    assert (
        difference.mean() < 0.5
        and (out["image"].data[0] - subject["image"].data[0]).abs().mean() > 1
    )


def test_inside_a_subjects_loader_with_workers():
    subjects = [subject_2d(seed=s) for s in range(4)]
    transform = tio.Compose([RandomDiffeomorphic(steps=(20, 30)), tio.ZNormalization()])
    loader = tio.SubjectsLoader(
        tio.SubjectsDataset(subjects, transform=transform), batch_size=4, num_workers=2
    )
    torch.manual_seed(4)
    batch = next(iter(loader))
    assert batch["image"][tio.DATA].shape == (4, 1, 48, 48, 1)
    assert batch["drdm"]["field_mm"].shape == (4, 2, 48, 48, 1)
    assert len(set(batch["drdm"]["seed"].tolist())) == 4


def test_inverse_of_a_known_field():
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    field = 2.5 * torch.sin(grid.flip(0) / 5.0)[None]
    inverse, residual = invert(field)
    assert residual.max() < 1e-4
    image = torch.sin(grid[0] / 3)[None, None] + torch.cos(grid[1] / 4)[None, None]
    there_and_back = warp(warp(image, field), inverse)
    assert (there_and_back - image)[..., 6:-6, 6:-6].abs().max() < 0.05


def test_random_drdm_with_the_packaged_model_replays_and_inverts():
    torch.manual_seed(5)
    subject = subject_2d(size=64)
    transform = RandomDRDM("default", t0=(20, 24), options={"sampling_steps": 2})
    out = transform(subject)
    record = out["drdm"]
    assert 20 <= record["t"] <= 24 and record["max_mm"] > 0
    label = subject["label"].data[..., 0][None]
    assert torch.equal(out["label"].data[..., 0][None], warp(label, voxel_field(out), "nearest"))
    replayed = out.get_composed_history()(subject)
    assert torch.equal(replayed["image"].data, out["image"].data)
    back = out.apply_inverse_transform()
    assert back["drdm"]["inverse_residual_mean"] < 1e-2


def test_random_drdm_with_the_authors_checkpoint(reference_dir):
    torch.manual_seed(6)
    checkpoint = reference_dir / "cmr_recresacnet_reference.pth"
    out = RandomDRDM(str(checkpoint), t0=48, options={"sampling_steps": 1})(subject_2d(64))
    assert out["drdm"]["t"] == 48 and out["drdm"]["mean_mm"] > 0
    assert set(out["label"].data.unique().tolist()) <= {0, 1, 2}


def test_monai_dictionary_transform_in_a_monai_pipeline():
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.transforms import Compose, ScaleIntensityd

    from drdm.transforms import RandDiffeomorphicd

    def item(seed):
        image, label = _blob((48, 48), seed)
        return {
            "image": MetaTensor(image[None], affine=torch.as_tensor(AFFINE_2D)),
            "label": MetaTensor(label[None], affine=torch.as_tensor(AFFINE_2D)),
        }

    pipeline = Compose(
        [
            RandDiffeomorphicd(keys=["image", "label"], mode=["bilinear", "nearest"], steps=30),
            ScaleIntensityd(keys="image"),
        ]
    )
    torch.manual_seed(7)
    out = pipeline(item(0))
    assert isinstance(out["label"], MetaTensor) and out["label"].shape == (1, 48, 48)
    assert np.allclose(out["image"].affine.numpy(), AFFINE_2D)
    field = out["drdm"]["field_mm"].double()[..., 0]
    voxels = torch.einsum(
        "ij,j...->i...", torch.linalg.inv(torch.as_tensor(AFFINE_2D[:2, :2])), field
    )[None].float()
    label = item(0)["label"].as_tensor()[None]
    assert torch.equal(out["label"].as_tensor()[None], warp(label, voxels, mode="nearest"))
    assert (out["label"].as_tensor() != item(0)["label"].as_tensor()).any()
    loader = DataLoader(Dataset([item(s) for s in range(4)], pipeline), batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 48, 48) and batch["drdm"]["field_mm"].shape[0] == 2
    with pytest.raises(KeyError, match="seg"):
        RandDiffeomorphicd(keys=["seg"])(item(0))


def test_batched_transforms_give_one_field_per_sample():
    from drdm.transforms import BatchDiffeomorphic, BatchDRDM

    images = torch.stack([_blob((48, 48), s)[0][None] for s in range(3)])
    labels = torch.stack([_blob((48, 48), s)[1][None] for s in range(3)])
    batch = BatchDiffeomorphic(ndims=2, steps=(20, 30))
    first = batch(images, labels, generator=torch.Generator().manual_seed(0))
    again = batch(images, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first["displacement"], again["displacement"])
    assert first["displacement"].shape == (3, 2, 48, 48) and first["t"].shape == (3,)
    assert not torch.allclose(first["displacement"][0], first["displacement"][1])
    for b in range(3):
        expected = warp(labels[b : b + 1], first["displacement"][b : b + 1], mode="nearest")
        assert torch.equal(first["label"][b : b + 1], expected)
    with pytest.raises(ValueError, match="spatial dims"):
        batch(images[0])

    model = BatchDRDM("default", t0=20, options={"sampling_steps": 2})
    out = model(images, labels, seed=3)
    assert out["displacement"].shape == (3, 2, 48, 48)
    assert torch.equal(model(images, labels, seed=3)["image"], out["image"])
