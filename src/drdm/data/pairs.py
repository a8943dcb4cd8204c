"""Registration pairs within one split, and the dataset that serves them.

Pair modes (``data.pairs.mode``):

- ``source``: the pairs the source lists (ACDC ``ED -> ES``, Learn2Reg ``dataset.json`` pairs);
- ``within``: every ordered pair of different volumes of the same group (same patient);
- ``across``: ordered pairs of samples from different groups (inter-subject registration).

In 2D mode a volume pair becomes the pairs of its slices with the same slice index (``source``,
``within``); ``across`` pairs any two slices of different groups. ``max_pairs`` keeps a random,
seeded subset. Pairs never cross splits.

Hook for synthetic pairs with a known field: ``PairDataset(transform=...)`` calls
``transform(pair)``
on every pair dict ``{"moving": sample, "fixed": sample}`` (samples as in :mod:`drdm.data.batch`,
un-batched) and may replace ``moving`` and add tensors such as ``"displacement"`` ``[ndims, *S]``;
:func:`drdm.data.batch.collate_pairs` stacks every extra tensor key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio

from drdm.data.batch import subject_to_sample

PAIR_MODES = ("source", "within", "across")


def _key(subject: tio.Subject) -> tuple[str, str, int | None]:
    """(volume id, group, slice index or None) of a 3D volume or a 2D slice subject."""
    volume_id = str(subject.get("volume_id", subject["id"]))
    return volume_id, str(subject["group"]), subject.get("slice_index")


def build_pairs(
    subjects: Sequence[tio.Subject],
    mode: str,
    source_pairs: Sequence[tuple[str, str]] = (),
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Index pairs ``(moving, fixed)`` into ``subjects`` (one split) for ``mode``."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs.mode must be one of {PAIR_MODES}, got {mode!r}")
    keys = [_key(subject) for subject in subjects]
    pairs: list[tuple[int, int]] = []
    if mode == "source":
        index = {(volume, slice_index): i for i, (volume, _, slice_index) in enumerate(keys)}
        for moving_volume, fixed_volume in source_pairs:
            for (volume, slice_index), i in index.items():
                j = index.get((fixed_volume, slice_index))
                if volume == moving_volume and j is not None:
                    pairs.append((i, j))
    else:
        for i, (volume_i, group_i, slice_i) in enumerate(keys):
            for j, (volume_j, group_j, slice_j) in enumerate(keys):
                if mode == "within" and group_i == group_j and volume_i != volume_j:
                    if slice_i == slice_j:
                        pairs.append((i, j))
                elif mode == "across" and group_i != group_j:
                    pairs.append((i, j))
    pairs.sort()
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), size=int(max_pairs), replace=False)
        pairs = [pairs[i] for i in sorted(chosen)]
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Pairs of preprocessed subjects as ``{"moving": sample, "fixed": sample}`` dicts.

    Args:
        subjects: the split's subjects (already preprocessed to the model size).
        pairs: ``(moving index, fixed index)`` into ``subjects``.
        ndims: 2 or 3 (sample layout).
        transform: optional hook ``pair -> pair`` (see module doc), e.g. a synthetic known field.
    """

    def __init__(
        self,
        subjects: Sequence[tio.Subject],
        pairs: Sequence[tuple[int, int]],
        ndims: int,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.subjects = list(subjects)
        self.pairs = list(pairs)
        self.ndims = ndims
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        moving, fixed = self.pairs[index]
        pair = {
            "moving": subject_to_sample(self.subjects[moving], self.ndims),
            "fixed": subject_to_sample(self.subjects[fixed], self.ndims),
        }
        return pair if self.transform is None else self.transform(pair)
