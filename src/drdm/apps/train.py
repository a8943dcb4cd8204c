"""The body of ``src/train.py``: build everything from a composed config, fit, optionally test.

Kept importable so tests compose configs with ``hydra.compose`` and call :func:`train` exactly
as the script does. :func:`register_resolvers` registers the ``drdm.effective_batch_size``
resolver that ``conf/hardware`` uses; call it before composing a config (the scripts do).

Scale-out (``conf/hardware``): the effective batch size is ``data.batch_size x processes x
trainer.accumulate_grad_batches``; ``hardware.lr_scaling`` (``none`` | ``linear`` | ``sqrt``)
scales the configured learning rate by the ratio of that batch to ``hardware.base_batch_size``.
Under DDP every rank re-seeds its global random state from (seed, rank) when fitting starts
(:class:`RankSeed`), so random augmentations differ across ranks while the initial weights stay
identical; every rank re-seeds again from (seed, rank, epoch) at each epoch start, which makes
a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from drdm.checkpoints import read_lightning_checkpoint
from drdm.data.shuffle import GLOBAL_STREAM
from drdm.utils.instantiate import build
from drdm.utils.seeds import mix_seed

log = logging.getLogger(__name__)

LR_SCALING_RULES = ("none", "linear", "sqrt")
# where every model config keeps its learning rate (drdm.models.optim)
LR_KEY = "optimizer.lr"
_RANK_SEED_MIX = 1_000_003  # a prime: mixes seed and rank into one seed


def count_devices(devices: Any) -> int:
    """Processes per node that Lightning starts for a ``devices`` setting.

    ``4`` -> 4; ``[0, 2]`` or ``"0,2"`` -> 2; ``-1`` / ``"auto"`` -> the visible CUDA GPUs
    (1 without).

    Raises:
        ValueError: anything else (0, other negatives, text that is not a device list).
    """
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            devices = -1
        elif "," in text:
            return len([part for part in text.split(",") if part.strip()])
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            raise ValueError(f"hardware.devices must be an int, a list or 'auto', got {devices!r}")
    if devices == -1:
        return max(torch.cuda.device_count(), 1)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"hardware.devices must be >= 1, -1 or 'auto', got {devices!r}")
    return devices


def effective_batch_size(batch_size: int, devices: Any, num_nodes: int, accumulate: int) -> int:
    """Samples per optimiser step: ``batch_size x devices x num_nodes x accumulate``."""
    for name, value in (("batch_size", batch_size), ("num_nodes", num_nodes)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if int(accumulate) < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    return int(batch_size) * count_devices(devices) * int(num_nodes) * int(accumulate)


def lr_scale_factor(rule: str, effective: int, base: int) -> float:
    """LR multiplier for ``effective`` samples per step when the LR was tuned at ``base`` samples.

    ``none`` -> 1, ``linear`` -> effective / base, ``sqrt`` -> sqrt(effective / base).
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"hardware.lr_scaling must be one of {LR_SCALING_RULES}, got {rule!r}")
    if base < 1 or effective < 1:
        raise ValueError(f"batch sizes must be >= 1, got effective={effective}, base={base}")
    ratio = effective / base
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def register_resolvers() -> None:
    """Register drdm's OmegaConf resolvers (``drdm.effective_batch_size``); idempotent."""
    if not OmegaConf.has_resolver("drdm.effective_batch_size"):
        OmegaConf.register_new_resolver("drdm.effective_batch_size", effective_batch_size)


