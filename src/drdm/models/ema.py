"""EMA of a LightningModule's weights through Lightning's ``WeightAveraging`` callback.

The callback updates its ``AveragedModel`` once per optimiser step (so accumulated gradients
count once), swaps the averaged weights in for validation, saves them as the checkpoint's
``state_dict`` (the trained weights under ``current_model_state``) and leaves them in the module
when training ends. :class:`WarmedUpEMA` only adds the decay warm-up.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging


def warmed_up_ema(decay: float):
    """EMA update whose decay grows as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.

    A fixed decay of 0.999 averages the first ~1000 steps' weights in, so for the first few
    thousand steps the EMA network lags far behind the trained one (measured with
    experiments/benchmarks/learning.py); the warm-up makes it follow early and average late.
    """

    def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor):
        n = float(updates)
        weight = min(decay, (1.0 + n) / (10.0 + n))
        return averaged.lerp(current, 1.0 - weight)

    return average


def check_decay(decay: float) -> float:
    """``decay`` itself, or a ``ValueError`` when it is outside ``(0, 1)``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or null, got {decay}")
    return decay


class WarmedUpEMA(WeightAveraging):
    """``WeightAveraging`` with the warmed-up EMA (:func:`warmed_up_ema`), every optimiser step.

    Args:
        decay: the EMA decay once warmed up, in ``(0, 1)``.
        device: where the averaged copy lives (``None``: the module's device).
    """

    def __init__(self, decay: float = 0.999, device=None) -> None:
        check_decay(decay)
        super().__init__(device=device, use_buffers=True, avg_fn=warmed_up_ema(decay))
        self.decay = float(decay)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None

    @property
    def averaged_module(self) -> torch.nn.Module | None:
        """The averaged copy of the LightningModule (``None`` before fitting starts)."""
        return None if self._average_model is None else self._average_model.module


def averaged_net(trainer, module) -> torch.nn.Module:
    """The module's ``net`` as the EMA sees it now (mid-training), else the module's own."""
    for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
        if isinstance(callback, WarmedUpEMA) and callback.averaged_module is not None:
            return callback.averaged_module.net
    return module.net
