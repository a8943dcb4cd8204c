"""`src/augment.py` outputs: geometry, fields read back, determinism and resuming."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.augment_inputs import SIZE, write_inputs
from helpers.augment_inputs import blob_volume as _blob_volume
from helpers.augment_inputs import output_files as _files

from drdm.apps import augment as augment_files
from drdm.apps.augment import augment
from drdm.data.io import save_nifti
from drdm.deform import folding_ratio, warp
from drdm.generation import DRDM

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def _voxel_displacement(field_path: Path, affine: np.ndarray) -> np.ndarray:
    """Read a written field (mm, world frame) back into voxel units along the array axes."""
    field = np.asarray(nib.load(field_path).dataobj, dtype=np.float64)  # [X, Y, Z, 1, n]
    world = np.moveaxis(field[:, :, :, 0, :], -1, 0)  # [n, X, Y, Z]
    n = world.shape[0]
    linear = affine[:n, :n]
    voxels = np.einsum("ij,j...->i...", np.linalg.inv(linear), world)
    return voxels


def test_augment_cli_writes_geometry_preserving_outputs(checkpoint, inputs, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "src" / "augment.py"),
        f"ckpt_path={checkpoint}",
        f"input={inputs}",
        f"output_dir={output}",
        f"num_samples={NUM_SAMPLES}",
        "seed=5",
        "device=cpu",
        # a few-step chain, through the config (the model's T is 20)
        "generation.sampling_steps=4",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # a progress bar over all samples, and one log line per finished block of each input
    total = 2 * NUM_SAMPLES
    assert f"{total}/{total}" in result.stderr and "sample/s" in result.stderr, result.stderr
    log = (tmp_path / "hydra" / "augment.log").read_text()
    assert "slice: samples 0, 1, 2 written in" in log and "stack: samples" in log, log

    rows = list(csv.DictReader(open(output / "manifest.csv")))
    assert sorted((r["input"], int(r["k"])) for r in rows) == [
        (stem, k) for stem in ("slice", "stack") for k in range(NUM_SAMPLES)
    ]
    for row in rows:
        source = inputs / f"{row['input']}.nii.gz"
        source_image = nib.load(source)
        source_label = nib.load(
            inputs / "stack_gt.nii.gz"
            if row["input"] == "stack"
            else inputs / "labels" / "slice.nii.gz"
        )
        name = f"{row['input']}_{row['k']}.nii.gz"
        sample = nib.load(output / "image" / name)
        label = nib.load(output / "label" / name)
        field = nib.load(output / "field" / name)
        for written in (sample, label, field):
            np.testing.assert_array_equal(written.affine, source_image.affine)
        assert sample.shape == source_image.shape and label.shape == source_image.shape
        assert set(np.unique(label.get_fdata())) <= set(np.unique(source_label.get_fdata()))
        assert int(field.header["intent_code"]) == 1006
        ndims = len(source_image.shape)
        assert field.shape == (*source_image.shape, *([1] * (3 - ndims)), 1, ndims)

        # the field, read back and applied to the input, reproduces the written sample
        voxels = _voxel_displacement(output / "field" / name, source_image.affine)
        original = torch.from_numpy(source_image.get_fdata().astype(np.float32))
        if ndims == 3:  # a 2D model on a stack works slice by slice: in-plane field only
            assert np.abs(voxels[2]).max() < 1e-4
            slices = original.permute(2, 0, 1)[:, None]
            displacement = torch.from_numpy(voxels[:2].astype(np.float32)).permute(3, 0, 1, 2)
            rewarped = warp(slices, displacement, mode="bicubic")[:, 0].permute(1, 2, 0)
        else:
            displacement = torch.from_numpy(voxels[:, :, :, 0].astype(np.float32))[None]
            rewarped = warp(original[None, None], displacement, mode="bicubic")[0, 0]
        # the manifest's statistics describe the written field (slice mode: mean over slices)
        folding = float(folding_ratio(displacement.double()).mean())
        assert float(row["folding_ratio"]) == pytest.approx(folding, abs=1e-3)
        assert folding < 0.01
        assert 0 <= float(row["repaired_ratio"]) < 0.5  # the fold repair's share of the field
        expected = torch.from_numpy(sample.get_fdata().astype(np.float32))
        torch.testing.assert_close(rewarped, expected, atol=2e-3 * float(original.max()), rtol=0)
        assert float(row["max_displacement_mm"]) > 0
        world_length = np.linalg.norm(field.get_fdata()[..., 0, :], axis=-1)
        assert float(row["max_displacement_mm"]) == pytest.approx(world_length.max(), rel=1e-3)


def test_same_seed_same_files_and_interrupted_rerun_completes_them(
    checkpoint, inputs, tmp_path, monkeypatch
):
    complete = tmp_path / "complete"
    first = augment(checkpoint, inputs, complete, num_samples=NUM_SAMPLES, seed=11, device="cpu")
    assert first == {"inputs": 2, "generated": 2 * NUM_SAMPLES, "skipped": 0}

    # interrupt a second run while it writes the field of its second sample
    interrupted = tmp_path / "interrupted"
    write_field = augment_files.write_displacement_field
    calls = {"n": 0}

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return write_field(*args, **kwargs)

    monkeypatch.setattr(augment_files, "write_displacement_field", failing_write)
    with pytest.raises(KeyboardInterrupt):
        augment(checkpoint, inputs, interrupted, num_samples=NUM_SAMPLES, seed=11, device="cpu")
    monkeypatch.setattr(augment_files, "write_displacement_field", write_field)
    finished_rows = list(csv.DictReader(open(interrupted / "manifest.csv")))
    assert len(finished_rows) == 1

    rerun = augment(checkpoint, inputs, interrupted, num_samples=NUM_SAMPLES, seed=11, device="cpu")
    assert rerun["generated"] == 2 * NUM_SAMPLES - 1 and rerun["skipped"] == 1
    assert _files(interrupted) == _files(complete)
    assert not [p for p in interrupted.rglob(".*") if p.is_file()]  # no temporaries left

    again = augment(checkpoint, inputs, interrupted, num_samples=NUM_SAMPLES, seed=11, device="cpu")
    assert again["generated"] == 0

    other_seed = augment(checkpoint, inputs, tmp_path / "seed12", num_samples=1, seed=12)
    assert other_seed["generated"] == 2
    assert (
        _files(tmp_path / "seed12")["image/slice_0.nii.gz"]
        != _files(complete)["image/slice_0.nii.gz"]
    )


def test_generation_runs_in_fixed_blocks_and_a_resumed_run_regenerates_whole_blocks(
    checkpoint, inputs, tmp_path, monkeypatch
):
    """Samples are generated in fixed groups (the float rounding of a network call depends on
    its batch): a resumed run regenerates the interrupted block whole and so writes exactly the
    files of an uninterrupted run."""
    assert augment_files.sample_blocks(5, 2) == [[0, 1], [2, 3], [4]]
    assert augment_files.sample_blocks(2, 0) == [[0], [1]]
    calls = []
    generate = DRDM.generate

    def recording_generate(self, *args, **kwargs):
        calls.append(list(kwargs["sample_indices"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(DRDM, "generate", recording_generate)
    options = {"batch_size": 2}  # 2D slice: 2 samples per call; 3-slice stack: 1 per call
    complete = tmp_path / "complete"
    augment(checkpoint, inputs, complete, num_samples=3, seed=4, device="cpu", drdm_options=options)
    assert calls == [[0, 1], [2], [0], [1], [2]]  # slice, then stack

    write_field = augment_files.write_displacement_field
    writes = {"n": 0}

    def failing_write(*args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:  # while writing slice_1: slice_0 is finished, its block is not
            raise KeyboardInterrupt("simulated interruption")
        return write_field(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(augment_files, "write_displacement_field", failing_write)
    with pytest.raises(KeyboardInterrupt):
        augment(
            checkpoint, inputs, resumed, num_samples=3, seed=4, device="cpu", drdm_options=options
        )
    monkeypatch.setattr(augment_files, "write_displacement_field", write_field)
    calls.clear()
    summary = augment(
        checkpoint, inputs, resumed, num_samples=3, seed=4, device="cpu", drdm_options=options
    )
    assert summary["generated"] == 5 and summary["skipped"] == 1
    assert calls == [[0, 1], [2], [0], [1], [2]]  # block [0, 1] again, only slice_1 written
    assert _files(resumed) == _files(complete)


def test_bad_inputs_are_refused_with_their_names(checkpoint, inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        augment(tmp_path / "missing.ckpt", inputs, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no NIfTI"):
        (tmp_path / "empty").mkdir()
        augment(checkpoint, tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "bad"
    image, _ = _blob_volume((SIZE, SIZE), seed=3)
    save_nifti(bad / "case.nii.gz", image, np.eye(4))
    save_nifti(bad / "case_gt.nii.gz", np.zeros((SIZE, SIZE - 2), np.int16), np.eye(4))
    with pytest.raises(ValueError, match="case_gt.nii.gz"):
        augment(checkpoint, bad, tmp_path / "out")


def test_reference_checkpoint_generates_unfolded_acdc_samples(reference_dir):
    # recovery from t0 (48 network calls instead of 80) keeps this test affordable on a CPU
    drdm = DRDM.load(reference_dir / "cmr_recresacnet_reference.pth", start_step="t0")
    volume = nib.load(reference_dir / "acdc_patient001_frame01.nii.gz").get_fdata()
    labels = nib.load(reference_dir / "acdc_patient001_frame01_gt.nii.gz").get_fdata()
    image = torch.from_numpy(volume[:, :, 5].astype(np.float32))
    label = torch.from_numpy(np.rint(labels[:, :, 5]).astype(np.int64))
    out = drdm.generate(image, label, num_samples=1, seed=0)
    assert out.image.shape == (1, 1, *image.shape) and out.displacement.shape == (
        1,
        2,
        *image.shape,
    )
    assert out.t0.tolist() == [48]  # the reference schedule's first t0
    assert float(folding_ratio(out.displacement)) < 0.01
    assert float(out.displacement.abs().max()) > 5.0  # the sample is really deformed
    assert set(out.label.unique().tolist()) <= {0, 1, 2, 3}
    assert (out.label > 0).sum() > 0.5 * (label > 0).sum()  # the heart is still there
    rewarped = warp(image[None, None], out.displacement, "bicubic")
    torch.testing.assert_close(rewarped, out.image)


def test_the_shipped_few_step_default_repairs_the_border_folds_of_the_reference(reference_dir):
    """The shipped default on the authors' checkpoint (a few-step chain, no margin, fold repair):
    the chain alone folds at the border, the repaired fields do not."""
    from drdm.generation import SHIPPED_DEFAULTS as defaults

    assert defaults["margin"] == 0 and defaults["fold_repair"] is True
    volume = nib.load(reference_dir / "acdc_patient001_frame01.nii.gz").get_fdata()
    image = torch.from_numpy(volume[:, :, 5].astype(np.float32))
    checkpoint = reference_dir / "cmr_recresacnet_reference.pth"
    runs = {}
    for repair in (False, True):
        drdm = DRDM.load(checkpoint, fold_repair=repair)  # the shipped default is the fallback
        runs[repair] = drdm.generate(image, num_samples=1, seed=0)
    assert float(runs[False].folding_ratio) > 0.01
    assert float(runs[True].folding_ratio) == 0
    assert 0 < float(runs[True].repaired_ratio) < 0.3
    rewarped = warp(image[None, None], runs[True].displacement, "bicubic")
    torch.testing.assert_close(rewarped, runs[True].image)


def test_every_route_gets_one_precedence_of_generation_settings(checkpoint, inputs, tmp_path):
    """``DRDM.load`` from Python, src/augment.py and the DRDM field source (the on-the-fly
    augmentation's and the registration's) resolve the same settings: the caller's, else the
    checkpoint's, else the shipped default."""
    from drdm.field_sources.bank import DRDMFieldSource
    from drdm.generation import SHIPPED_DEFAULTS

    python = DRDM.load(checkpoint).settings()
    for key, value in SHIPPED_DEFAULTS.items():  # this checkpoint recommends nothing
        assert python[key] == value, key
    augment(checkpoint, inputs, tmp_path / "out", num_samples=1, device="cpu", progress=False)
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert recorded == python
    source = DRDMFieldSource(checkpoint)
    assert source._model(torch.device("cpu")).settings() == python
    # a caller's setting wins on every route; "all" is the one spelling of the full chain
    full = DRDM.load(checkpoint, sampling_steps="all").settings()
    assert full["sampling_steps"] == "all"
    assert (
        DRDMFieldSource(checkpoint, options={"sampling_steps": "all"})
        ._model(torch.device("cpu"))
        .settings()
        == full
    )
    with pytest.raises(ValueError, match='say "all"'):
        DRDM(DRDM.load(checkpoint).net, DRDM.load(checkpoint).deformation, (SIZE, SIZE),
             sampling_steps=None)  # fmt: skip
    # a checkpoint's own recommendation (the packaged model's) over the shipped default
    packaged = DRDM.load("default").settings()
    assert packaged["sampling_steps"] == "all" and packaged["start_step"] == "t0"
    assert DRDMFieldSource("default")._model(torch.device("cpu")).settings() == packaged


