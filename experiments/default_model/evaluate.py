"""Evaluate a DRDM on the embedded data's validation slices and draw its samples.

    python experiments/default_model/evaluate.py [--checkpoint default] [--output DIR]

Writes ``DIR/evaluation.md`` (recovery error and folding on the fixed validation fields of
``drdm.metrics.recovery.fixed_validation_fields``, the same ones as
``experiments/benchmarks/learning.py`` and ``tests/test_pretrained.py``; folding and
displacement of generated samples) and ``DIR/samples.png`` (validation slices, diffused to
``t0`` and recovered by the chain, with the field as a deformed grid).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

from benchmark_utils import machine_description  # noqa: E402

from drdm.deform import folding_ratio, warp  # noqa: E402
from drdm.generation import DRDM  # noqa: E402
from drdm.generation.chain import recover, start_steps  # noqa: E402
from drdm.metrics.recovery import evaluate_recovery, fixed_validation_fields  # noqa: E402
from drdm.utils.atomic import save_figure_atomic, write_text_atomic  # noqa: E402
from drdm.utils.figures import plot_deformed_grid  # noqa: E402


def validation_images() -> torch.Tensor:
    """The embedded default data's validation slices ``[N, 1, 64, 64]`` (0..1)."""
    from hydra import compose, initialize_config_dir

    from drdm.utils.instantiate import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused"])
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    return torch.cat([b["image"] for b in datamodule.dataloader("val", shuffle=False)]).float()


def sample_figure(drdm: DRDM, images: torch.Tensor, t0: int, path: Path) -> list[float]:
    """Rows: original, diffused to ``t0``, recovered (the chain from the model's start step),
    field grid; returns the folding ratio of every recovered field."""
    t = torch.full((images.shape[0],), t0)
    generator = torch.Generator().manual_seed(0)
    diffused, _ = drdm.deformation(tuple(images.shape[2:]), t, generator=generator)
    first = start_steps(t, drdm.timesteps, drdm.start_step)
    displacement = recover(drdm.net, images, diffused, first)
    folding = folding_ratio(displacement).tolist()
    columns = images.shape[0]
    figure, axes = plt.subplots(4, columns, figsize=(2.3 * columns, 9.4))
    rows = (
        ("original", images),
        (f"diffused, t0 = {t0}", warp(images, diffused)),
        (f"recovered ({int(first[0]) + 1} steps)", warp(images, displacement)),
    )
    for column in range(columns):
        for row, (name, batch) in enumerate(rows):
            axes[row, column].imshow(batch[column, 0].T, cmap="gray", origin="lower")
            axes[row, column].set_title(name, fontsize=8)
        grid = displacement[column].numpy()
        # drawn like the images above: first array axis across, second axis upwards
        plot_deformed_grid(axes[3, column], grid.transpose(0, 2, 1)[::-1], spacing=3)
        axes[3, column].set_ylim(-0.5, grid.shape[2] - 0.5)
        axes[3, column].set_title(f"field, folding {100 * folding[column]:.2f} %", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("packaged DRDM on held-out slices: diffuse to t0, recover with the chain")
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=100)
    plt.close(figure)
    return folding


# (t0, where the chain starts) pairs of the folding table
T0_SETTINGS = ((16, "t0"), (24, "t0"), (32, "t0"), (48, "t0"), (24, "T"), (32, "T"))


def t0_table(checkpoint: str, images: torch.Tensor) -> list[str]:
    """Folding and displacement of ``DRDM.generate`` (2 samples per image, seed 0) for each of
    :data:`T0_SETTINGS`, as markdown table lines."""
    from benchmark_utils import markdown_table

    rows = []
    for t0, start in T0_SETTINGS:
        drdm = DRDM.load(checkpoint, t0_start=t0, t0_step=0, start_step=start)
        out = drdm.generate(images, num_samples=2, seed=0)
        length = out.displacement.square().sum(1).sqrt()
        rows.append(
            [
                str(t0),
                "t0 - 1" if start == "t0" else "T - 1",
                f"{100 * float(out.folding_ratio.max()):.3f} %",
                f"{100 * float(out.folding_ratio.mean()):.3f} %",
                f"{float(length.mean()):.2f}",
            ]
        )
    header = ["t0", "chain starts at", "folding max", "folding mean", "mean displacement (vox)"]
    return markdown_table(header, rows, align="rlrrr")


