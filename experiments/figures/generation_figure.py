"""Figure of `src/augment.py` output: the input and its samples with labels, fields and det J.

    python src/augment.py ckpt_path=CKPT input=IN_DIR output_dir=OUT num_samples=4 seed=0
    python experiments/figures/generation_figure.py --input IN_DIR/X.nii.gz --output-dir OUT \
        --figure experiments/figures/drdm_generation.png

Reads only the files augment wrote (images, labels, fields in mm, manifest), so the figure shows
what a user gets on disk. 2D inputs or one-slice stacks.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from drdm.apps.augment import find_label  # noqa: E402
from drdm.data.io import load_nifti, nifti_stem  # noqa: E402
from drdm.deform import jacobian_determinant  # noqa: E402
from drdm.utils.atomic import save_figure_atomic  # noqa: E402


def _plane(array: np.ndarray) -> np.ndarray:
    """``[X, Y]`` or ``[X, Y, 1]`` -> ``[X, Y]`` shown with the first axis vertical."""
    return np.asarray(array).reshape(array.shape[0], array.shape[1])


def _voxel_field(path: Path, affine: np.ndarray) -> np.ndarray:
    """Written field (mm, world) -> in-plane voxel displacement ``[2, X, Y]``."""
    world = np.asarray(nib.load(path).dataobj, dtype=np.float64)[:, :, 0, 0, :]  # [X, Y, n]
    n = world.shape[-1]
    voxels = np.einsum("ij,xyj->ixy", np.linalg.inv(affine[:n, :n]), world)
    return voxels[:2]


def _grid(axis, displacement: np.ndarray, step: int = 8) -> None:
    """Deformed grid lines: positions ``x + u(x)`` of every ``step``-th row and column."""
    rows, cols = displacement.shape[1:]
    xx, yy = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    px, py = xx + displacement[0], yy + displacement[1]
    for r in range(0, rows, step):
        axis.plot(py[r], px[r], color="tab:blue", linewidth=0.6)
    for c in range(0, cols, step):
        axis.plot(py[:, c], px[:, c], color="tab:blue", linewidth=0.6)
    axis.set_xlim(0, cols - 1)
    axis.set_ylim(rows - 1, 0)
    axis.set_aspect("equal")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", type=Path, required=True, help="the input NIfTI given to augment"
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="augment's output_dir")
    parser.add_argument("--figure", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    stem = nifti_stem(args.input)
    image, affine = load_nifti(args.input)
    label_path = find_label(args.input)
    label = None if label_path is None else _plane(load_nifti(label_path)[0])
    rows = [r for r in csv.DictReader(open(args.output_dir / "manifest.csv")) if r["input"] == stem]
    rows.sort(key=lambda r: int(r["k"]))
    if not rows:
        raise FileNotFoundError(f"no samples of {stem} in {args.output_dir / 'manifest.csv'}")

    columns = 1 + len(rows)
    figure, axes = plt.subplots(3, columns, figsize=(2.6 * columns, 7.8))
    shown = _plane(image)
    vmax = np.percentile(shown, 99.5)
    axes[0, 0].imshow(shown, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("input")
    if label is not None:
        axes[0, 0].contour(label, levels=[0.5, 1.5, 2.5], colors=["r", "y", "c"], linewidths=0.7)
        axes[1, 0].imshow(label, cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
        axes[1, 0].set_title("input label")
    _grid(axes[2, 0], np.zeros((2, *shown.shape)))
    axes[2, 0].set_title("identity grid")
    for column, row in enumerate(rows, start=1):
        name = f"{stem}_{row['k']}.nii.gz"
        sample = _plane(load_nifti(args.output_dir / "image" / name)[0])
        axes[0, column].imshow(sample, cmap="gray", vmin=0, vmax=vmax)
        axes[0, column].set_title(f"sample {row['k']} (t0 = {row['t0']})")
        if label is not None:
            warped = _plane(load_nifti(args.output_dir / "label" / name)[0])
            axes[0, column].contour(
                warped, levels=[0.5, 1.5, 2.5], colors=["r", "y", "c"], linewidths=0.7
            )
            axes[1, column].imshow(warped, cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
        field = _voxel_field(args.output_dir / "field" / name, affine)
        det = jacobian_determinant(torch.from_numpy(field)[None])[0].numpy()
        axes[1, column].set_title(f"warped label, min det J {det.min():.2f}", fontsize=9)
        _grid(axes[2, column], field)
        axes[2, column].set_title(
            f"field: max {float(row['max_displacement_mm']):.1f} mm, "
            f"folding {100 * float(row['folding_ratio']):.2f}%",
            fontsize=9,
        )
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    path = save_figure_atomic(figure, args.figure, dpi=80)
    plt.close(figure)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