def test_offline_pool_reads_augment_output_by_input(checkpoint, tmp_path):
    """The offline strategy's pool reads an augment.py folder through its manifest and keeps the
    samples of the inputs it is given (a few-shot run's labelled images) and no others."""
    from drdm.augmentation import OfflineSyntheticPool

    folder = tmp_path / "inputs"
    for index in range(2):
        image, label = _blob_volume((SIZE, SIZE), seed=index)
        save_nifti(folder / f"case{index}.nii.gz", image, np.diag([0.8, 0.8, 1.0, 1.0]))
        save_nifti(folder / f"case{index}_gt.nii.gz", label, np.diag([0.8, 0.8, 1.0, 1.0]))
    output = tmp_path / "pairs"
    augment(checkpoint, folder, output, num_samples=2, seed=3, device="cpu", progress=False)

    every = OfflineSyntheticPool(output)
    assert len(every) == 4 and every.images.shape == (4, 1, SIZE, SIZE)
    only = OfflineSyntheticPool(output, inputs=["case1"])
    assert [image.name for image, _ in only.paths] == ["case1_0.nii.gz", "case1_1.nii.gz"]
    written = nib.load(output / "label" / "case1_0.nii.gz").get_fdata()
    assert torch.equal(only.labels[0, 0], torch.from_numpy(np.rint(written).astype(np.int64)))
    with pytest.raises(ValueError, match=r"no samples of inputs \['case7'\]"):
        OfflineSyntheticPool(output, inputs=["case7"])
    (output / "label" / "case0_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case0_1"):
        OfflineSyntheticPool(output)
