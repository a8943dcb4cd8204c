"""The body of ``src/train.py``: build everything from a composed config, fit, optionally test.

Kept importable so tests compose configs with ``hydra.compose`` and call :func:`train` exactly
as the script does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from drdm.utils.instantiate import build

log = logging.getLogger(__name__)


def instantiate_group(config: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as ``callbacks`` or ``logger``."""
    if not config:
        return []
    if not isinstance(config, DictConfig):
        raise ValueError(f"expected a mapping of configs, got {type(config).__name__}")
    return [build(entry) for entry in config.values() if entry and "_target_" in entry]


def _resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: a file, ``"last"`` (the run folder's ``checkpoints/last.ckpt``) or null."""
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if value == "last":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        log.warning("ckpt_path=last but %s does not exist: starting from scratch", last)
        return None
    if not Path(value).is_file():
        raise FileNotFoundError(f"ckpt_path points to no file: {value}")
    return str(value)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Seed, build data / model / callbacks / loggers / trainer from ``cfg``, fit (and test).

    Returns:
        ``{"metrics": {name: float}, "best_checkpoint": str | None, "output_dir": str,
        "trainer": Trainer, "model": LightningModule}``.
    """
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    log.info("data <%s>", cfg.data.get("_target_"))
    datamodule: L.LightningDataModule = build(cfg.data)
    log.info("model <%s>", cfg.model.get("_target_"))
    model: L.LightningModule = build(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)

    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=_resume_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    if cfg.get("test", False):
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    for logger in loggers:
        # wandb keeps a process alive until told the run is over
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
    return {
        "metrics": metrics,
        "best_checkpoint": best or None,
        "output_dir": str(cfg.paths.output_dir),
        "trainer": trainer,
        "model": model,
    }
