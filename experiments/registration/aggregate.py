"""Tables and figure of the registration comparison (called by ``run.py``).

Reads each mode's ``eval/metrics.csv`` (written by ``src/eval.py``, one row per held-out pair),
adds the no-registration baseline (identity field) on the very same pairs, and writes:

* ``table.md`` / ``table.csv`` — mean ± std over the held-out pairs per mode: Dice (foreground
  classes), ASD and HD95 (mm), field error (mean endpoint error against the known field, mm),
  folding ratio (% of voxels with ``det J <= 0``), SD of log-Jacobian, training time;
* ``per_pair.csv`` — every pair and mode;
* ``paired.md`` — paired differences of Dice between modes over the same held-out pairs (mean,
  95 % bootstrap interval, Wilcoxon signed-rank p); ``--paired-from per_pair.csv`` rebuilds it
  alone;
* ``figure.png`` — one held-out pair: moving, fixed and the true field, then per mode the
  warped image, its difference to the fixed image, the predicted field (deformed grid) and the
  endpoint-error map;
* ``run.json`` — the command, machine, wall times and run folders.

Re-aggregate an existing run: ``python experiments/registration/aggregate.py RUN_FOLDER/run.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from drdm.metrics.paired import paired_difference
from drdm.utils.atomic import atomic_write, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
METRICS = (
    ("dice", "Dice", 1.0, "{:.3f}"),
    ("asd", "ASD (mm)", 1.0, "{:.2f}"),
    ("hd95", "HD95 (mm)", 1.0, "{:.2f}"),
    ("field_error", "field error (mm)", 1.0, "{:.2f}"),
    ("field_error_foreground", "field error in brain (mm)", 1.0, "{:.2f}"),
    ("tre", "TRE (mm)", 1.0, "{:.2f}"),
    ("folding_ratio", "folding (%)", 100.0, "{:.3f}"),
    ("sd_log_jacobian", "SDlogJ", 1.0, "{:.3f}"),
)
IDENTITY = "none (identity)"


def read_rows(path: Path, mode: str) -> list[dict]:
    """``metrics.csv`` rows with floats and the given ``mode``."""
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{path} has no pairs")
    parsed = []
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k not in ("id", "mode") and v != ""}
        parsed.append({"id": row["id"], "mode": mode, **values})
    return parsed


def compose_eval(overrides: Sequence[str] = ()):
    """``conf/eval.yaml`` with the experiment, as ``src/eval.py`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "eval", overrides=["experiment=default_registration", "checkpoint=none", *overrides]
        )


def test_batches(overrides: Sequence[str] = ()) -> list[dict]:
    """Every held-out test batch of the experiment's data (the pairs ``src/eval.py`` sees)."""
    from drdm.utils.instantiate import build

    cfg = compose_eval(overrides)
    torch.manual_seed(int(cfg.seed))
    datamodule = build(cfg.data)
    datamodule.setup("test")
    return list(datamodule.test_dataloader())


def identity_rows(batches: Sequence[Mapping], num_classes: int | None) -> list[dict]:
    """Metrics of the zero field (no registration) on ``batches``."""
    from drdm.metrics.pairwise import pair_metrics

    rows = []
    for batch in batches:
        zero = torch.zeros(
            batch["moving"].shape[0], batch["moving"].ndim - 2, *batch["moving"].shape[2:]
        )
        metrics = pair_metrics(zero, batch, num_classes=num_classes)
        for index, pair_id in enumerate(batch["id"]):
            row = {"id": str(pair_id), "mode": IDENTITY}
            row.update({name: float(values[index]) for name, values in metrics.items()})
            rows.append(row)
    return rows


def summary(rows: Sequence[Mapping], modes: Sequence[str]) -> list[dict]:
    """Mean, std and count per mode and metric (NaN skipped)."""
    out = []
    for mode in modes:
        line: dict = {"mode": mode}
        for name, *_ in METRICS:
            values = np.array([r[name] for r in rows if r["mode"] == mode and name in r], float)
            values = values[np.isfinite(values)]
            line[f"{name}_mean"] = float(values.mean()) if values.size else math.nan
            line[f"{name}_std"] = float(values.std()) if values.size else math.nan
            line["pairs"] = max(line.get("pairs", 0), int(values.size))
        out.append(line)
    return out


def markdown_table(lines: Sequence[Mapping], seconds: Mapping[str, float]) -> str:
    """The results table: mean ± std per metric, one row per mode."""
    shown = [m for m in METRICS if any(math.isfinite(line[f"{m[0]}_mean"]) for line in lines)]
    header = ["training mode", *[m[1] for m in shown], "train time (s)"]
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        cells = [line["mode"]]
        for name, _, scale, fmt in shown:
            mean, std = scale * line[f"{name}_mean"], scale * line[f"{name}_std"]
            cells.append(
                "n/a" if not math.isfinite(mean) else f"{fmt.format(mean)} ± {fmt.format(std)}"
            )
        cells.append(f"{seconds[line['mode']]:.0f}" if line["mode"] in seconds else "–")
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n"


def csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    import io

    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def predict(checkpoint: str, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The displacement a trained checkpoint predicts for one pair batch."""
    from drdm.models.registration import RegistrationModule

    # evaluation never makes synthetic pairs: the training field source is not rebuilt
    model = RegistrationModule.load_from_checkpoint(
        checkpoint, map_location="cpu", mode="unsupervised"
    )
    with torch.no_grad():
        return model.eval()(moving, fixed)


def figure(batch: Mapping, runs: Sequence[Mapping], path: Path, index: int = 0) -> Path:
    """Moving / fixed / true field, then warped / difference / field / error per mode."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drdm.deform import warp
    from drdm.utils.figures import plot_deformed_grid

    moving, fixed = batch["moving"][index : index + 1], batch["fixed"][index : index + 1]
    truth = batch["displacement"][index : index + 1]
    spacing = float(batch["spacing"][index].mean())
    fields = [(IDENTITY, torch.zeros_like(truth))]
    fields += [(run["mode"], predict(run["checkpoint"], moving, fixed)) for run in runs]
    # colour range: the 99th percentile of the true field's size (a few corner voxels move more)
    error_max = float((truth.norm(dim=1) * spacing).flatten().quantile(0.99))
    columns = ["warped moving", "|warped − fixed|", "predicted field", "endpoint error (mm)"]
    fig, axes = plt.subplots(1 + len(fields), 4, figsize=(8.4, 2.1 * (1 + len(fields))))
    image_kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    axes[0, 0].imshow(moving[0, 0], **image_kw)
    axes[0, 0].set_title("moving", fontsize=8)
    axes[0, 1].imshow(fixed[0, 0], **image_kw)
    axes[0, 1].set_title("fixed (held-out field)", fontsize=8)
    plot_deformed_grid(axes[0, 2], truth[0].numpy(), spacing=4)
    axes[0, 2].set_title("true field", fontsize=8)
    axes[0, 3].imshow((fixed - moving).abs()[0, 0], cmap="magma", vmin=0, vmax=0.5)
    axes[0, 3].set_title("|moving − fixed|", fontsize=8)
    for row, (mode, field) in enumerate(fields, start=1):
        warped = warp(moving, field)
        epe = (field - truth).norm(dim=1)[0] * spacing
        axes[row, 0].imshow(warped[0, 0], **image_kw)
        axes[row, 1].imshow((warped - fixed).abs()[0, 0], cmap="magma", vmin=0, vmax=0.5)
        plot_deformed_grid(axes[row, 2], field[0].numpy(), spacing=4)
        shown = axes[row, 3].imshow(epe, cmap="viridis", vmin=0, vmax=error_max)
        axes[row, 0].set_ylabel(mode, fontsize=8)
        axes[row, 3].set_title(f"mean {float(epe.mean()):.2f} mm", fontsize=7)
        if row == 1:
            for column, title in enumerate(columns[:3]):
                axes[row, column].set_title(title, fontsize=8)
    fig.colorbar(shown, ax=axes[:, 3], shrink=0.3, label="mm")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    try:
        return atomic_write(
            path, lambda temporary: fig.savefig(temporary, dpi=64, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


def mode_comparisons(modes: Sequence[str]) -> list[tuple[str, str]]:
    """``(baseline, mode)``: every mode against no registration and against the unsupervised
    network; DRDM pairs against B-spline pairs (with and without real pairs)."""
    pairs = [(IDENTITY, m) for m in modes if m != IDENTITY]
    pairs += [("unsupervised", m) for m in modes if m not in (IDENTITY, "unsupervised")]
    for suffix in ("", "+real"):
        drdm, bspline = f"synthetic_drdm{suffix}", f"synthetic_bspline{suffix}"
        if drdm in modes and bspline in modes:
            pairs.append((bspline, drdm))
    return [(a, b) for a, b in pairs if a in modes]


def paired_table(rows: Sequence[Mapping], metric: str = "dice") -> str:
    """Markdown: ``mode - baseline`` of ``metric`` paired by held-out pair id."""
    values = {(row["mode"], row["id"]): float(row[metric]) for row in rows}
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    lines = [
        f"# Registration: paired differences of {metric} over the same held-out pairs",
        "",
        "*holds*: the 95 % bootstrap interval excludes 0 and the two-sided Wilcoxon signed-rank "
        "p < 0.05.",
        "",
        "| comparison | mean difference | 95 % bootstrap interval | Wilcoxon p | pairs | holds |",
        "|---|---:|---|---:|---:|---|",
    ]
    for baseline, mode in mode_comparisons(modes):
        ids = sorted(
            i for (m, i), v in values.items()
            if m == mode and math.isfinite(v) and math.isfinite(values.get((baseline, i), math.nan))
        )  # fmt: skip
        if not ids:
            continue
        result = paired_difference(
            [values[(baseline, i)] for i in ids], [values[(mode, i)] for i in ids]
        )
        lines.append(
            f"| {mode} - {baseline} | {result.mean:+.3f} | [{result.low:+.3f}, {result.high:+.3f}] "
            f"| {result.p:.3g} | {result.n} | {'yes' if result.holds else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def read_per_pair(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return [
            {k: (v if k in ("mode", "id") else (float(v) if v else math.nan)) for k, v in r.items()}
            for r in csv.DictReader(stream)
        ]


def aggregate(info: Mapping, results: Path, eval_overrides: Sequence[str] = ()) -> Path:
    """Write table.md / table.csv / per_pair.csv / figure.png / run.json under ``results``."""
    runs = list(info["runs"])
    batches = test_batches(eval_overrides)
    cfg = compose_eval(eval_overrides)
    rows = identity_rows(batches, cfg.num_classes)
    for run in runs:
        rows += read_rows(ROOT / run["eval_dir"] / "metrics.csv", run["mode"])
    modes = [IDENTITY, *[run["mode"] for run in runs]]
    lines = summary(rows, modes)
    seconds = {run["mode"]: run["train_seconds"] for run in runs}
    results = Path(results)
    names = [name for name, *_ in METRICS]
    write_text_atomic(results / "per_pair.csv", csv_text(rows, ["mode", "id", *names]))
    columns = ["mode", "pairs", *[f"{n}_{s}" for n in names for s in ("mean", "std")]]
    write_text_atomic(results / "table.csv", csv_text(lines, columns))
    table = write_text_atomic(results / "table.md", markdown_table(lines, seconds))
    write_text_atomic(results / "paired.md", paired_table(rows))
    # the held-out pair of the first batch with the most labelled anatomy
    first = batches[0]
    index = int((first["fixed_label"] > 0).flatten(1).sum(1).argmax())
    figure(first, runs, results / "figure.png", index=index)
    write_json_atomic(results / "run.json", dict(info))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="re-aggregate a registration comparison run")
    parser.add_argument("run_json", type=Path, nargs="?", help="run.json of a finished run.py")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--paired-from", type=Path, default=None, help="a per_pair.csv")
    args = parser.parse_args(argv)
    if args.paired_from is not None:
        text = paired_table(read_per_pair(args.paired_from))
        write_text_atomic(args.results / "paired.md", text)
        print(text)
        return
    if args.run_json is None:
        parser.error("give a run.json, or --paired-from per_pair.csv")
    info = json.loads(args.run_json.read_text())
    print(aggregate(info, args.results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
