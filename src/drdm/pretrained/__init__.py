"""DRDM checkpoints that ship with the package.

``drdm_icbm152_2d64.ckpt``: a RecResACNet DRDM (channels [10, 20, 40], 2 recursions, T = 80)
for the embedded default data (2D 64 x 64 axial slices of the ICBM152 template at 3 mm, 0..1
intensities), trained from scratch on a CPU with ``conf/train.yaml``'s recipe on the training
slabs of the default split (the few-shot and registration test and validation slabs never seen).
Its training command and learning curve: ``experiments/default_model/README.md``.

It recommends generation from ``t0 = 24`` (+2 every second sample) with the recovery chain
started at ``t0 - 1`` (``generation_defaults`` in the file; ``experiments/default_model`` has the
measurements behind it: from ``T - 1``, or from larger ``t0``, its fields fold more than 1 %).

Everything that takes a DRDM checkpoint (``src/augment.py ckpt_path=``, the ``drdm``
augmentation's ``drdm_checkpoint=``, the registration's DRDM field source, ``DRDM.load``) reads
the word ``default`` as this file (:func:`drdm.checkpoints.resolve_checkpoint`); a retrained
model is written with :func:`drdm.checkpoints.export_checkpoint`.
"""

from pathlib import Path

DEFAULT_NAME = "default"
DEFAULT_MODEL = Path(__file__).resolve().parent / "drdm_icbm152_2d64.ckpt"
