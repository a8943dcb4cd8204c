"""Faults injected into real processes: a callback that SIGKILLs its own training process."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process when training is about to run optimiser step ``step``.

    SIGKILL cannot be caught: no ``finally``, no Lightning teardown, no checkpoint on exit, exactly
    as when a scheduler or the OOM killer ends a job. Checkpoints written before ``step`` remain.
    """

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
