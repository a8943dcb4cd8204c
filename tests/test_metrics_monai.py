"""HD95 and ASD against MONAI's top-level surface-distance metrics.

Ours wrap MONAI's surface distances with our class loop, spacing and empty-mask policy.
"""

import monai.metrics as monai_metrics  # noqa: E402
import numpy as np
import pytest
import torch

from drdm.metrics import average_surface_distance, hausdorff_distance_95


def _blobs(shape, seed: int) -> torch.Tensor:
    """Two random overlapping ellipsoid-ish label maps ``[2, 1, *shape]`` with classes 0..2."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    maps = []
    for _ in range(2):
        label = np.zeros(shape, dtype=np.int64)
        for value in (1, 2):
            centre = rng.uniform(0.3, 0.7, len(shape)) * np.array(shape)
            radii = rng.uniform(0.12, 0.3, len(shape)) * np.array(shape)
            inside = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) < 1
            label[inside] = value
        maps.append(label)
    return torch.from_numpy(np.stack(maps))[:, None]


def _one_hot(label: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label[:, 0], classes).movedim(-1, 1).float()


@pytest.mark.parametrize(
    "shape, spacing",
    [((40, 36), (1.0, 1.0)), ((40, 36), (0.8, 2.5)), ((18, 20, 16), (1.5, 1.0, 3.0))],
)
def test_hd95_and_asd_match_monai(shape, spacing):
    prediction, target = _blobs(shape, seed=1), _blobs(shape, seed=2)
    ours_hd = hausdorff_distance_95(prediction, target, 3, spacing=spacing)
    ours_asd = average_surface_distance(prediction, target, 3, spacing=spacing)
    kwargs = dict(include_background=False, spacing=list(spacing))
    theirs_hd = monai_metrics.compute_hausdorff_distance(
        _one_hot(prediction, 3), _one_hot(target, 3), percentile=95, **kwargs
    )
    theirs_asd = monai_metrics.compute_average_surface_distance(
        _one_hot(prediction, 3), _one_hot(target, 3), symmetric=True, **kwargs
    )
    assert torch.isfinite(ours_hd).all() and (ours_hd > 0).all()
    torch.testing.assert_close(ours_hd, theirs_hd.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_asd, theirs_asd.double(), rtol=1e-5, atol=1e-5)
