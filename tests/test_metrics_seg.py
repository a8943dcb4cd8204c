"""Segmentation metrics: overlap scores, surface distances in mm, empty-mask rules, aggregation."""

import math

import pytest
import torch
import torch.nn.functional as F

from drdm.metrics import (
    average_surface_distance,
    confusion_counts,
    dice_score,
    hausdorff_distance_95,
    precision,
    sensitivity,
    to_one_hot,
)
from drdm.metrics.collection import SegmentationScores


def _square_labels(shape=(32, 32), box=(slice(8, 16), slice(8, 16)), value=1) -> torch.Tensor:
    labels = torch.zeros(1, 1, *shape, dtype=torch.long)
    labels[(0, 0, *box)] = value
    return labels


def test_perfect_prediction_scores_one():
    labels = _square_labels()
    labels[0, 0, 20:28, 20:30] = 2
    for metric in (dice_score, sensitivity, precision):
        assert torch.equal(metric(labels, labels, 3), torch.ones(1, 2, dtype=torch.float64))
    assert torch.equal(hausdorff_distance_95(labels, labels, 3), torch.zeros(1, 2).double())


def test_disjoint_masks_score_zero():
    prediction = _square_labels(box=(slice(0, 8), slice(0, 8)))
    target = _square_labels(box=(slice(20, 28), slice(20, 28)))
    assert dice_score(prediction, target, 2).item() == 0.0
    assert sensitivity(prediction, target, 2).item() == 0.0
    assert precision(prediction, target, 2).item() == 0.0


def test_partial_overlap_matches_counts():
    # 8x8 target, prediction shifted by 2 rows: 48 shared pixels, 16 extra, 16 missed
    target = _square_labels()
    prediction = _square_labels(box=(slice(10, 18), slice(8, 16)))
    tp, fp, fn = confusion_counts(prediction, target, 2)
    assert (tp.item(), fp.item(), fn.item()) == (48.0, 16.0, 16.0)
    assert dice_score(prediction, target, 2).item() == pytest.approx(96 / 128)


def test_empty_class_is_nan_not_a_score():
    target = _square_labels()
    scores = dice_score(target, target, 3)  # class 2 absent from both
    assert scores[0, 0] == 1.0 and math.isnan(scores[0, 1])
    assert math.isnan(hausdorff_distance_95(target, target, 3)[0, 1])


def test_one_hot_and_probabilities_equal_label_map():
    labels = _square_labels()
    labels[0, 0, 20:26, 3:9] = 2
    one_hot = F.one_hot(labels[:, 0], 3).movedim(-1, 1)
    logits = one_hot.float() * 5 + torch.randn(one_hot.shape) * 0.1
    expected = dice_score(labels, labels, 3)
    assert torch.equal(dice_score(one_hot.bool(), labels, 3), expected)
    assert torch.equal(dice_score(logits, labels, 3), expected)
    assert torch.equal(to_one_hot(labels, 3), one_hot.bool())


def test_background_can_be_included():
    labels = _square_labels()
    assert dice_score(labels, labels, 2, include_background=True).shape == (1, 2)


def test_hd95_is_spacing_aware_in_mm():
    # prediction = target shifted 3 voxels along axis 0: every surface distance is <= 3 voxels
    target = _square_labels(box=(slice(8, 18), slice(8, 18)))
    prediction = _square_labels(box=(slice(11, 21), slice(8, 18)))
    in_voxels = hausdorff_distance_95(prediction, target, 2).item()
    anisotropic = hausdorff_distance_95(prediction, target, 2, spacing=[2.0, 0.5]).item()
    assert in_voxels == pytest.approx(3.0)
    assert anisotropic == pytest.approx(6.0)  # the shift is along the 2 mm axis
    per_sample = hausdorff_distance_95(
        torch.cat([prediction, prediction]),
        torch.cat([target, target]),
        2,
        spacing=torch.tensor([[1.0, 1.0], [2.0, 1.0]]),
    )
    assert per_sample[:, 0].tolist() == pytest.approx([3.0, 6.0])


def test_average_surface_distance_symmetric_and_smaller_than_hd95():
    target = _square_labels(box=(slice(8, 18), slice(8, 18)))
    prediction = _square_labels(box=(slice(11, 21), slice(8, 18)))
    forward = average_surface_distance(prediction, target, 2).item()
    backward = average_surface_distance(target, prediction, 2).item()
    assert forward == pytest.approx(backward)
    assert 0 < forward < hausdorff_distance_95(prediction, target, 2).item()


def test_missing_structure_costs_the_image_diagonal():
    target = _square_labels()
    empty = torch.zeros_like(target)
    diagonal = math.hypot(31 * 2.0, 31 * 1.0)
    value = hausdorff_distance_95(empty, target, 2, spacing=[2.0, 1.0]).item()
    assert value == pytest.approx(diagonal)
    assert hausdorff_distance_95(empty, target, 2, missing=99.0).item() == 99.0


def test_3d_volumes():
    target = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    target[0, 0, 4:10, 4:10, 4:10] = 1
    prediction = torch.roll(target, shifts=2, dims=4)
    assert dice_score(prediction, target, 2).item() == pytest.approx(2 * 144 / 432)
    assert hausdorff_distance_95(prediction, target, 2, spacing=[1, 1, 1.5]).item() == (
        pytest.approx(3.0)
    )


@pytest.mark.parametrize(
    "prediction, target, message",
    [
        (
            torch.zeros(1, 2, 8, 8, dtype=torch.long),
            torch.zeros(1, 1, 8, 8, dtype=torch.long),
            "label map",
        ),
        (
            torch.zeros(1, 1, 8, 8, dtype=torch.long),
            torch.zeros(1, 1, 8, 9, dtype=torch.long),
            "shapes differ",
        ),
        (torch.full((1, 1, 8, 8), 5), torch.zeros(1, 1, 8, 8, dtype=torch.long), "labels in"),
        (
            torch.zeros(8, 8, dtype=torch.long),
            torch.zeros(8, 8, dtype=torch.long),
            "2 or 3 spatial",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(prediction, target, message):
    with pytest.raises(ValueError, match=message):
        dice_score(prediction, target, 2)


def test_bad_spacing_raises():
    labels = _square_labels()
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(labels, labels, 2, spacing=[1.0, 1.0, 1.0])


def test_segmentation_scores_average_over_samples_skipping_absent_classes():
    scores = SegmentationScores(["background", "a", "b"])
    perfect = _square_labels()
    perfect[0, 0, 20:28, 20:28] = 2
    half = perfect.clone()
    half[0, 0, 20:28, 20:28] = 0  # class b missed entirely
    half[0, 0, 0:4, 20:28] = 2
    scores.update(perfect, perfect)
    scores.update(half, perfect, torch.ones(1, 2))
    target_only_a = _square_labels()
    scores.update(target_only_a, target_only_a)  # class b absent: does not count
    values = scores.compute()
    assert values["dice/a"].item() == pytest.approx(1.0)
    assert values["dice/b"].item() == pytest.approx(0.5)
    assert values["dice/mean"].item() == pytest.approx(0.75)
    assert values["hd95/a"].item() == 0.0
    assert scores.per_sample()["dice"].shape == (3, 2)
