"""The few-shot experiment: a real `src/train.py -m` sweep through Hydra, then its aggregation."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import a script of experiments/fewshot/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(
        f"fewshot_{name}", ROOT / "experiments" / "fewshot" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(spec.origin and Path(spec.origin).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


aggregate = _load("aggregate")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """Two tiny real few-shot runs, swept over the augmentation axis as users do."""
    folder = tmp_path_factory.mktemp("sweep")
    command = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        "-m",
        "experiment=default_fewshot",
        "augmentation=none,drdm_forward",
        "data.n_labelled=1",
        "seed=0",
        "torch_threads=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "model.net.channels=[4,8]",
        "model.figure_every_n_epochs=0",
        "~callbacks.rich_progress_bar",
        "+trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={folder}",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _csv_test_metrics(run_dir: Path) -> dict[str, float]:
    """The test row of the run's CSV logger (independent of test_metrics.json)."""
    with open(next(run_dir.glob("csv/*/metrics.csv"))) as stream:
        rows = [row for row in csv.DictReader(stream) if row.get("test/dice_mean")]
    assert len(rows) == 1
    return {key: float(value) for key, value in rows[0].items() if key.startswith("test/")}


@pytest.mark.slow
def test_sweep_runs_log_test_dice_and_aggregate(sweep_dir, tmp_path):
    runs = aggregate.find_runs([sweep_dir])
    assert len(runs) == 2
    logged = {}
    for run_dir in runs:
        metrics = _csv_test_metrics(run_dir)
        assert 0.0 <= metrics["test/dice_mean"] <= 1.0
        for name in ("csf_other_brain", "grey_matter", "white_matter", "mean"):
            assert f"test/dice_{name}" in metrics and f"test/hd95_{name}" in metrics
        strategy = json.loads((run_dir / "test_metrics.json").read_text())["augmentation"]
        logged[strategy] = metrics
    assert set(logged) == {"none", "drdm_forward"}

    result = aggregate.aggregate([sweep_dir], tmp_path / "results")
    records = {run["strategy"]: run for run in result["runs"]}
    assert {r["n_labelled"] for r in records.values()} == {1}
    assert {r["seed"] for r in records.values()} == {0}
    for strategy, metrics in logged.items():
        mean, std, count = result["summary"][(strategy, 1)]["dice_mean"]
        assert count == 1 and math.isnan(std)
        assert mean == pytest.approx(metrics["test/dice_mean"], abs=1e-6)
        hd95, _, _ = result["summary"][(strategy, 1)]["hd95_mean"]
        assert hd95 == pytest.approx(metrics["test/hd95_mean"], rel=1e-5)

    table = (tmp_path / "results" / "table.md").read_text()
    assert "| n_labelled | none | drdm_forward |" in table
    dice_none = 100 * logged["none"]["test/dice_mean"]
    assert f"| 1 | {dice_none:.1f} |" in table
    with open(tmp_path / "results" / "runs.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(row["strategy"] for row in rows) == ["drdm_forward", "none"]
    assert all(not Path(row["run"]).is_absolute() for row in rows)
    assert (tmp_path / "results" / "plot.png").stat().st_size > 5000


def _record(strategy: str, n_labelled: int, seed: int, dice: float) -> dict:
    metrics = {"dice_a": dice, "dice_mean": dice, "hd95_a": 10 * dice, "hd95_mean": 10 * dice}
    metrics.update({f"{m}_{c}": dice for m in ("sensitivity", "precision") for c in ("a", "mean")})
    return {
        "run_dir": f"sweep/{strategy}{n_labelled}{seed}",
        "strategy": strategy,
        "n_labelled": n_labelled,
        "seed": seed,
        "class_names": ["a"],
        "metrics": metrics,
    }


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [_record("drdm", 5, seed, dice) for seed, dice in enumerate([0.5, 0.6, 0.7])]
    runs += [_record("none", 5, 0, 0.4), _record("none", 1, 0, math.nan)]
    summary = aggregate.summarise(runs)
    mean, std, count = summary[("drdm", 5)]["dice_mean"]
    assert (mean, count) == (pytest.approx(0.6), 3)
    assert std == pytest.approx(0.1)  # sample standard deviation (n - 1)
    assert summary[("none", 1)]["dice_mean"][2] == 0  # undefined values are not averaged
    table = aggregate.format_table(runs, summary)
    assert "| 5 | 40.0 | 60.0 ± 10.0 |" in table  # columns in the paper's order: none first
    assert "| 1 | – | – |" in table
    assert "| 5 | 4.0 | 6.0 ± 1.0 |" in table  # HD95 stays in mm


def test_read_run_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_metrics.json"):
        aggregate.read_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        aggregate.aggregate([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="test=true"):
        aggregate.aggregate([tmp_path], tmp_path / "out")


def test_run_script_builds_the_sweep_command(tmp_path):
    run = _load("run")
    args = run.parse_args(["--strategies", "none,drdm_cpu", "--", "trainer.max_epochs=3"])
    command = run.sweep_command(args, tmp_path / "drdm.ckpt", tmp_path / "sweep")
    assert command[2:7] == [
        "-m",
        "experiment=default_fewshot",
        "seed=0,1,2",
        "data.n_labelled=1,5",
        "augmentation=none,drdm_cpu",
    ]
    assert f"drdm_checkpoint={tmp_path / 'drdm.ckpt'}" in command
    assert command[-1] == "trainer.max_epochs=3"  # user overrides come last and win
    assert "python src/train.py -m" in run.shown(command)
    (tmp_path / "checkpoints").mkdir()
    for name in ("epoch0001-loss9.5.ckpt", "epoch0002-loss7.25.ckpt", "last.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert run.find_checkpoint(tmp_path).name == "epoch0002-loss7.25.ckpt"


def test_drdm_training_holds_out_the_few_shot_test_set(tmp_path):
    run = _load("run")
    command = run.drdm_command(run.parse_args([]), tmp_path / "drdm")
    assert "data.split.test_ids=[icbm152_b00_00_02,icbm152_b00_00_06]" in command
    assert "data.split.val_ids=[icbm152_b00_00_04]" in command
    assert f"hydra.run.dir={tmp_path / 'drdm'}" in command


def test_the_paired_table_tells_a_consistent_gain_from_noise_and_round_trips_runs_csv(tmp_path):
    """Per-seed pairing: a DRDM gain on every one of 8 seeds holds, a noisy one does not; the
    table rebuilds from the runs.csv it wrote."""
    runs = []
    for seed in range(8):
        base = 0.60 + 0.02 * math.sin(seed)
        for strategy, value in (
            ("none", base),
            ("bigaug", base + (0.01 if seed % 2 else -0.01)),
            ("drdm", base + 0.03 + 0.002 * seed),
        ):
            metrics = {"dice_mean": value, "dice_a": value, "hd95_mean": 5.0}
            runs.append(
                {"run_dir": f"r{strategy}{seed}", "strategy": strategy, "n_labelled": 1,
                 "seed": seed, "class_names": ["background", "a"], "metrics": metrics}
            )  # fmt: skip
    table = aggregate.paired_table(runs)
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert rows["drdm - none"].rstrip(" |").endswith("yes") and "| 8 |" in rows["drdm - none"]
    assert rows["bigaug - none"].rstrip(" |").endswith("no")
    assert rows["drdm - bigaug"].rstrip(" |").endswith("yes")
    (tmp_path / "runs.csv").write_text(aggregate.runs_csv(runs))
    assert aggregate.paired_table(aggregate.read_runs_csv(tmp_path / "runs.csv")) == table


def _write_volume(folder: Path) -> Path:
    """A 4-slice volume (the last unlabelled) with ACDC's trap: unit sform scales, the true
    spacing in pixdim."""
    import nibabel as nib
    import numpy as np

    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 24), np.linspace(-1, 1, 20), indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = np.stack(
        [(radius < r).astype(np.int16) * c for r, c in ((0.3, 1), (0.5, 3), (0.4, 3), (0, 0))], -1
    )
    label[..., 1][radius < 0.2] = 2
    image = (label * 40 + 10).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("acdc_patient007_frame01", image), ("acdc_patient007_frame01_gt", label)):
        nifti = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))
        nifti.header.set_zooms((1.5, 1.25, 10.0))
        nib.save(nifti, folder / f"{name}.nii.gz")
    return folder / "acdc_patient007_frame01.nii.gz"


