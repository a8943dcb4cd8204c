"""Optimisers and LR schedulers from partial configs: the one pattern every LightningModule uses.

A module stores ``optimizer`` (``_partial_: true``, called with the parameters) and ``scheduler``
(``_partial_: true``, called with the optimiser, or ``None``) as plain dicts in its
hyper-parameters, and :func:`configure` turns them into what ``configure_optimizers`` returns.
So every learning rate lives at ``model.optimizer.lr``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from drdm.utils.instantiate import build

SCHEDULER_INTERVALS = ("epoch", "step")
# the modules' default optimisers, as partial configs
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True}


def check_interval(interval: str) -> str:
    if interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {interval!r}")
    return interval


def configure(
    parameters: Iterable[torch.nn.Parameter],
    optimizer: dict,
    scheduler: dict | None = None,
    interval: str = "epoch",
) -> Any:
    """The optimiser (and scheduler, stepped every ``interval``) for ``configure_optimizers``."""
    if not optimizer or "_target_" not in optimizer:
        raise ValueError(
            f"model.optimizer must be a partial config with _target_ (e.g. torch.optim.Adam "
            f"with _partial_: true), got {optimizer!r}"
        )
    built = build(optimizer)(parameters)
    if scheduler is None:
        return built
    return {
        "optimizer": built,
        "lr_scheduler": {
            "scheduler": build(scheduler)(built),
            "interval": check_interval(interval),
        },
    }
