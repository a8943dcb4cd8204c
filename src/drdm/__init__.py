"""drdm: Deformation-Recovery Diffusion Models for medical images.

Subpackages:
    drdm.deform  pure-torch deformation core (warp, compose, integrate, random fields, metrics)
    drdm.data    one TorchIO-subject LightningDataModule for every task
    drdm.nets    recovery networks (RecResACNet and a wider U-Net)
"""

__version__ = "0.1.0"