def test_acdc_study_slices_keep_true_spacing_and_the_design_is_balanced(tmp_path):
    import nibabel as nib
    import numpy as np

    acdc = _load("acdc")
    volume = _write_volume(tmp_path / "volume")
    label = volume.with_name("acdc_patient007_frame01_gt.nii.gz")
    stems = acdc.prepare_slices(volume, label, tmp_path / "slices", 32)
    assert stems == [f"patient007_frame01_s0{i}" for i in range(3)]  # s03 has no label
    written = nib.load(tmp_path / "slices" / "patient007_frame01_s01.nii.gz")
    assert written.shape == (32, 32)
    assert np.allclose(np.abs(np.diag(written.affine))[:2], [1.5 * 23 / 31, 1.25 * 19 / 31])
    assert written.affine[2, 3] == 10.0  # the slice's world position
    image = np.asarray(written.dataobj)
    assert image.min() == 0 and image.max() == 1
    labels = np.asarray(nib.load(tmp_path / "slices" / "patient007_frame01_s01_gt.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 2, 3}
    pool = ["a", "b", "c", "d"]
    assert [acdc.labelled_slices(pool, 1, s) for s in range(5)] == [
        ["a"],
        ["b"],
        ["c"],
        ["d"],
        ["a"],
    ]
    pairs = [tuple(acdc.labelled_slices(pool, 2, s)) for s in range(6)]
    assert len(set(pairs)) == 6
    with pytest.raises(ValueError, match="larger than the pool"):
        acdc.labelled_slices(pool, 5, 0)


def test_acdc_study_runs_end_to_end_on_a_volume_the_test_writes(tmp_path):
    """slices -> augment.py pairs of the pool -> one sweep per (n, seed) -> the paper's table."""
    volume = _write_volume(tmp_path / "volume")
    command = [
        sys.executable,
        str(ROOT / "experiments" / "fewshot" / "acdc.py"),
        f"--volume={volume}",
        "--checkpoint=default",
        "--size=32",
        "--pool=0",
        "--val=1",
        "--test=2",
        "--n-labelled=1",
        "--seeds=0",
        "--strategies=none,drdm_offline",
        "--samples=2",
        "--epochs=1",
        "--jobs=1",
        f"--work={tmp_path / 'work'}",
        f"--output={tmp_path / 'results'}",
        "model.net.channels=[4,8]",
        "trainer.check_val_every_n_epoch=1",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = (tmp_path / "work" / "drdm_pairs" / "samples" / "manifest.csv").read_text()
    rows = manifest.splitlines()[1:]
    assert len(rows) == 2 and all(r.startswith("patient007_frame01_s00,") for r in rows)
    runs = list(csv.DictReader(open(tmp_path / "results" / "runs.csv")))
    assert sorted(r["strategy"] for r in runs) == ["drdm_offline", "none"]
    config = (
        tmp_path / "work" / "sweeps" / "n1_seed0" / "1" / ".hydra" / "config.yaml"
    ).read_text()
    assert "patient007_frame01_s00" in config and "offline_inputs" in config
    info = (tmp_path / "results" / "run_info.md").read_text()
    assert "Total wall time" in info and "for 2 runs" in info and "DRDM pairs" in info
