"""Matplotlib (Agg) figures: DRDM recovery (original / diffused / recovered, deformed grid, det J)
and segmentation predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from drdm.utils.atomic import save_figure_atomic  # noqa: E402


def central_slice(volume: torch.Tensor) -> torch.Tensor:
    """``[C, *S]`` with 2 or 3 spatial dims -> ``[C, H, W]`` (3D: middle of the last axis)."""
    if volume.ndim == 3:
        return volume
    if volume.ndim == 4:
        return volume[..., volume.shape[-1] // 2]
    raise ValueError(f"expected [C, H, W] or [C, X, Y, Z], got shape {tuple(volume.shape)}")


def plot_deformed_grid(ax, displacement: np.ndarray, spacing: int = 4) -> None:
    """Draw the lines of ``id + u`` for a ``[2, H, W]`` voxel displacement on ``ax``."""
    height, width = displacement.shape[1:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    row_pos = rows + displacement[0]
    col_pos = cols + displacement[1]
    for r in range(0, height, spacing):
        ax.plot(col_pos[r, :], row_pos[r, :], color="tab:blue", linewidth=0.6)
    for c in range(0, width, spacing):
        ax.plot(col_pos[:, c], row_pos[:, c], color="tab:blue", linewidth=0.6)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_aspect("equal")


def recovery_figure(
    original: torch.Tensor,
    diffused: torch.Tensor,
    recovered: torch.Tensor,
    displacement: torch.Tensor,
    det_jacobian: torch.Tensor,
    path: str | Path,
    title: str = "",
) -> Path:
    """Save a 5-panel PNG atomically and return its path.

    Args:
        original, diffused, recovered: images ``[1, *S]`` (2D or 3D; 3D shows the central slice).
        displacement: ``[ndims, *S]`` voxels (only the first two in-plane components are drawn).
        det_jacobian: ``[*S]`` determinant of ``I + grad(displacement)``.
        path: output ``.png``.
    """
    images = [central_slice(x.detach().float().cpu())[0].numpy() for x in (original, diffused)]
    images.append(central_slice(recovered.detach().float().cpu())[0].numpy())
    field = central_slice(displacement.detach().float().cpu())[:2].numpy()
    det = central_slice(det_jacobian.detach().float().cpu()[None])[0].numpy()

    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
    for ax, image, name in zip(axes[:3], images, ("original", "diffused", "recovered")):
        ax.imshow(image, cmap="gray")
        ax.set_title(name)
    spacing = max(1, field.shape[-1] // 24)
    plot_deformed_grid(axes[3], field, spacing)
    axes[3].set_title("deformation grid")
    folding = float((det <= 0).mean()) * 100.0
    shown = axes[4].imshow(det, cmap="RdBu", vmin=0.0, vmax=2.0)
    axes[4].set_title(f"det J (folding {folding:.2f}%)")
    fig.colorbar(shown, ax=axes[4], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    try:
        return save_figure_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)


def log_image(loggers: list, key: str, path: Path, step: int) -> None:
    """Send a saved PNG to each logger that takes images (wandb, tensorboard); csv keeps files."""
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=step)
        elif name == "TensorBoardLogger":
            import matplotlib.image  # the TensorBoard route only

            pixels = matplotlib.image.imread(str(path))[..., :3]
            logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")


def prediction_figure(
    image: torch.Tensor,
    label: torch.Tensor,
    prediction: torch.Tensor,
    class_names: Sequence[str],
):
    """Matplotlib figure: rows = samples; columns = image, ground truth, prediction overlays.

    Args:
        image: ``[N, C, *S]`` (3D shows the central slice of the last axis).
        label, prediction: ``[N, 1, *S]`` int label maps.
    """

    def plane(volume: torch.Tensor):
        volume = volume[0].float()
        return (volume[..., volume.shape[-1] // 2] if volume.ndim == 3 else volume).numpy()

    count = image.shape[0]
    figure, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), squeeze=False)
    num_classes = len(class_names)
    for row in range(count):
        background = plane(image[row])
        for column, (title, overlay) in enumerate(
            (("image", None), ("ground truth", label[row]), ("prediction", prediction[row]))
        ):
            axis = axes[row, column]
            axis.imshow(background, cmap="gray")
            if overlay is not None:
                mask = plane(overlay)
                shown = mask.astype(float)
                shown[mask == 0] = float("nan")  # background stays transparent
                axis.imshow(shown, cmap="tab10", vmin=0, vmax=9, alpha=0.5, interpolation="nearest")
            axis.set_title(title if row == 0 else "", fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(" / ".join(f"{i}: {n}" for i, n in enumerate(class_names[1:num_classes], 1)))
    figure.tight_layout()
    return figure
