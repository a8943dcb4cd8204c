"""``manifest.csv``: what ``src/augment.py`` generated, one row per sample, read by the resume
logic and by the offline augmentation (:class:`drdm.augmentation.OfflineSyntheticPool`).

Columns: input stem, ``k``, ``t0``, seeds, folding / repaired ratio, displacement in mm and the
``image`` / ``label`` / ``field`` files relative to the output folder; rows sorted by (input, k).
"""

from __future__ import annotations

import csv
from pathlib import Path

from drdm.utils.atomic import write_csv_atomic

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = (
    "input",
    "k",
    "t0",
    "seed",
    "sample_seed",
    "folding_ratio",
    "repaired_ratio",
    "max_displacement_mm",
    "mean_displacement_mm",
    "image",
    "label",
    "field",
)


def write_manifest(path: Path, rows: dict[tuple[str, int], dict]) -> None:
    """Rewrite ``manifest.csv`` atomically, rows sorted by (input, k)."""
    write_csv_atomic(path, [rows[key] for key in sorted(rows)], MANIFEST_COLUMNS, "raise")


def read_manifest(path: Path) -> dict[tuple[str, int], dict]:
    """Rows of an existing ``manifest.csv`` keyed by (input stem, k), in (input, k) order;
    empty if absent."""
    if not path.is_file():
        return {}
    with open(path, newline="") as stream:
        rows = {(row["input"], int(row["k"])): row for row in csv.DictReader(stream)}
    return {key: rows[key] for key in sorted(rows)}
