"""Aggregate few-shot segmentation runs into a Table-2-style table, CSVs and a plot.

Reads every run folder below a sweep folder (``src/train.py -m`` writes one per job): the run's
``.hydra/config.yaml`` gives the strategy (``augmentation.name``), ``data.n_labelled`` and
``seed``; the ``test_metrics.json`` that ``SegmentationModule`` writes after testing gives the
test metrics (Dice, sensitivity, precision per class and mean, HD95 in mm). Nothing is taken from
a logger, so any logger configuration aggregates the same way.

Outputs (all in one folder, each written atomically):

* ``runs.csv`` — one row per run (strategy, n_labelled, seed, every test metric);
* ``summary.csv`` — mean, std and count over seeds per strategy x n_labelled and metric;
* ``table.md`` — mean Dice / sensitivity / precision (in %) and HD95 (mm) as mean ± std over
  seeds, rows = n_labelled, columns = strategies (the layout of the paper's Table 2), then the
  per-class values;
* ``plot.png`` — mean Dice, sensitivity, precision and HD95 against n_labelled per strategy, error
  bars = std over seeds.

Usage::

    python experiments/fewshot/aggregate.py SWEEP_DIR [SWEEP_DIR ...] [--output DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from drdm.metrics.paired import paired_difference
from drdm.utils.atomic import save_figure_atomic, write_text_atomic

RESULTS_FILE = "test_metrics.json"
METRICS = ("dice", "sensitivity", "precision", "hd95")
# the paper reports overlap scores in percent; HD95 stays in millimetres
PERCENT = {"dice": True, "sensitivity": True, "precision": True, "hd95": False}
LABELS = {
    "dice": "Dice (%)",
    "sensitivity": "Sensitivity (%)",
    "precision": "Precision (%)",
    "hd95": "HD95 (mm)",
}
# strategies in the order of the paper's table; others follow alphabetically
STRATEGY_ORDER = (
    "none",
    "affine",
    "elastic",
    "affine_elastic",
    "bigaug",
    "drdm_forward",
    "drdm_offline",
    "drdm_cpu",
    "drdm",
    "bigaug_drdm",
)


def find_runs(sweep_dirs: Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding ``test_metrics.json``) below the given sweep folders."""
    runs = []
    for sweep_dir in sweep_dirs:
        sweep_dir = Path(sweep_dir)
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
        runs.extend(path.parent for path in sorted(sweep_dir.rglob(RESULTS_FILE)))
    return runs


def read_run(run_dir: str | Path) -> dict:
    """One run's record: ``strategy``, ``n_labelled``, ``seed``, ``class_names``, ``metrics``.

    Raises:
        FileNotFoundError: the run has no ``test_metrics.json`` or no ``.hydra/config.yaml``.
        ValueError: the config lacks ``data.n_labelled`` or ``seed``.
    """
    run_dir = Path(run_dir)
    results_path = run_dir / RESULTS_FILE
    config_path = run_dir / ".hydra" / "config.yaml"
    for path in (results_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"run {run_dir} has no {path.relative_to(run_dir)}")
    document = json.loads(results_path.read_text())
    config = OmegaConf.load(config_path)
    n_labelled = OmegaConf.select(config, "data.n_labelled", throw_on_resolution_failure=False)
    seed = OmegaConf.select(config, "seed", throw_on_resolution_failure=False)
    if n_labelled is None or seed is None:
        raise ValueError(
            f"{config_path} must set data.n_labelled and seed (got {n_labelled!r}, {seed!r}): "
            "only few-shot runs can be aggregated"
        )
    strategy = OmegaConf.select(config, "augmentation.name", default=None)
    return {
        "run_dir": str(run_dir),
        "strategy": str(strategy or document.get("augmentation", "none")),
        "n_labelled": int(n_labelled),
        "seed": int(seed),
        "class_names": list(document["class_names"]),
        "metrics": {
            key: (math.nan if value is None else float(value))
            for key, value in document["metrics"].items()
        },
    }


def _strategy_key(name: str) -> tuple[int, str]:
    rank = STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return rank, name


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n - 1) of the finite values, and their count."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan, len(finite)
    variance = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(variance), len(finite)


def summarise(runs: Sequence[dict]) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """``{(strategy, n_labelled): {metric_key: (mean, std, count)}}`` over seeds."""
    if not runs:
        raise ValueError("no runs to summarise")
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["strategy"], run["n_labelled"]), []).append(run)
    summary = {}
    for key in sorted(groups, key=lambda k: (k[1], _strategy_key(k[0]))):
        members = groups[key]
        metric_keys = sorted({name for run in members for name in run["metrics"]})
        summary[key] = {
            name: _mean_std([run["metrics"].get(name, math.nan) for run in members])
            for name in metric_keys
        }
    return summary


