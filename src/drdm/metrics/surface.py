"""Surface-distance metrics per sample and class: HD95 and average symmetric surface distance.

Distances are in millimetres: ``spacing`` gives the voxel size along each tensor axis (``[B,
ndims]`` tensor, a sequence of ``ndims`` floats, or ``None`` for 1 mm). The surface distances
are MONAI's (``monai.metrics.utils.get_mask_edges`` / ``get_surface_distance``: mask edges by
face-connected erosion, exact Euclidean distance transforms for anisotropic voxels, on the
CPU); this module adds the per-class loop, the spacing per sample and the empty-mask policy
below. ``tests/test_metrics_monai.py`` checks the results against MONAI's
``compute_hausdorff_distance`` / ``compute_average_surface_distance``.

Directed distances run from every surface voxel of one mask to the nearest surface voxel of
the other.

Empty masks:

* class absent from both prediction and target: ``NaN`` (nothing to measure; ``nanmean`` skips
  it);
* class present in only one of them: ``missing`` if given, otherwise the image diagonal in mm,
  the largest distance possible inside the image, so a missed or hallucinated structure costs
  the most a wrong one can, and means stay finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from drdm.metrics.overlap import to_one_hot


def _spacing_per_sample(
    spacing: torch.Tensor | Sequence[float] | None, batch: int, ndims: int
) -> np.ndarray:
    """``[B, ndims]`` float64 array of voxel sizes (mm)."""
    if spacing is None:
        return np.ones((batch, ndims))
    values = torch.as_tensor(spacing, dtype=torch.float64).cpu()
    if values.ndim == 1:
        values = values.expand(batch, -1)
    if tuple(values.shape) != (batch, ndims):
        raise ValueError(
            f"spacing must have shape [{ndims}] or [{batch}, {ndims}], got {tuple(values.shape)}"
        )
    if (values <= 0).any():
        raise ValueError(f"spacing must be positive, got {values.tolist()}")
    return values.numpy()


def _directed_distances(
    source: np.ndarray, destination: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from source surface to destination surface and back, both 1-D arrays
    (MONAI's mask edges and Euclidean surface distances)."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    source_edges, destination_edges = get_mask_edges(source, destination, crop=True)
    spacing = [float(s) for s in spacing]
    forward = get_surface_distance(source_edges, destination_edges, "euclidean", spacing)
    backward = get_surface_distance(destination_edges, source_edges, "euclidean", spacing)
    return np.asarray(forward), np.asarray(backward)


def _per_class(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: torch.Tensor | Sequence[float] | None,
    include_background: bool,
    missing: float | None,
    reduce,
) -> torch.Tensor:
    pred = to_one_hot(prediction, num_classes, "prediction").cpu().numpy()
    true = to_one_hot(target, num_classes, "target").cpu().numpy()
    if pred.shape != true.shape:
        raise ValueError(
            f"prediction and target shapes differ: {tuple(prediction.shape)} "
            f"vs {tuple(target.shape)}"
        )
    batch, ndims = pred.shape[0], pred.ndim - 2
    spacings = _spacing_per_sample(spacing, batch, ndims)
    first = 0 if include_background else 1
    out = np.full((batch, num_classes - first), np.nan)
    for b in range(batch):
        diagonal = float(np.linalg.norm((np.array(pred.shape[2:]) - 1) * spacings[b]))
        penalty = diagonal if missing is None else float(missing)
        for c in range(first, num_classes):
            has_pred, has_true = pred[b, c].any(), true[b, c].any()
            if not has_pred and not has_true:
                continue
            if has_pred != has_true:
                out[b, c - first] = penalty
                continue
            forward, backward = _directed_distances(pred[b, c], true[b, c], spacings[b])
            out[b, c - first] = reduce(forward, backward)
    return torch.from_numpy(out)


def _hd95(forward: np.ndarray, backward: np.ndarray) -> float:
    # maximum of the two directed 95th percentiles (the MONAI convention)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def _asd(forward: np.ndarray, backward: np.ndarray) -> float:
    return float(np.concatenate([forward, backward]).mean())


def hausdorff_distance_95(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: torch.Tensor | Sequence[float] | None = None,
    include_background: bool = False,
    missing: float | None = None,
) -> torch.Tensor:
    """95th-percentile Hausdorff distance (mm) per sample and class, float64 ``[B, C']``.

    HD95 = max(95th percentile of prediction->target surface distances, 95th percentile of
    target->prediction distances). See the module docstring for empty masks.
    """
    return _per_class(prediction, target, num_classes, spacing, include_background, missing, _hd95)


def average_surface_distance(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: torch.Tensor | Sequence[float] | None = None,
    include_background: bool = False,
    missing: float | None = None,
) -> torch.Tensor:
    """Average symmetric surface distance (mm) per sample and class, float64 ``[B, C']``.

    Mean over the surface voxels of both masks of the distance to the other mask's surface.
    """
    return _per_class(prediction, target, num_classes, spacing, include_background, missing, _asd)
