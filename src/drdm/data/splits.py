"""Subject-level splits and few-shot selection, deterministic by seed.

Splitting works on *groups* (a patient, a case, a template block): every volume and every slice of a
group lands in the same split, so no anatomy leaks between train, val and test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _check_known(ids: Iterable[str], known: set[str], key: str) -> list[str]:
    ids = [str(i) for i in ids]
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(
            f"split.{key} names unknown subjects {unknown[:10]}; known: {sorted(known)[:10]}..."
        )
    return ids


def split_groups(
    groups: Iterable[str],
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Assign groups to ``train`` / ``val`` / ``test``.

    Args:
        groups: group names (duplicates are merged).
        ratios: train/val/test proportions (normalised); used when no explicit id list is given.
            Counts are ``round(ratio * n)`` for val and test, the rest is train.
        seed: permutation seed; the same seed and groups give the same split.
        train_ids, val_ids, test_ids: explicit group lists. When ``val_ids`` or ``test_ids`` is
            given the ratios are ignored; a missing ``train_ids`` means "all the other groups",
            and with ``train_ids`` given the groups in no list are in no split (left out).

    Raises:
        ValueError: unknown or overlapping ids, or a split that leaves train, val or test empty.
    """
    unique = sorted({str(g) for g in groups})
    known = set(unique)
    if val_ids is not None or test_ids is not None or train_ids is not None:
        val = _check_known(val_ids or [], known, "val_ids")
        test = _check_known(test_ids or [], known, "test_ids")
        if train_ids is None:
            train = [g for g in unique if g not in set(val) | set(test)]
        else:
            train = _check_known(train_ids, known, "train_ids")
        overlap = (set(train) & set(val)) | (set(train) & set(test)) | (set(val) & set(test))
        if overlap:
            raise ValueError(f"split id lists overlap on {sorted(overlap)}")
        result = {"train": train, "val": val, "test": test}
    else:
        ratios = [float(r) for r in ratios]
        if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"split.ratios must be 3 non-negative numbers, got {ratios}")
        total = sum(ratios)
        order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
        n_val = int(round(ratios[1] / total * len(unique)))
        n_test = int(round(ratios[2] / total * len(unique)))
        result = {
            "val": sorted(order[:n_val]),
            "test": sorted(order[n_val : n_val + n_test]),
            "train": sorted(order[n_val + n_test :]),
        }
    for name in SPLITS:
        if not result[name]:
            raise ValueError(
                f"the split leaves '{name}' empty ({len(unique)} subjects/groups, "
                f"sizes { {k: len(v) for k, v in result.items()} }); "
                "adjust split.ratios or the id lists"
            )
    return result


def select_labelled(
    train_groups: Sequence[str],
    n_labelled: int | None,
    seed: int = 0,
    labelled_ids: Sequence[str] | None = None,
) -> list[str]:
    """Training groups that keep their labels in few-shot segmentation.

    ``labelled_ids`` (explicit) wins over ``n_labelled`` (random, deterministic by ``seed``);
    ``None`` for both keeps every training group labelled.
    """
    train_groups = sorted(train_groups)
    if labelled_ids is not None:
        return sorted(
            _check_known(labelled_ids, set(train_groups), "labelled_ids (training groups)")
        )
    if n_labelled is None:
        return list(train_groups)
    n_labelled = int(n_labelled)
    if n_labelled < 0 or n_labelled > len(train_groups):
        raise ValueError(
            f"n_labelled={n_labelled} but the training split has {len(train_groups)} labelled "
            "subjects/groups"
        )
    order = np.random.default_rng(seed + 1).permutation(len(train_groups))[:n_labelled]
    return sorted(train_groups[i] for i in order)
