"""Registration pairs with a known field (pure torch, no Lightning or Hydra).

* :func:`make_pair` / :class:`SyntheticPair` — ``fixed = warp(moving, field)``; the field is the
  registration target under drdm's pull-back convention (fields from :mod:`drdm.field_sources`);
* :class:`KnownFieldTransform` — held-out evaluation pairs with a known field from a family no
  training mode sees; ``drdm.registration.known_field_data.KnownFieldDataModule`` wires them into
  the data module (it imports Lightning, so it is not imported here).

The network is :class:`drdm.nets.registration_unet.RegistrationUNet`, the training logic
:class:`drdm.models.registration.RegistrationModule`, the metrics
:mod:`drdm.metrics.pairwise`.
"""

from drdm.registration.known_field import KnownFieldTransform
from drdm.registration.synthetic_pairs import SyntheticPair, make_pair

__all__ = ["KnownFieldTransform", "SyntheticPair", "make_pair"]
