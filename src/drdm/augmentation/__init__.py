"""Augmentation strategies for segmentation training (TorchIO baselines and DRDM).

* :class:`AugmentationStrategy` — what ``conf/augmentation/*.yaml`` builds: TorchIO transforms
  on the CPU plus batch transforms on the training device.
* :class:`TorchIOBatchAugmentation` — TorchIO per sample on a collated batch.
* :class:`DRDMBatchAugmentation` with a field source of :mod:`drdm.field_sources.bank`
  (``DRDMFieldSource``: a trained DRDM; ``ForwardDiffusionFieldSource``: the forward process
  only) — synthetic image+label pairs made on the training device with one field per pair.
* :class:`OfflineSyntheticPool` — pre-generated pairs from ``src/augment.py`` output folders.
"""

from drdm.augmentation.drdm_batch import DRDMBatchAugmentation
from drdm.augmentation.offline import OfflineSyntheticPool
from drdm.augmentation.strategy import AugmentationStrategy
from drdm.augmentation.torchio_batch import TorchIOBatchAugmentation

__all__ = [
    "AugmentationStrategy",
    "DRDMBatchAugmentation",
    "OfflineSyntheticPool",
    "TorchIOBatchAugmentation",
]