def curve_figure(curve_csv: Path, path: Path) -> None:
    """Validation recovery error of the training run against samples seen."""
    import csv

    rows = list(csv.DictReader(curve_csv.open()))
    samples = [int(row["samples"]) for row in rows]
    errors = [float(row["val_recovery_error"]) for row in rows]
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    axis.plot(samples, errors, marker=".")
    axis.axhline(1.0, color="grey", lw=0.8, ls=":")
    axis.set_xlabel("training samples seen")
    axis.set_ylabel("val/recovery_error (EMA net)")
    axis.set_title("training run of the packaged DRDM", fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=100)
    plt.close(figure)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--output", type=Path, default=HERE)
    parser.add_argument("--t0", type=int, default=None, help="default: the model's t0_start")
    parser.add_argument("--columns", type=int, default=5)
    parser.add_argument(
        "--curve", type=Path, default=HERE / "training_curve.csv", help="plotted to curve.png"
    )
    args = parser.parse_args(argv)
    if args.curve.is_file():
        curve_figure(args.curve, args.output / "curve.png")
    torch.manual_seed(0)
    drdm = DRDM.load(args.checkpoint)
    images = validation_images()
    measured = evaluate_recovery(drdm.net, *fixed_validation_fields(images, drdm.deformation))
    shown = images[torch.linspace(0, images.shape[0] - 1, args.columns).round().long()]
    t0 = drdm.t0_start if args.t0 is None else args.t0
    folding = sample_figure(drdm, shown, t0, args.output / "samples.png")
    generated = drdm.generate(images, num_samples=4, seed=0)
    length = generated.displacement.square().sum(1).sqrt().flatten(1)
    lines = [
        "# Packaged DRDM: evaluation",
        "",
        f"`python experiments/default_model/evaluate.py --checkpoint {args.checkpoint}`",
        "",
        f"Machine: {machine_description()}",
        "",
        f"- recovery error on the fixed validation fields ({images.shape[0]} validation slices"
        f" x 4 fields, t spread over 0..{drdm.timesteps - 1}; 0 = perfect, 1 = none): "
        f"**{measured['recovery_error']:.3f}**; folding of the predicted steps "
        f"{100 * measured['folding_ratio']:.3f} %",
        f"- diffused to t0 = {t0}, recovered by the chain from step "
        f"{'T-1' if drdm.start_step == 'T' else drdm.start_step} (figure, {len(folding)} slices): "
        f"folding of the final fields {100 * max(folding):.3f} % at most",
        f"- `DRDM.generate` with the model's defaults (t0 from {drdm.t0_start}, +{drdm.t0_step} "
        f"every {drdm.t0_every} samples, chain from {drdm.start_step}; "
        f"{images.shape[0]} slices x 4 samples, seed 0): folding "
        f"{100 * float(generated.folding_ratio.max()):.3f} % at most; displacement mean "
        f"{float(length.mean()):.2f} voxels, max {float(length.max()):.2f} voxels "
        f"({100 * float(length.max()) / max(drdm.image_size):.1f} % of the image side)",
        "",
        "![samples](samples.png)",
        "",
        f"`DRDM.generate` on the {images.shape[0]} validation slices, 2 samples each (seed 0), "
        "for other t0 and start steps:",
        "",
        *t0_table(args.checkpoint, images),
        "",
    ]
    report = args.output / "evaluation.md"
    write_text_atomic(report, "\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
