"""LightningModules: DRDM training (``DRDMModule``), segmentation and registration."""

from drdm.models.drdm_module import DRDMModule

__all__ = ["DRDMModule"]
