"""``KnownFieldDataModule``: registration data whose evaluation pairs have a known field.

A :class:`drdm.data.SubjectDataModule` (task ``registration``) whose pairs in
``known_field_splits`` (default: validation and test) are replaced by
:class:`~drdm.registration.known_field.KnownFieldTransform` pairs: the moving sample and its copy
warped by a seeded field from a family the training never sees. Training pairs stay real (e.g.
inter-subject slices), so ``+real`` and ``unsupervised`` modes never see the held-out field
family. Validation/test batches then carry ``"displacement"`` and the registration metrics
report the field error in mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from drdm.data import SubjectDataModule
from drdm.registration.known_field import KnownFieldTransform
from drdm.utils.instantiate import build


class KnownFieldDataModule(SubjectDataModule):
    """Args: those of :class:`~drdm.data.SubjectDataModule`, plus

    known_field_source: field source (``_target_`` config or object) for the evaluation pairs.
    known_field_seed: base seed of the per-pair fields.
    known_field_splits: splits whose pairs get a known field.
    """

    def __init__(
        self,
        *args: Any,
        known_field_source: Mapping | Any = None,
        known_field_seed: int = 0,
        known_field_splits: Sequence[str] = ("val", "test"),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.task != "registration":
            raise ValueError(f"KnownFieldDataModule needs data.task=registration, got {self.task}")
        if known_field_source is None:
            raise ValueError("KnownFieldDataModule needs data.known_field_source (a field source)")
        unknown = set(known_field_splits) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"data.known_field_splits has unknown splits {sorted(unknown)}")
        self.known_field = KnownFieldTransform(build(known_field_source), known_field_seed)
        self.known_field_splits = tuple(known_field_splits)

    def dataloader(self, split: str, shuffle: bool | None = None):
        loader = super().dataloader(split, shuffle)
        if split in self.known_field_splits:
            # the pair dataset calls its transform per item: set it before any worker starts
            loader.dataset.transform = self.known_field
        return loader
