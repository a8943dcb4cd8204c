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
the word ``default`` as this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from drdm.utils.atomic import atomic_write

DEFAULT_NAME = "default"
DEFAULT_MODEL = Path(__file__).resolve().parent / "drdm_icbm152_2d64.ckpt"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``"default"`` -> the packaged model; any other value -> ``Path(path)``.

    Raises:
        FileNotFoundError: ``"default"`` on an install without the packaged file.
    """
    if str(path) != DEFAULT_NAME:
        return Path(path)
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(
            f"the packaged default DRDM {DEFAULT_MODEL} is missing from this install; "
            "reinstall drdm or pass a checkpoint path"
        )
    return DEFAULT_MODEL


def export_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    use_ema: bool = True,
    generation_defaults: dict | None = None,
) -> Path:
    """Write a slim copy of a ``DRDMModule`` checkpoint for shipping or sharing.

    Keeps the hyper-parameters (the net and forward-process configs rebuild the model) and one set
    of network weights (the EMA copy when ``use_ema`` and the run kept one), stored as the
    module's ``net`` with EMA off; drops optimiser, scheduler and loop states.
    ``generation_defaults`` (:class:`drdm.generation.DRDM` arguments, e.g. ``t0_start``,
    ``start_step``) are stored for ``DRDM.load`` to use where its caller sets nothing. The
    result loads with ``DRDMModule.load_from_checkpoint`` and ``DRDM.load``; written atomically.
    """
    import lightning

    from drdm.nets.checkpoint import network_state, read_lightning_checkpoint

    checkpoint = read_lightning_checkpoint(source)
    weights = {"net." + k: v for k, v in network_state(source, checkpoint, use_ema).items()}
    hyper_parameters = dict(checkpoint["hyper_parameters"])
    # no EMA copy, no init file, no figures folder of the machine that trained it
    hyper_parameters.update(ema_decay=None, init_weights=None, figure_dir=None)
    slim = {
        "state_dict": weights,
        "hyper_parameters": hyper_parameters,
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version")
        or lightning.__version__,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "generation_defaults": dict(generation_defaults or {}),
    }
    return atomic_write(destination, lambda temporary: torch.save(slim, temporary))
