"""Data layer: one TorchIO-subject ``LightningDataModule`` for DRDM, segmentation, registration.

Sources (:mod:`drdm.data.sources`, :mod:`drdm.data.embedded`) find and check files; preprocessing
(:mod:`drdm.data.preprocessing`) is a TorchIO pipeline built from config; 2D mode cuts volumes into
slices (:mod:`drdm.data.slicing`); :class:`SubjectDataModule` splits by subject group, selects the
few-shot labelled set and yields batches in the model layout (:mod:`drdm.data.batch`).
"""

from drdm.data.datamodule import TASKS, SubjectDataModule
from drdm.data.embedded import ICBM152Source
from drdm.data.io import load_nifti, save_nifti
from drdm.data.preprocessing import PreprocessingConfig
from drdm.data.sources import (
    ACDCSource,
    Learn2RegSource,
    NiftiFolderSource,
    Source,
    SourceData,
)

__all__ = [
    "TASKS",
    "ACDCSource",
    "ICBM152Source",
    "Learn2RegSource",
    "NiftiFolderSource",
    "PreprocessingConfig",
    "Source",
    "SourceData",
    "SubjectDataModule",
    "load_nifti",
    "save_nifti",
]
