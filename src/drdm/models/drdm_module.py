"""DRDMModule: train a recovery network to undo random deformations (method §2-§4).

One training step, per batch ``{"image": [B, 1, *S], ...}`` (see ``drdm.data``):

1. ``t ~ U{0..T-1}`` per sample and the random fields are drawn **on the training device** from a
   ``torch.Generator`` seeded by (seed, rank, epoch, batch index): reproducible, different on
   every DDP rank, no CPU bottleneck.
2. ``diffused, target = deformation(S, t)``; ``deformed = warp(jitter(image), diffused)``.
3. ``prediction = net(deformed, t)``; ``recovered = warp(prediction, target, padding="border")``.
4. ``DRDMLoss`` (relative squared error + direction + regulariser); every term is logged.

Parts are given as configs (``{"_target_": ...}``) so the checkpoint's hyper-parameters rebuild
the model on their own (``DRDMModule.load_from_checkpoint(path)``); ready-made modules work too.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from drdm.checkpoints import initialise_from, resolve_checkpoint, upgrade_ema_layout
from drdm.deform import folding_ratio, jacobian_determinant
from drdm.deform.spatial import warp
from drdm.generation.chain import minmax_normalise, recover, start_steps
from drdm.losses import DRDMLoss
from drdm.metrics.mean import WeightedMean
from drdm.metrics.recovery import RecoveryError
from drdm.models.ema import WarmedUpEMA, check_decay
from drdm.models.optim import ADAM, check_interval, configure
from drdm.utils.figures import log_image, recovery_figure
from drdm.utils.instantiate import build, to_plain
from drdm.utils.seeds import mix_seed

log = logging.getLogger(__name__)


def _timesteps_of(deformation: torch.nn.Module, net: torch.nn.Module) -> int:
    for owner in (deformation, net):
        value = getattr(owner, "timesteps", None)
        if value is not None:
            return int(value)
    raise ValueError(
        "neither the forward process (deformation) nor the net has a 'timesteps' attribute"
    )


def _check_parts(net: torch.nn.Module, deformation: torch.nn.Module, ndims: int, steps: int):
    """The net, the forward process and the data must agree on ndims and T (a silent mismatch trains
    on garbage)."""
    for name, part in (("net", net), ("deformation", deformation)):
        part_ndims = getattr(part, "ndims", ndims)
        if part_ndims != ndims:
            raise ValueError(f"{name}.ndims={part_ndims} but the model has ndims={ndims}")
        part_steps = getattr(part, "timesteps", steps)
        if part_steps != steps:
            raise ValueError(
                f"{name}.timesteps={part_steps} but the forward process (deformation) has T={steps}"
            )


# validation figures averaged over the set (``val/<name>``), weighted by batch size
VALIDATION_MEANS = ("loss", "rse", "direction", "folding_ratio", "mse_recovered", "mse_deformed")


class DRDMModule(L.LightningModule):
    """Lightning training logic for a deformation-recovery network.

    Args:
        net: recovery network (config or module): ``net(image [B,1,*S], t [B]) -> [B,ndims,*S]``.
        deformation: ``RandomDeformation`` (config or module):
            ``deformation(S, t, generator) -> (diffused, target)``, voxels.
        optimizer: partial optimizer config (``_partial_: true``), called with the parameters.
        scheduler: optional partial LR-scheduler config, called with the optimizer; ``None`` = off.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        loss: ``DRDMLoss`` keyword arguments (weights, dead zone, eps).
        ndims: 2 or 3; image_size: the model's input size (for checks and generation).
        jitter_gain, jitter_bias: std of the per-sample intensity gain ``N(1, g)`` and bias
            ``N(0, b)`` applied before deforming (0 disables).
        ema_decay: EMA of the weights (:class:`drdm.models.ema.WarmedUpEMA`, a Lightning
            ``WeightAveraging`` callback the module adds to its trainer): validation runs on the
            averaged weights and checkpoints store them; ``None`` = off.
        seed: base seed of the on-device generator.
        warp_mode: image interpolation when deforming (``bilinear``; ``bicubic`` is 2D only).
        figure_every_n_epochs: validation figure period (0 disables); figure_dir: where PNGs go
            (``None``: the trainer's ``default_root_dir/figures``).
        figure_t0: diffusion step of the figure's generation example; figure_start_step: where
            its recovery chain starts (``"T"``, ``"t0"`` or an int).
    """

    def __init__(
        self,
        net: Any,
        deformation: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        loss: Mapping | None = None,
        ndims: int = 2,
        image_size: list[int] | tuple[int, ...] = (64, 64),
        jitter_gain: float = 0.1,
        jitter_bias: float = 0.1,
        ema_decay: float | None = None,
        seed: int = 0,
        warp_mode: str = "bilinear",
        figure_every_n_epochs: int = 1,
        figure_dir: str | None = None,
        figure_t0: int | None = None,
        figure_start_step: str | int = "T",
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        image_size = tuple(int(n) for n in to_plain(image_size))
        if len(image_size) != ndims:
            raise ValueError(f"image_size {image_size} must have ndims={ndims} entries")
        check_interval(scheduler_interval)
        if optimizer is None:
            optimizer = dict(ADAM, lr=1e-4)
        hparams = {
            "net": to_plain(net),
            "deformation": to_plain(deformation),
            "optimizer": to_plain(optimizer),
            "scheduler": to_plain(scheduler),
            "scheduler_interval": scheduler_interval,
            "loss": to_plain(loss) or {},
            "ndims": ndims,
            "image_size": list(image_size),
            "jitter_gain": jitter_gain,
            "jitter_bias": jitter_bias,
            "ema_decay": ema_decay,
            "seed": seed,
            "warp_mode": warp_mode,
            "figure_every_n_epochs": figure_every_n_epochs,
            "figure_dir": figure_dir,
            "figure_t0": figure_t0,
            "figure_start_step": figure_start_step,
            "init_weights": init_weights,
        }
        # modules passed directly are not stored (they cannot be rebuilt from a dict)
        self.save_hyperparameters(
            {k: v for k, v in hparams.items() if not isinstance(v, torch.nn.Module)}, logger=False
        )
        self.net = build(hparams["net"])
        self.deformation = build(hparams["deformation"])
        self.loss = DRDMLoss(**hparams["loss"])
        self.timesteps = _timesteps_of(self.deformation, self.net)
        _check_parts(self.net, self.deformation, ndims, self.timesteps)
        self.val_recovery_error = RecoveryError()
        self.val_means = torch.nn.ModuleDict({name: WeightedMean() for name in VALIDATION_MEANS})
        self._weights_restored = False  # init_weights applied, or weights from a checkpoint
        self._figure_source: torch.Tensor | None = None  # validation image of the next figure
        self.generation_defaults: dict = {}
        if ema_decay is not None:
            check_decay(ema_decay)

    # ------------------------------------------------------------------ helpers
    @property
    def inference_net(self) -> torch.nn.Module:
        """The network validation and generation use: ``net``. Under EMA it holds the averaged
        weights whenever they are used (the callback swaps them in for validation, checkpoints
        store them, and they stay in the module after fitting)."""
        return self.net

    def _generator(self, *keys: int) -> torch.Generator:
        """A generator on the batch's device seeded from (seed, rank, *keys)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mix_seed(int(self.hparams.seed), self.global_rank, *keys))
        return generator

    def _check_batch(self, batch: Mapping) -> torch.Tensor:
        if "image" not in batch:
            raise ValueError(f"batch must contain 'image', got keys {sorted(batch)}")
        image = batch["image"]
        expected = (1, *self.hparams.image_size)
        if image.ndim != 2 + self.hparams.ndims or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"batch['image'] must be [B, {', '.join(map(str, expected))}], "
                f"got {tuple(image.shape)}"
            )
        return image.float()

    def _jitter(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = (image.shape[0],) + (1,) * (image.ndim - 1)
        gain = 1.0 + self.hparams.jitter_gain * torch.randn(
            batch, generator=generator, device=image.device
        )
        bias = self.hparams.jitter_bias * torch.randn(
            batch, generator=generator, device=image.device
        )
        return image * gain + bias

    def _forward_process(self, image: torch.Tensor, generator: torch.Generator):
        t = torch.randint(
            0, self.timesteps, (image.shape[0],), generator=generator, device=image.device
        )
        diffused, target = self.deformation(tuple(image.shape[2:]), t, generator=generator)
        deformed = warp(image, diffused, mode=self.hparams.warp_mode)
        return t, diffused, target, deformed

    def _step(self, net: torch.nn.Module, image: torch.Tensor, generator: torch.Generator):
        t, diffused, target, deformed = self._forward_process(image, generator)
        prediction = net(deformed, t)
        recovered = warp(prediction, target, padding="border")
        terms = self.loss(prediction, recovered, target)
        return terms, {
            "t": t,
            "diffused": diffused,
            "target": target,
            "deformed": deformed,
            "prediction": prediction,
            "recovered": recovered,
        }

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        # here, not in __init__, and once: load_from_checkpoint must not need the file (it marks
        # the weights as restored), and Lightning restores a resumed run's weights after setup
        path = self.hparams.get("init_weights")
        if path and not self._weights_restored:
            # the EMA copies these weights on its first update (AveragedModel does)
            initialise_from(self.net, resolve_checkpoint(path))
            log.info("recovery network initialised from %s", path)
        self._weights_restored = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._weights_restored = True
        upgrade_ema_layout(checkpoint)
        # generation settings a shipped checkpoint recommends (drdm.checkpoints.export_checkpoint)
        self.generation_defaults = dict(checkpoint.get("generation_defaults") or {})

    def forward(self, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Recovery displacement ``[B, ndims, *S]`` (voxels) of ``image`` at steps ``t``."""
        return self.inference_net(image, t)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        image = self._check_batch(batch)
        generator = self._generator(self.current_epoch, batch_idx)
        image = self._jitter(image, generator)
        terms, _ = self._step(self.net, image, generator)
        batch_size = image.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        for name in ("rse", "direction", "smoothness", "folding"):
            self.log(f"train/{name}", terms[name], batch_size=batch_size)
        return terms["loss"]

    def configure_callbacks(self) -> list:
        if self.hparams.ema_decay is None:
            return []
        return [WarmedUpEMA(self.hparams.ema_decay)]

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        # deformation.metrics arrive with the deformation core; imported here on purpose
        image = self._check_batch(batch)
        # fixed per batch index: every validation sees the same t and fields
        generator = self._generator(batch_idx, -1)
        terms, parts = self._step(self.inference_net, image, generator)
        recovered_image = warp(parts["deformed"], parts["prediction"], mode=self.hparams.warp_mode)
        batch_size = image.shape[0]
        metrics = {
            "val/loss": terms["loss"],
            "val/rse": terms["rse"],
            "val/direction": terms["direction"],
            "val/folding_ratio": folding_ratio(parts["prediction"]).float().mean(),
            "val/mse_recovered": (recovered_image - image).square().mean(),
            "val/mse_deformed": (parts["deformed"] - image).square().mean(),
        }
        # torchmetrics objects: weighted sums reduced across ranks, exact under DDP
        for name, value in metrics.items():
            mean = self.val_means[name.removeprefix("val/")]
            mean.update(value.detach(), weight=batch_size)
            self.log(name, mean, batch_size=batch_size)
        # the set's sums are reduced across ranks before the ratio
        self.val_recovery_error.update(parts["recovered"], parts["target"])
        self.log("val/recovery_error", self.val_recovery_error, batch_size=batch_size)
        if batch_idx == 0 and self._figure_due():
            self._figure_source = image[:1]

    def _figure_due(self) -> bool:
        period = int(self.hparams.figure_every_n_epochs)
        return period > 0 and self.current_epoch % period == 0 and not self.trainer.sanity_checking

    def on_validation_epoch_end(self) -> None:
        # drawn after the whole validation set, so the figure's title carries this epoch's error
        if not self._figure_due():
            return
        error = float(self.val_recovery_error.compute())  # every rank: it reduces across them
        # one figure per run under DDP (the inference net is unwrapped: no collectives)
        if self.trainer.is_global_zero and self._figure_source is not None:
            self._log_figure(self._figure_source, error)
        self._figure_source = None

    def _log_figure(self, image: torch.Tensor, recovery_error: float | None = None) -> None:
        """Generate one sample from ``image`` ``[1, 1, *S]``, save a PNG, hand it to the logger;
        the title gives ``recovery_error`` (the validation set's, 1 = nothing recovered)."""
        t0_value = self.hparams.figure_t0
        if t0_value is None:
            t0_value = int(0.6 * self.timesteps)
        t0 = torch.full((1,), min(int(t0_value), self.timesteps - 1), device=image.device)
        generator = self._generator(-2)
        diffused = self.deformation.diffused(tuple(image.shape[2:]), t0, generator=generator)
        network_image = minmax_normalise(image)
        first = start_steps(t0, self.timesteps, self.hparams.figure_start_step)
        displacement = recover(self.inference_net, network_image, diffused, first)
        original = image[0]
        diffused_image = warp(image, diffused, mode=self.hparams.warp_mode)[0]
        recovered_image = warp(image, displacement, mode=self.hparams.warp_mode)[0]
        det = jacobian_determinant(displacement)[0]
        root = self.hparams.figure_dir or Path(self.trainer.default_root_dir) / "figures"
        path = Path(root) / f"epoch{self.current_epoch:04d}_step{self.global_step:07d}.png"
        recovery_figure(
            original,
            diffused_image,
            recovered_image,
            displacement[0],
            det,
            path,
            title=f"epoch {self.current_epoch}, t0 = {int(t0)}"
            + ("" if recovery_error is None else f", val/recovery_error {recovery_error:.3f}"),
        )
        log_image(self.loggers, "val/figure", path, self.global_step)

    def configure_optimizers(self) -> Any:
        # the EMA copy is not optimised
        hparams = self.hparams
        return configure(
            self.net.parameters(), hparams.optimizer, hparams.scheduler, hparams.scheduler_interval
        )

    def inference_copy(self) -> torch.nn.Module:
        """A detached copy of the inference network in eval mode (for generation)."""
        return copy.deepcopy(self.inference_net).eval()
