"""Smoke runs of the benchmark scripts (``--quick``): they run end to end and write their report.

No timing assertions: the numbers depend on the machine. The scripts import each other by name
(``python experiments/benchmarks/<name>.py`` puts their folder on ``sys.path``), so the folder is
prepended here the same way.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return lambda name: importlib.import_module(name)


def _table_rows(report: str) -> list[list[str]]:
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_deformation_benchmark_quick(benchmarks, tmp_path):
    output = tmp_path / "deformation.md"
    benchmarks("deformation").main(["--quick", "--cases", "2d-32-b2", "--output", str(output)])
    report = output.read_text()
    assert "Machine: CPU" in report
    rows = _table_rows(report)
    assert [row[1] for row in rows] == ["1", "20", "48", "79"]
    for row in rows:
        ours, loop = float(row[2]), float(row[3])
        assert ours > 0 and loop > 0
        # the printed ratio is that of the times (5 decimals: a quick run takes well under a
        # millisecond per call), within the rounding of all three numbers
        ratio = float(row[4].rstrip("x"))
        low, high = (loop - 5e-6) / (ours + 5e-6), (loop + 5e-6) / max(ours - 5e-6, 1e-9)
        assert low - 0.05 <= ratio <= high + 0.05
    # the fields grow with t, for both methods
    mean_ours = [float(row[7].rstrip("%")) for row in rows]
    assert mean_ours == sorted(mean_ours) and mean_ours[-1] > 0


def test_deformation_benchmark_rejects_unknown_case(benchmarks, tmp_path):
    with pytest.raises(ValueError, match="unknown cases.*3d-999"):
        benchmarks("deformation").main(["--quick", "--cases", "3d-999"])


def test_training_benchmark_quick(benchmarks, tmp_path):
    output = tmp_path / "training.md"
    benchmarks("training").main(["--quick", "--output", str(output)])
    rows = _table_rows(output.read_text())
    assert [row[1] for row in rows] == [
        "reference recipe (loop field, batch 1, fp32)",
        "ours fp32",
    ]
    assert rows[0][2] == "1" and rows[0][4] == "1.00x"
    assert all(float(row[3]) > 0 for row in rows)


def test_generation_benchmark_quick(benchmarks, tmp_path):
    output = tmp_path / "generation.md"
    benchmarks("generation").main(
        ["--quick", "--speed-also", "T:5:once@16", "--output", str(output)]
    )
    report = output.read_text()
    schedules, speed = report.split("## Speed of the shipped default")
    schedules, per_slice = schedules.split("Per slice")
    rows = _table_rows(schedules)
    assert [row[0].split(" **")[0] for row in rows] == [
        "T:all@4-repair",
        "T:all@4/1-repair",
        "T:4",
        "T:2:repeat",
        "t0:2:remaining",
        "t0:2:remaining~bf16",
        "T:2@0-repair",
    ]
    assert [row[1] for row in rows] == ["fp32"] * 5 + ["bf16", "fp32"]  # precision
    # margin and fold repair: conf/augment.yaml's (no margin, repair on) unless @M / -repair
    assert [row[2] for row in rows] == ["4", "4", "0", "0", "0", "0", "0"]
    assert [row[3] for row in rows] == ["no", "no", "yes", "yes", "yes", "yes", "no"]
    assert [float(row[5]) for row in rows] == [8, 8, 4, 2, 2, 2, 2]  # network calls per sample
    assert rows[1][4] == "1" and all(float(row[6]) > 0 for row in rows)  # T:all/1: batch 1
    assert rows[0][8] == "0.00 ± 0.00 %"  # the reference chain is not repaired
    # the first row is the baseline: no distance to itself, and within its own spread
    assert rows[0][13] == "0.00 ± 0.00" and rows[0][14] == "yes"
    assert [row[0] for row in _table_rows(per_slice)] == [r[0].split(" **")[0] for r in rows]
    assert sum("(pick)" in row[0] for row in rows) == 1
    data = json.loads(output.with_suffix(".json").read_text())
    assert set(data) == {"schedules", "speed"}
    assert len(data["schedules"]["rows"][2]["samples"]["dice"]) == 2  # per-sample figures kept
    assert output.with_name("generation_samples.png").stat().st_size > 0
    speed_rows = _table_rows(speed)
    assert [row[0] for row in speed_rows] == [
        "authors' procedure (fp32)",
        "authors' procedure, channels-last (fp32)",
        "shipped default (fp32)",
        "T:5:once@16 (fp32)",
    ]
    assert [row[1] for row in speed_rows] == ["1", "1", "2", "2"] and speed_rows[0][6] == "1.00x"
    assert speed_rows[1][8] == "1.00x"  # the second ratio is against the channels-last run
    assert [row[2] for row in speed_rows] == ["0", "0", "0", "16"]  # margins: shipped 0
    # calls: T = 8 in the smoke run, conf/augment.yaml's sampling_steps for the shipped default
    fallback = benchmarks("generation").generation_settings(
        benchmarks("generation").augment_options()
    )
    shipped_calls = str(min(8, fallback["sampling_steps"]))
    assert [row[3] for row in speed_rows] == ["8", "8", shipped_calls, "5"]
    assert [row[10] for row in speed_rows] == ["no", "no", "yes", "yes"]  # fold repair
    # --report-only rebuilds the same report from the JSON
    benchmarks("generation").main(["--quick", "--report-only", "--output", str(output)])
    assert output.read_text() == report


def test_generation_benchmark_rejects_a_bad_schedule(benchmarks, tmp_path):
    with pytest.raises(ValueError, match="schedule 'X:10'"):
        benchmarks("generation").main(
            ["--quick", "--output", str(tmp_path / "g.md")] + ["--schedules", "X:10"]
        )


def test_generation_benchmark_missing_checkpoint(benchmarks, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        benchmarks("generation").main(["--checkpoint", str(tmp_path / "no-such.pth")])


def test_learning_benchmark_quick(benchmarks, tmp_path):
    output = tmp_path / "learning.md"
    benchmarks("learning").main(["--quick", "--output", str(output)])
    report = output.read_text()
    assert "Machine: CPU" in report
    rows = _table_rows(report)
    # summary rows first (one per recipe), then the curve rows starting at 0 samples
    assert [row[0] for row in rows[:2]] == ["drdm", "reference"]
    # a row per measurement: samples, steps, error, seconds of each recipe; both stop at --samples
    header = [row[0] for row in rows].index("drdm samples")
    curve = rows[header + 1 :]
    assert curve[0][0] == "0" and curve[0][4] == "0"
    errors = [float(cell) for row in curve for cell in (row[2], row[6]) if cell]
    assert errors and all(0.0 < error < 2.0 for error in errors)
    drdm_samples = [int(row[0]) for row in curve if row[0]]
    reference_samples = [int(row[4]) for row in curve if row[4]]
    # batch 1: one optimiser step per sample
    assert [int(row[5]) for row in curve if row[5]] == reference_samples
    assert drdm_samples[-1] >= 8 and reference_samples[-1] == 8
    assert (tmp_path / "learning.png").stat().st_size > 0
    results = json.loads((tmp_path / "learning.json").read_text())
    assert set(results["curves"]) == {"drdm", "reference"}


def test_learning_benchmark_interpolates_the_samples_to_a_level(benchmarks):
    learning = benchmarks("learning")
    points = [
        {"samples": 0, "seconds": 0, "recovery_error": 1.0},
        {"samples": 100, "seconds": 10, "recovery_error": 0.8},
        {"samples": 200, "seconds": 30, "recovery_error": 0.6},
    ]
    assert learning.samples_to_reach(points, 0.7, "samples") == pytest.approx(150)
    assert learning.samples_to_reach(points, 0.7, "seconds") == pytest.approx(20)
    assert learning.samples_to_reach(points, 0.5, "samples") is None
    assert learning.samples_to_reach(points, 1.0, "samples") == 0


def test_fidelity_verdict_fails_a_shifted_row_and_passes_the_same_distribution(benchmarks):
    """The fidelity benchmark's pass test (Mann-Whitney per slice x statistic, pooled mean
    displacement within 10 %, folding) on records made here, not on a model."""
    fidelity = benchmarks("fidelity")
    rng = torch.Generator().manual_seed(0)

    def samples(shift: float) -> list[dict]:
        values = 0.03 + 0.005 * torch.randn(16, len(fidelity.STATISTICS), generator=rng)
        return [
            {**{name: float(row[i]) + (shift if name == "mean_displacement" else 0.0)
                for i, name in enumerate(fidelity.STATISTICS)},
             "folding": 0.005 * float(row[0])}  # below 1 %: the folding criterion holds
            for row in values
        ]  # fmt: skip

    def row(shift: float) -> dict:
        return {"slices": [{"slice": z, "samples": samples(shift)} for z in (2, 5, 8)]}

    record = {fidelity.AUTHORS: row(0.0), "same": row(0.0), "shifted": row(0.02)}
    same, shifted = fidelity.verdict(record, "same"), fidelity.verdict(record, "shifted")
    assert same["tests"] == shifted["tests"] == 3 * len(fidelity.STATISTICS)
    assert same["passes"] and abs(same["displacement_ratio"] - 1) < 0.1
    assert not shifted["passes"] and not shifted["displacement"]
    assert {t["statistic"] for t in shifted["failed_tests"]} == {"mean_displacement"}


def test_transforms_benchmark_quick(benchmarks, tmp_path):
    output = tmp_path / "transforms.md"
    benchmarks("transforms").main(["--quick", "--threads", "1", "--output", str(output)])
    data = json.loads(output.with_suffix(".json").read_text())
    methods = [row["method"] for row in data["cases"][0]["rows"]]
    assert methods[:2] == ["TorchIO RandomElasticDeformation", "MONAI Rand2DElastic"]
    for case in data["cases"]:
        for row in case["rows"]:
            assert row["seconds"] > 0 and 0 <= row["folding"] < 1 and row["mean_fraction"] > 0
        assert case["inverse"]["residual_mean_voxels"] < 0.1
    assert (
        output.with_suffix(".png").stat().st_size > 10_000
        and "x fastest peer" in output.read_text()
    )
