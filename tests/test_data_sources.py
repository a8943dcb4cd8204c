"""NIfTI I/O, the data sources and their early errors, on real files written to tmp_path."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.data_trees import write_acdc_tree, write_learn2reg_tree, write_nifti_folder

from drdm.data import ACDCSource, Learn2RegSource, NiftiFolderSource, load_nifti, save_nifti
from drdm.data.preprocessing import PreprocessingConfig, preprocess_volume
from drdm.data.slicing import extract_slices, slice_affine


def test_save_load_roundtrip_keeps_affine_and_is_atomic(tmp_path):
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = save_nifti(tmp_path / "sub" / "x.nii.gz", array, affine)
    loaded, loaded_affine = load_nifti(path)
    np.testing.assert_allclose(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine)
    assert [p.name for p in path.parent.iterdir()] == ["x.nii.gz"]  # no temporary left over


def test_load_uses_pixdim_when_sform_scales_disagree(tmp_path):
    # like the public ACDC files: unit-scale sform, true spacing only in pixdim
    image = nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]))
    image.header.set_zooms((1.5625, 1.5625, 10.0))
    image.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "acdc_like.nii.gz")
    with pytest.warns(UserWarning, match="pixdim"):
        _, affine = load_nifti(tmp_path / "acdc_like.nii.gz")
    np.testing.assert_allclose(np.diag(affine), [-1.5625, -1.5625, 10.0, 1.0])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_nifti(tmp_path / "broken.nii.gz")
    bad = np.ones((3, 3, 3), np.float32)
    bad[1, 1, 1] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", bad, np.eye(4))
    with pytest.raises(ValueError, match=r"nan.nii.gz holds 1 non-finite"):
        load_nifti(tmp_path / "nan.nii.gz")


def test_acdc_source_reads_ed_es_frames_with_labels_and_pairs(tmp_path):
    root = write_acdc_tree(tmp_path / "acdc", n_patients=3, subsets=("training", "testing"))
    data = ACDCSource(root).load()
    ids = [s["id"] for s in data.subjects]
    assert len(ids) == 12 and ids[:2] == ["patient001_ED", "patient001_ES"]
    assert {s["group"] for s in data.subjects} == {f"patient{i:03d}" for i in range(1, 7)}
    assert data.has_labels and all("label" in s for s in data.subjects)
    assert data.pairs[0] == ("patient001_ED", "patient001_ES") and len(data.pairs) == 6
    es = data.subjects[1]
    assert es["source_path"].endswith("patient001_frame08.nii.gz")
    assert es["original_shape"] == (40, 48, 6)
    np.testing.assert_allclose(np.diag(es["original_affine"]), [-1.5, -1.5, 10.0, 1.0])
    only_ed = ACDCSource(root, subsets=["training"], phases=["ED"]).load()
    assert len(only_ed.subjects) == 3 and only_ed.pairs == []


def test_acdc_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ACDCSource(tmp_path / "nowhere").load()
    (tmp_path / "empty" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ACDC patient folders"):
        ACDCSource(tmp_path / "empty").load()
    root = write_acdc_tree(tmp_path / "acdc", n_patients=1)
    (root / "training" / "patient001" / "Info.cfg").write_text("Group: NOR\n")
    with pytest.raises(ValueError, match="Info.cfg must give an integer 'ED"):
        ACDCSource(root).load()
    (root / "training" / "patient001" / "Info.cfg").write_text("ED: 1\nES: 8\n")
    (root / "training" / "patient001" / "patient001_frame08_gt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="patient001_frame08_gt.nii.gz"):
        ACDCSource(root).load()
    assert "label" not in ACDCSource(root, require_labels=False).load().subjects[1]


def test_nifti_folder_matches_labels_by_stem(tmp_path):
    root = write_nifti_folder(tmp_path, n_cases=4)
    (root / "labels" / "case_02.nii.gz").unlink()
    data = NiftiFolderSource(root).load()
    assert [s["id"] for s in data.subjects] == [f"case_{i:02d}" for i in range(4)]
    assert ["label" in s for s in data.subjects] == [True, True, False, True]
    with pytest.raises(FileNotFoundError, match="no label for .*case_02.nii.gz"):
        NiftiFolderSource(root, require_labels=True).load()
    # one flat folder with <stem>_gt labels, grouped by patient via a regex
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(2):
        for frame in (1, 5):
            stem = f"p{index}_frame{frame:02d}"
            shutil.copy(root / "images" / "case_00.nii.gz", flat / f"{stem}.nii.gz")
            shutil.copy(root / "labels" / "case_00.nii.gz", flat / f"{stem}_gt.nii.gz")
    data = NiftiFolderSource(
        flat, images=".", labels=".", label_suffix="_gt", group_regex=r"^(.*)_frame"
    ).load()
    assert len(data.subjects) == 4 and all("label" in s for s in data.subjects)
    assert [s["group"] for s in data.subjects] == ["p0", "p0", "p1", "p1"]


def test_nifti_folder_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NiftiFolderSource(tmp_path / "absent").load()
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI images"):
        NiftiFolderSource(tmp_path / "empty").load()
    root = write_nifti_folder(tmp_path / "shape", n_cases=2)
    save_nifti(root / "labels" / "case_01.nii.gz", np.zeros((5, 5, 4), np.int16), np.eye(4))
    with pytest.raises(ValueError, match=r"case_01.nii.gz has shape \[5, 5, 4\]"):
        NiftiFolderSource(root).load()
    root = write_nifti_folder(tmp_path / "affine", n_cases=2)
    label, _ = load_nifti(root / "labels" / "case_00.nii.gz")
    save_nifti(root / "labels" / "case_00.nii.gz", label, np.diag([2.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="case_00.nii.gz and image .* different affines"):
        NiftiFolderSource(root).load()


def test_learn2reg_source_reads_pairs_keypoints_and_masks(tmp_path):
    root = write_learn2reg_tree(tmp_path, n_cases=3)
    data = Learn2RegSource(root, use_masks=True).load()
    assert len(data.subjects) == 6 and data.has_labels
    assert [s["group"] for s in data.subjects][:2] == ["LungCT_0001", "LungCT_0001"]
    assert data.pairs == [(f"LungCT_{c:04d}_0001", f"LungCT_{c:04d}_0000") for c in (1, 2, 3)]
    subject = data.subjects[0]
    assert "mask" in subject
    # keypoint (8, 11, 3) voxels -> world with diag(-2, 2, 2.5)
    np.testing.assert_allclose(subject["keypoints_world"][0], [-16.0, 22.0, 7.5])
    description = json.loads((root / "dataset.json").read_text())
    description["training"][1]["label"] = "./labelsTr/absent.nii.gz"
    (root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(FileNotFoundError, match=r"\['training'\]\[1\] lists './labelsTr/absent"):
        Learn2RegSource(root).load()
    (root / "dataset.json").write_text("{broken")
    with pytest.raises(ValueError, match="dataset.json is not valid JSON"):
        Learn2RegSource(root).load()


def test_preprocess_and_slice_keep_label_on_bright_blob_and_geometry(tmp_path):
    root = write_acdc_tree(tmp_path, n_patients=1)
    subject = ACDCSource(root, phases=["ED"]).load().subjects[0]
    original_affine = subject["original_affine"]
    config = PreprocessingConfig(canonical=True, spacing=[1.0, 1.0], intensity="percentile")
    volume = preprocess_volume(subject, config, slice_axis=2)
    assert volume["image"].shape == (1, 60, 72, 6)  # 1.5 mm -> 1 mm in-plane, 6 slices kept
    np.testing.assert_allclose(volume["image"].spacing, (1.0, 1.0, 10.0))
    slices = extract_slices(volume, axis=2)
    assert len(slices) == 6 and slices[3]["id"] == "patient001_ED_s003"
    image = slices[3]["image"].data[0, ..., 0].numpy()
    label = slices[3]["label"].data[0, ..., 0].numpy()
    assert image[label == 3].mean() > 0.9 and image[label == 0].mean() < 0.15
    # the disc centre in world coordinates survives reorientation + resampling
    centre_voxel = np.argwhere(label == 3).mean(axis=0)
    centre_world = slices[3]["image"].affine @ [*centre_voxel, 0.0, 1.0]
    expected = original_affine @ [12.0 + 1, 30.0 - 1, 3.0, 1.0]
    np.testing.assert_allclose(centre_world[:3], expected[:3], atol=0.75)
    np.testing.assert_allclose(
        slices[3]["image"].affine, slice_affine(volume["image"].affine, 2, 3)
    )


def test_skip_empty_slices_and_other_axes(tmp_path):
    root = write_nifti_folder(tmp_path, n_cases=1)
    subject = NiftiFolderSource(root).load().subjects[0]
    subject.load()
    subject["label"].data[..., :2] = 0  # two empty slices along axis 2
    assert len(extract_slices(subject, axis=2, skip_empty=True)) == 2
    along_x = extract_slices(subject, axis=0)
    assert len(along_x) == 24 and along_x[0]["image"].shape == (1, 28, 4, 1)
    np.testing.assert_allclose(along_x[0]["image"].spacing, (1.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="slice_axis must be 0, 1 or 2"):
        extract_slices(subject, axis=3)


def test_preprocessing_options_foreground_crop_resize_zscore(tmp_path):
    root = write_nifti_folder(tmp_path, n_cases=1, shape=(24, 28, 4))
    subject = NiftiFolderSource(root).load().subjects[0]
    original_affine = subject["original_affine"]
    config = PreprocessingConfig(
        canonical=False,
        foreground_crop=True,
        foreground_threshold=0.2,
        foreground_margin=1,
        intensity="zscore",
    )
    volume = preprocess_volume(subject, config)
    label = volume["label"].data[0].numpy()
    # disc of radius 6 (ring 1.5 x 4) at (8, 16) in x/y: box 2..14 x 10..22 (+1 margin), all z
    assert volume["image"].shape == (1, 15, 15, 4)
    np.testing.assert_allclose(volume["image"].affine[:3, 3], original_affine[:3, :3] @ [1, 9, 0])
    assert (label > 0).any() and label[0].max() == 0  # margin row is background
    image = volume["image"].data
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-2
    from drdm.data.preprocessing import size_transform

    resize = size_transform(PreprocessingConfig(size_mode="resize"), [30, 30, 8], ndims=3)
    resized = resize(volume)
    assert resized["image"].shape == (1, 30, 30, 8)
    assert set(resized["label"].data.unique().tolist()) <= {0, 1}  # nearest for labels
    # the field of view is kept: spacing scales with the size change
    np.testing.assert_allclose(resized["image"].spacing, (0.5, 0.5, 1.0), rtol=1e-5)
    with pytest.raises(ValueError, match="image_size \\[30, 30\\] must have 3 values"):
        size_transform(PreprocessingConfig(), [30, 30], ndims=3)
    with pytest.raises(ValueError, match="preprocessing.intensity must be one of"):
        PreprocessingConfig(intensity="histogram")


def test_pair_modes_and_known_field_hook(tmp_path):
    from drdm.data.batch import collate_pairs
    from drdm.data.pairs import PairDataset, build_pairs

    root = write_nifti_folder(tmp_path, n_cases=4, shape=(12, 12, 2))
    subjects = NiftiFolderSource(root).load().subjects
    for index, subject in enumerate(subjects):
        subject.load()
        subject["group"] = f"patient{index // 2}"  # two volumes per patient
    slices = [s for subject in subjects for s in extract_slices(subject, axis=2)]
    ids = [s["id"] for s in slices]
    within = build_pairs(slices, "within")
    assert {(ids[i], ids[j]) for i, j in within} >= {("case_00_s001", "case_01_s001")}
    assert all(ids[i][-4:] == ids[j][-4:] and ids[i][:7] != ids[j][:7] for i, j in within)
    assert len(within) == 2 * 2 * 2  # 2 groups x 2 ordered volume pairs x 2 slice indices
    across = build_pairs(slices, "across")
    assert len(across) == 8 * 4 and len(build_pairs(slices, "across", max_pairs=5)) == 5
    assert build_pairs(slices, "across", max_pairs=5, seed=1) == build_pairs(
        slices, "across", max_pairs=5, seed=1
    )
    source_pairs = build_pairs(slices, "source", [("case_02", "case_00")])
    assert [(ids[i], ids[j]) for i, j in source_pairs] == [
        ("case_02_s000", "case_00_s000"),
        ("case_02_s001", "case_00_s001"),
    ]

    def add_known_field(pair):
        pair["displacement"] = torch.zeros(2, 12, 12)
        return pair

    dataset = PairDataset(slices, source_pairs, ndims=2, transform=add_known_field)
    batch = collate_pairs([dataset[0], dataset[1]], include_label=True)
    assert batch["displacement"].shape == (2, 2, 12, 12)
    assert batch["id"] == ["case_02_s000_to_case_00_s000", "case_02_s001_to_case_00_s001"]
    with pytest.raises(ValueError, match="pairs.mode must be one of"):
        build_pairs(slices, "random")
