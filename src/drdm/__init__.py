"""drdm: Deformation-Recovery Diffusion Models for medical images.

Layers, lowest first; a module imports only from its own layer or below
(``tests/test_layers.py`` checks every arrow):
    drdm.deform, drdm.losses     pure-torch deformation core and training losses
    drdm.metrics                 segmentation, surface, registration and recovery metrics
    drdm.nets                    recovery networks (RecResACNet, a wider U-Net), seg / reg U-Nets
    drdm.checkpoints             every checkpoint kind (.pth, .ckpt, packaged) read and written
    drdm.data                    one TorchIO-subject LightningDataModule; NIfTI and ITK-field I/O
    drdm.generation              DRDM.load(...).generate(...): recovery chains, slice mode
    drdm.field_sources           the field-source interface shared by augmentation and registration
    drdm.augmentation            batch transforms for few-shot segmentation (DRDM, TorchIO)
    drdm.registration            synthetic and known-field registration pairs
    drdm.transforms              TorchIO / MONAI / batched DRDM transforms for other pipelines
    drdm.models                  the LightningModules, their optimiser configs, the EMA callback
    drdm.apps                    the bodies of src/train.py, src/augment.py and src/eval.py
"""

__version__ = "0.1.0"