def scale_batch_and_lr(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """Apply ``hardware.lr_scaling`` to the model's learning rate in ``cfg`` (in place).

    Args:
        cfg: the composed train config; ``cfg.model``'s LR is replaced by the scaled one and
            ``cfg.hardware`` gets the resolved ``effective_batch_size`` and ``lr``.
        world_size: processes over all nodes, as the trainer sees them.

    Returns:
        ``{"batch_size", "world_size", "accumulate_grad_batches", "effective_batch_size",
        "base_batch_size", "lr_scaling", "lr_factor", "base_lr", "lr"}`` (``lr`` keys None when
        the model has no LR key and the rule is ``none``).
    """
    hardware = cfg.get("hardware") or {}
    batch_size = int(cfg.data.batch_size)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    effective = effective_batch_size(batch_size, world_size, 1, accumulate)
    declared = hardware.get("effective_batch_size")
    if declared is not None and int(declared) != effective:
        log.warning(
            "hardware.effective_batch_size=%s but the trainer runs %d processes: using %d "
            "(set hardware.devices / hardware.num_nodes rather than trainer.devices)",
            declared,
            world_size,
            effective,
        )
    rule = str(hardware.get("lr_scaling") or "none")
    base = int(hardware.get("base_batch_size") or batch_size)
    factor = lr_scale_factor(rule, effective, base)
    base_lr = lr = None
    configured = OmegaConf.select(cfg.model, LR_KEY)
    if configured is None and rule != "none":
        raise ValueError(
            f"hardware.lr_scaling={rule} needs a learning rate at model.{LR_KEY}; "
            f"model <{cfg.model.get('_target_')}> has none"
        )
    if configured is not None:
        base_lr = float(configured)
        lr = base_lr * factor
        with open_dict(cfg):
            OmegaConf.update(cfg.model, LR_KEY, lr, merge=False)
    if "hardware" in cfg:
        with open_dict(cfg):
            cfg.hardware.effective_batch_size = effective
            cfg.hardware.lr = lr
    return {
        "batch_size": batch_size,
        "world_size": world_size,
        "accumulate_grad_batches": accumulate,
        "effective_batch_size": effective,
        "base_batch_size": base,
        "lr_scaling": rule,
        "lr_factor": factor,
        "base_lr": base_lr,
        "lr": lr,
    }


def rank_seed(seed: int, rank: int) -> int:
    """A seed for process ``rank`` of a run seeded with ``seed`` (rank 0 keeps ``seed``)."""
    return seed if rank == 0 else (seed * _RANK_SEED_MIX + rank) % (2**32)


def _seed_globals(value: int) -> None:
    random.seed(value)
    # the legacy global state is what numpy-based augmentations draw from
    np.random.seed(value % 2**32)  # noqa: NPY002
    torch.manual_seed(value)


class RankSeed(L.Callback):
    """Re-seed python, numpy and torch per rank when fitting starts and at every epoch start.

    Lightning re-seeds every rank with the same global seed while setting up DDP; on fit start
    this re-seeds with ``rank_seed(seed, rank)`` (after DDP has broadcast rank 0's weights), so
    each rank's random augmentations differ and stay reproducible per (seed, rank).

    At the start of epoch ``e`` every rank re-seeds from ``(rank_seed(seed, rank), e)``: what
    the training steps draw from the global state (augmentations) then depends on the epoch
    alone, not on how the process got there, so a run resumed from an epoch-end checkpoint
    draws what the uninterrupted run drew (the loader's order is seeded the same way,
    :mod:`drdm.data.shuffle`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            _seed_globals(rank_seed(self.seed, trainer.global_rank))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = rank_seed(self.seed, trainer.global_rank)
        _seed_globals(mix_seed(value, trainer.current_epoch, GLOBAL_STREAM))


def check_launch(trainer: L.Trainer) -> None:
    """Refuse script-relaunched DDP inside a Hydra multirun (each child would re-run the sweep).

    Raises:
        ValueError: ``strategy=ddp`` with several local processes in a local multirun.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        return  # SLURM (or torchrun) started every process: nothing is re-run
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.num_devices > 1 and type(launcher).__name__ == "_SubprocessScriptLauncher":
        raise ValueError(
            "strategy=ddp starts its processes by re-running the command line, which a Hydra "
            "multirun cannot do: sweep with hydra/launcher=slurm (SLURM starts the processes) "
            "or use hardware.strategy=ddp_spawn for local sweeps"
        )


def instantiate_group(config: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as ``callbacks`` or ``logger``."""
    if not config:
        return []
    if not isinstance(config, DictConfig):
        raise ValueError(f"expected a mapping of configs, got {type(config).__name__}")
    return [build(entry) for entry in config.values() if entry and "_target_" in entry]


# trainer settings Lightning needs as ints (it asserts, without naming the key, on other types)
_TRAINER_INTS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "accumulate_grad_batches",
    "num_sanity_val_steps",
)
_TRAINER_COUNTS_OR_FRACTIONS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "val_check_interval",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_config(cfg: DictConfig) -> None:
    """Refuse, before anything is built, values of the wrong type, naming the key.

    Raises:
        ValueError: ``seed`` / ``torch_threads`` not an int (or null), a ``trainer`` count that
            is not an int, a batch limit that is neither an int nor a float.
    """
    for key in ("seed", "torch_threads"):
        value = cfg.get(key)
        if value is not None and not _is_int(value):
            raise ValueError(f"{key} must be an integer or null, got {value!r}")
    trainer = cfg.get("trainer") or {}
    for key in _TRAINER_INTS:
        value = trainer.get(key)
        if value is not None and not _is_int(value):
            raise ValueError(f"trainer.{key} must be an integer or null, got {value!r}")
    for key in _TRAINER_COUNTS_OR_FRACTIONS:
        value = trainer.get(key)
        if value is not None and not (_is_int(value) or isinstance(value, float)):
            raise ValueError(f"trainer.{key} must be a count (int) or a fraction, got {value!r}")


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
    read_lightning_checkpoint(value)  # a clear error naming the file, before any work
    return str(value)


def optimized_metric(cfg: DictConfig, result: dict[str, Any]) -> float | None:
    """The value of ``cfg.optimized_metric`` for sweeps (None when unset).

    The best checkpoint's score when the checkpoint callback monitors that metric, else the last
    logged value.

    Raises:
        ValueError: the metric was never logged (names the metrics that were).
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    trainer = result["trainer"]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.monitor == name and checkpoint.best_model_score:
        return float(checkpoint.best_model_score)
    if name not in result["metrics"]:
        raise ValueError(
            f"optimized_metric={name!r} was not logged; logged: {sorted(result['metrics'])}"
        )
    return result["metrics"][name]


# the number a person reads first, per task: the first of these that was logged
HEADLINE_METRICS = (
    "val/recovery_error",
    "test/dice_mean",
    "val/dice_mean",
    "test/dice",
    "val/dice",
    "val/loss",
)


def _next_command(target: str, best: str, run: Path) -> str:
    if target.endswith("DRDMModule"):
        return (
            f"python src/augment.py ckpt_path={best} input=/path/to/image.nii.gz "
            f"output_dir={run / 'samples'} num_samples=8   (your NIfTI file or folder; labels "
            "beside it as X_gt.nii.gz are warped too)"
        )
    if target.endswith("RegistrationModule"):
        return f"python src/eval.py checkpoint={best}   (add the experiment=... you trained with)"
    return f"python src/train.py train=false test=true ckpt_path={best}   (your experiment=...)"


def summary_lines(cfg: DictConfig, result: dict[str, Any]) -> list[str]:
    """What a person reads when ``src/train.py`` ends: the headline metric (from its starting
    value where the run validated first), the checkpoints, the figures, how to watch the run and
    the next command to try."""
    trainer, run = result["trainer"], Path(result["output_dir"])
    metrics, start = result["metrics"], result.get("metrics_at_start") or {}
    lines = [
        f"Training finished: {trainer.current_epoch} epochs, {trainer.global_step} optimiser "
        f"steps -> {run}"
    ]
    name = next((key for key in HEADLINE_METRICS if key in metrics), None)
    if name is not None:
        value = f"{metrics[name]:.4f}"
        if name in start:
            value = f"{start[name]:.4f} at the start -> {value} at the end"
        note = "  (1 = nothing recovered, lower is better)" if "recovery_error" in name else ""
        lines.append(f"  {name}: {value}{note}")
    callback = trainer.checkpoint_callback
    best = result.get("best_checkpoint")
    folder = callback.dirpath if callback is not None else None
    last = Path(folder) / "last.ckpt" if folder else None
    if best:
        lines.append(f"  best checkpoint: {best}")
    if last is not None and last.is_file():
        lines.append(
            f"  last checkpoint: {last}   (resume: python src/train.py ckpt_path=last "
            f"hydra.run.dir={run})"
        )
    figures = cfg.model.get("figure_dir")
    if figures and Path(figures).is_dir():
        newest = sorted(Path(figures).glob("*.png"))
        if newest:
            lines.append(f"  validation figures: {figures}   (newest: {newest[-1].name})")
    offline = sorted(run.glob("wandb/offline-run-*"))
    if offline:
        lines.append(f"  watch it: wandb sync {offline[-1]}   (offline run; needs a wandb login)")
    elif (run / "csv").is_dir():
        lines.append(f"  metrics: {run / 'csv'}")
    if best or (last is not None and last.is_file()):
        checkpoint = best or str(last)
        lines.append(f"  next: {_next_command(str(cfg.model.get('_target_')), checkpoint, run)}")
    return lines


def train(cfg: DictConfig) -> dict[str, Any]:
    """Seed, build data / trainer / model / callbacks / loggers from ``cfg``, fit (and test).

    The trainer is built before the model so the learning rate can follow the real number of
    processes (:func:`scale_batch_and_lr`).

    Returns:
        ``{"metrics": {name: float}, "metrics_at_start": {name: float} | None (with
        ``validate_first``), "best_checkpoint": str | None, "output_dir": str,
        "trainer": Trainer, "model": LightningModule, "scaling": dict}``.
    """
    check_run_config(cfg)
    resume = _resume_path(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    log.info("data <%s>", cfg.data.get("_target_"))
    datamodule: L.LightningDataModule = build(cfg.data)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("seed") is not None:
        callbacks.append(RankSeed(int(cfg.seed)))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launch(trainer)

    scaling = scale_batch_and_lr(cfg, trainer.num_devices * trainer.num_nodes)
    log.info(
        "rank %d/%d: effective batch size %d (batch %d x %d processes x accumulate %d); "
        "lr %s (configured %s, lr_scaling=%s against base batch %d)",
        trainer.global_rank,
        scaling["world_size"],
        scaling["effective_batch_size"],
        scaling["batch_size"],
        scaling["world_size"],
        scaling["accumulate_grad_batches"],
        scaling["lr"],
        scaling["base_lr"],
        scaling["lr_scaling"],
        scaling["base_batch_size"],
    )
    log.info("model <%s>", cfg.model.get("_target_"))
    model: L.LightningModule = build(cfg.model)

    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)

    metrics_at_start = None
    if cfg.get("validate_first", False):
        # the starting point's validation metrics, logged at step 0 (e.g. before fine-tuning)
        trainer.validate(model=model, datamodule=datamodule, ckpt_path=resume, verbose=False)
        metrics_at_start = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    if cfg.get("test", False):
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    for logger in loggers:
        # wandb keeps a process alive until told the run is over
        if type(logger).__name__ == "WandbLogger":
            import wandb  # only with a wandb logger: importing it costs about a second

            wandb.finish()
    return {
        "metrics": metrics,
        "metrics_at_start": metrics_at_start,
        "best_checkpoint": best or None,
        "output_dir": str(cfg.paths.output_dir),
        "trainer": trainer,
        "model": model,
        "scaling": scaling,
    }