def _format(metric: str, mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "–"
    scale = 100.0 if PERCENT[metric] else 1.0
    text = f"{mean * scale:.1f}"
    return text + (f" ± {std * scale:.1f}" if math.isfinite(std) else "")


def format_table(runs: Sequence[dict], summary: dict | None = None) -> str:
    """Markdown: one mean-over-classes table per metric, then per-class tables."""
    summary = summary or summarise(runs)
    strategies = sorted({key[0] for key in summary}, key=_strategy_key)
    n_values = sorted({key[1] for key in summary})
    class_names = runs[0]["class_names"]
    seeds = sorted({run["seed"] for run in runs})
    lines = [
        f"Mean ± std over seeds {seeds}; Dice, sensitivity and precision in %, HD95 in mm; "
        "class means exclude the background. Rows: n_labelled, the labelled training "
        "subjects (volumes, or slabs of the embedded template).",
        "",
    ]

    def block(title: str, metric: str, key_suffix: str) -> None:
        lines.extend([f"### {title}", ""])
        lines.append("| n_labelled | " + " | ".join(strategies) + " |")
        lines.append("|---:|" + "---:|" * len(strategies))
        for n in n_values:
            cells = []
            for strategy in strategies:
                mean, std, _ = summary.get((strategy, n), {}).get(
                    f"{metric}_{key_suffix}", (math.nan, math.nan, 0)
                )
                cells.append(_format(metric, mean, std))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")

    lines.extend(["## Mean over classes", ""])
    for metric in METRICS:
        block(f"{LABELS[metric]}, mean over classes", metric, "mean")
    lines.extend(["## Per class", ""])
    for metric in METRICS:
        for class_name in class_names:
            block(f"{LABELS[metric]}, {class_name}", metric, class_name)
    counts = sorted({v[2] for stats in summary.values() for v in stats.values()})
    lines.append(f"Runs aggregated: {len(runs)} (values per cell: {counts}).")
    return "\n".join(lines) + "\n"


def comparisons(strategies: Sequence[str]) -> list[tuple[str, str]]:
    """``(baseline, strategy)`` pairs the table tests: every strategy against ``none``, and
    every DRDM strategy against ``bigaug``."""
    pairs = [("none", s) for s in strategies if s != "none" and "none" in strategies]
    if "bigaug" in strategies:
        pairs += [("bigaug", s) for s in strategies if "drdm" in s and s != "bigaug"]
    return pairs


def paired_table(runs: Sequence[dict], metric: str = "dice_mean", scale: float = 100.0) -> str:
    """Markdown: per-seed paired differences (strategy - baseline) of ``metric`` per
    ``n_labelled``, with a bootstrap 95 % interval, the Wilcoxon signed-rank p and the seeds.

    Seeds pair runs that share the split, the labelled subjects and the initial weights; a seed
    missing from either arm is left out of that comparison.
    """
    by_key = {(r["strategy"], r["n_labelled"], r["seed"]): r["metrics"].get(metric) for r in runs}
    strategies = sorted({r["strategy"] for r in runs}, key=_strategy_key)
    lines = [
        "| n_labelled | comparison | mean difference | 95 % bootstrap interval | Wilcoxon p "
        "| seeds | holds |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for n in sorted({r["n_labelled"] for r in runs}):
        for baseline, strategy in comparisons(strategies):
            seeds = sorted(
                seed
                for (name, count, seed), value in by_key.items()
                if name == strategy and count == n and value is not None and math.isfinite(value)
                and math.isfinite(by_key.get((baseline, n, seed), math.nan))
            )  # fmt: skip
            if not seeds:
                continue
            result = paired_difference(
                [by_key[(baseline, n, seed)] for seed in seeds],
                [by_key[(strategy, n, seed)] for seed in seeds],
            )
            lines.append(
                f"| {n} | {strategy} - {baseline} | {result.mean * scale:+.1f} | "
                f"[{result.low * scale:+.1f}, {result.high * scale:+.1f}] | {result.p:.3f} | "
                f"{result.n} | {'yes' if result.holds else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def read_runs_csv(path: str | Path) -> list[dict]:
    """The run records of a ``runs.csv`` this script wrote (to rebuild the tables from it)."""
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{path} holds no runs")
    fixed = {"strategy", "n_labelled", "seed", "run"}
    metric_keys = [key for key in rows[0] if key not in fixed]
    class_names = ["background"] + sorted(
        {key.split("_", 1)[1] for key in metric_keys if key.startswith("dice_")} - {"mean"}
    )
    return [
        {
            "run_dir": row["run"],
            "strategy": row["strategy"],
            "n_labelled": int(row["n_labelled"]),
            "seed": int(row["seed"]),
            "class_names": class_names,
            "metrics": {key: float(row[key]) if row[key] else math.nan for key in metric_keys},
        }
        for row in rows
    ]


def runs_csv(runs: Sequence[dict]) -> str:
    metric_keys = sorted({name for run in runs for name in run["metrics"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # run folders relative to their sweep's parent: no machine paths in committed files
    writer.writerow(["strategy", "n_labelled", "seed", *metric_keys, "run"])
    for run in sorted(
        runs, key=lambda r: (r["n_labelled"], _strategy_key(r["strategy"]), r["seed"])
    ):
        values = [f"{run['metrics'].get(k, math.nan):.6g}" for k in metric_keys]
        run_name = "/".join(Path(run["run_dir"]).parts[-2:])
        writer.writerow([run["strategy"], run["n_labelled"], run["seed"], *values, run_name])
    return buffer.getvalue()


def summary_csv(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["strategy", "n_labelled", "metric", "mean", "std", "count"])
    for (strategy, n), stats in summary.items():
        for name, (mean, std, count) in stats.items():
            writer.writerow([strategy, n, name, f"{mean:.6g}", f"{std:.6g}", count])
    return buffer.getvalue()


def plot(summary: dict, path: Path) -> None:
    """Mean metrics against n_labelled, one line per strategy, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({key[0] for key in summary}, key=_strategy_key)
    n_values = sorted({key[1] for key in summary})
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.4))
    for axis, metric in zip(axes, METRICS):
        scale = 100.0 if PERCENT[metric] else 1.0
        for offset, strategy in enumerate(strategies):
            points = [(n, summary[(strategy, n)].get(f"{metric}_mean")) for n in n_values]
            points = [(n, stats) for n, stats in points if stats is not None]
            # a small horizontal offset keeps overlapping error bars readable
            shift = 1.0 + 0.04 * (offset - (len(strategies) - 1) / 2)
            axis.errorbar(
                [n * shift for n, _ in points],
                [stats[0] * scale for _, stats in points],
                yerr=[0.0 if math.isnan(stats[1]) else stats[1] * scale for _, stats in points],
                marker="o",
                capsize=3,
                label=strategy,
            )
        axis.set_xscale("log")
        axis.set_xticks(n_values)
        axis.set_xticklabels([str(n) for n in n_values])
        axis.minorticks_off()
        axis.set_xlabel("labelled training subjects (n_labelled)")
        axis.set_title(LABELS[metric] + ", mean over classes", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(title="augmentation", fontsize=8)
    figure.tight_layout()
    try:
        save_figure_atomic(figure, path, dpi=90)
    finally:
        plt.close(figure)


def aggregate(
    sweep_dirs: Sequence[str | Path], output_dir: str | Path, runs: Sequence[dict] | None = None
) -> dict:
    """Read every run below ``sweep_dirs`` (or take ``runs``, e.g. :func:`read_runs_csv`'s);
    write runs.csv, summary.csv, table.md (with the paired differences), plot.png.

    Returns ``{"runs": [...], "summary": {...}, "table": str}``.
    """
    if runs is None:
        run_dirs = find_runs(sweep_dirs)
        if not run_dirs:
            raise FileNotFoundError(
                f"no {RESULTS_FILE} below {[str(d) for d in sweep_dirs]}"
                " (were the runs tested, test=true?)"
            )
        runs = [read_run(run_dir) for run_dir in run_dirs]
    summary = summarise(runs)
    table = (
        "## Paired differences per seed: mean Dice (%)\n\n"
        "Each strategy against `none`, and DRDM against BigAug, on the same seeds (same split, "
        "labelled subjects and initial weights). *holds*: the 95 % bootstrap interval excludes 0 "
        "and the two-sided Wilcoxon signed-rank p < 0.05; with n seeds the smallest possible p is "
        "2 / 2^n (0.125 for 4 seeds, so 4 seeds can never show a gain that holds).\n\n"
        + paired_table(runs)
        + "\n"
        + format_table(runs, summary)
    )
    output_dir = Path(output_dir)
    write_text_atomic(output_dir / "runs.csv", runs_csv(runs))
    write_text_atomic(output_dir / "summary.csv", summary_csv(summary))
    write_text_atomic(output_dir / "table.md", "# Few-shot segmentation: test metrics\n\n" + table)
    plot(summary, output_dir / "plot.png")
    return {"runs": runs, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="*", type=Path, help="src/train.py -m output folders")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--from-runs-csv", type=Path, default=None, help="rebuild the tables from a runs.csv"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dirs and args.from_runs_csv is None:
        parser.error("give sweep folders or --from-runs-csv")
    runs = read_runs_csv(args.from_runs_csv) if args.from_runs_csv else None
    result = aggregate(args.sweep_dirs, args.output, runs)
    print(result["table"])


if __name__ == "__main__":
    main()
