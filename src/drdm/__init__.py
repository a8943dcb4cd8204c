"""drdm: Deformation-Recovery Diffusion Models for medical images.

Subpackages, lowest layer first (none imports one above it):
    drdm.deform        pure-torch deformation core (warp, compose, integrate, random fields)
    drdm.losses        training losses (DRDM objective, soft Dice, local NCC), pure torch
    drdm.nets          recovery networks (RecResACNet, a wider U-Net) and seg / reg U-Nets
    drdm.data          one TorchIO-subject LightningDataModule for every task
    drdm.generation    DRDM.load(...).generate(...): recovery chains, slice mode, NIfTI outputs
    drdm.augmentation  batch transforms for few-shot segmentation (DRDM on the fly, TorchIO)
    drdm.synthesis     field sources (one interface, one bank) and synthetic registration pairs
    drdm.models        the LightningModules, their optimiser configs and the EMA callback
    drdm.training      train(): everything src/train.py does, importable for tests and sweeps
"""

__version__ = "0.1.0"
