"""Generation (method §5): DRDM samples with the image, label and field that link them.

* :mod:`drdm.generation.chain` -- the recovery chain (full and few-step), pure torch;
* :mod:`drdm.generation.sampler` -- :class:`DRDM`: a trained network and its schedule, loaded
  from a Lightning ``.ckpt`` or the authors' ``.pth``, generating batches of samples;
* :mod:`drdm.generation.slices` -- a 2D model on a 3D volume, slice by slice;
* :mod:`drdm.apps.augment` -- NIfTI inputs to NIfTI samples, labels, ITK fields and a
  manifest (the body of ``src/augment.py``).

Layers: this package uses ``drdm.deform``, ``drdm.nets`` and ``drdm.data.io``; Lightning
modules use it (never the other way round).
"""

from drdm.generation.chain import recover, step_plan
from drdm.generation.sampler import (
    DRDM,
    SHIPPED_DEFAULTS,
    Generated,
    generation_settings,
    mix_seed,
    t0_schedule,
)

__all__ = [
    "DRDM",
    "SHIPPED_DEFAULTS",
    "Generated",
    "generation_settings",
    "mix_seed",
    "recover",
    "step_plan",
    "t0_schedule",
]
