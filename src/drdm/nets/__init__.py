"""Recovery networks of DRDM: ``net(image [B,C,*S], t [B]) -> displacement [B, ndims, *S]``.

Both networks output voxels (channel ``i`` along tensor axis ``i``), keep every sampling position
inside the image, refine recursively (``recursions`` passes composed with
:func:`drdm.deform.compose`) and expose ``net.timesteps``.

* :class:`RecResACNet` -- the authors' atrous residual U-Net; its parameter names match their 2D
  cardiac checkpoint, loaded with :func:`drdm.checkpoints.load_reference_checkpoint`.
* :class:`UNet` -- a wider alternative (GroupNorm, SiLU, FiLM step conditioning).

Hydra configs: ``conf/net/recresacnet.yaml``, ``conf/net/unet.yaml``.
"""

from drdm.nets.embedding import FrozenStepEmbedding, sinusoidal_table
from drdm.nets.recovery_net import RecoveryNet, clamp_to_image
from drdm.nets.recresacnet import AtrousResidualBlock, RecResACNet
from drdm.nets.unet import UNet

__all__ = [
    "AtrousResidualBlock",
    "FrozenStepEmbedding",
    "RecResACNet",
    "RecoveryNet",
    "UNet",
    "clamp_to_image",
    "sinusoidal_table",
]
