"""One augmentation strategy = TorchIO transforms on the CPU + batch transforms on the device.

:class:`AugmentationStrategy` is what ``conf/augmentation/*.yaml`` builds and what
``SegmentationModule`` calls: ``cpu(batch)`` from ``on_before_batch_transfer`` (before the batch
moves to the accelerator) and ``device(batch)`` from ``on_after_batch_transfer`` (after it), both
for training batches only. Combinations (e.g. ``bigaug_drdm``) set both parts; the device part
then deforms the already TorchIO-augmented real samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from drdm.augmentation.torchio_batch import TorchIOBatchAugmentation


class AugmentationStrategy:
    """Args:
    name: label of the strategy (used in logs and result tables).
    torchio: TorchIO transforms (mapping name -> transform, list, or one transform) applied per
        sample on the CPU; ``None``: none.
    batch: transforms ``batch -> batch`` applied in order on the training device (the DRDM
        transform, the offline pool); a mapping name -> transform or a list; ``None``: none.
    """

    def __init__(
        self,
        name: str = "none",
        torchio=None,
        batch: Mapping[str, Callable] | Sequence[Callable] | None = None,
    ) -> None:
        self.name = str(name)
        self.torchio = TorchIOBatchAugmentation(torchio) if torchio else None
        if batch is None:
            batch = []
        elif isinstance(batch, Mapping):
            batch = [t for t in batch.values() if t is not None]
        for transform in batch:
            if not callable(transform):
                raise ValueError(
                    f"augmentation {self.name!r}: batch transforms must be callable, "
                    f"got {type(transform).__name__}"
                )
        self.batch_transforms = list(batch)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, torchio={self.torchio!r}, "
            f"batch={self.batch_transforms!r})"
        )

    def cpu(self, batch: dict) -> dict:
        """TorchIO part, per sample, before the batch moves to the device."""
        return self.torchio(batch) if self.torchio is not None else batch

    def device(self, batch: dict) -> dict:
        """Batch transforms (DRDM, offline pool) on the training device."""
        for transform in self.batch_transforms:
            batch = transform(batch)
        return batch
