"""RegistrationModule: a VoxelMorph-style network trained on real and/or synthetic pairs.

Training modes (``mode``):

* ``unsupervised`` — real pairs ``(moving, fixed)`` from the batch; loss = image dissimilarity of
  ``warp(moving, p)`` vs ``fixed`` (local NCC or MSE) + smoothness of ``p``.
* ``synthetic_bspline`` / ``synthetic_drdm`` — pairs made inside the step on the training device
  from single images: ``fixed = warp(image, f)`` with ``f`` from a multi-resolution random
  B-spline (MRBS) or a frozen DRDM. Since warp is a pull-back, the target of ``p`` is ``f``
  itself; loss = field error (mean squared endpoint error, voxels^2) + similarity + smoothness.
* ``synthetic_bspline+real`` / ``synthetic_drdm+real`` — the synthetic loss plus
  ``real_weight`` times the unsupervised loss on the batch's real pairs.

Validation and test evaluate real pairs with :func:`drdm.metrics.pairwise.pair_metrics`
(Dice / HD95 / ASD of warped labels, TRE, field error when the batch carries the true field,
folding ratio, SD log-Jacobian). ``test_step`` keeps one row per pair in ``test_rows`` and the
last predicted fields in ``test_outputs`` for :mod:`eval` to write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from torch import nn

from drdm.deform import warp
from drdm.losses import gradient_smoothness, local_ncc
from drdm.metrics.mean import WeightedMean
from drdm.metrics.pairwise import PAIR_METRICS, pair_metrics
from drdm.models.optim import ADAM, check_interval, configure
from drdm.registration.synthetic_pairs import make_pair
from drdm.utils.instantiate import build, to_plain

BASE_MODES = ("unsupervised", "synthetic_bspline", "synthetic_drdm")
SIMILARITIES = ("ncc", "mse")


def parse_mode(mode: str) -> tuple[str, bool]:
    """``"synthetic_drdm+real"`` -> ``("synthetic_drdm", True)``; validates the name."""
    base, _, suffix = str(mode).partition("+")
    if base not in BASE_MODES or suffix not in ("", "real") or (suffix and base == BASE_MODES[0]):
        valid = [*BASE_MODES, *(f"{m}+real" for m in BASE_MODES[1:])]
        raise ValueError(f"model.mode must be one of {valid}, got {mode!r}")
    return base, suffix == "real"


class RegistrationModule(L.LightningModule):
    """Args:
    net: ``net(moving, fixed) -> displacement [B, ndims, *S]`` (e.g. ``RegistrationUNet``),
        a module or its ``_target_`` config (stored in the checkpoint).
    mode: see module docstring.
    field_sources: ``{"synthetic_bspline": config, "synthetic_drdm": config}``: ``_target_``
        configs (or built objects) of field sources ``source(image) -> field``; only the one
        the mode needs is built, so an unused DRDM source needs no checkpoint.
    similarity: ``"ncc"`` (local, ``ncc_window`` voxels) or ``"mse"``.
    similarity_weight, smoothness_weight, field_weight: loss weights.
    real_weight: weight of the unsupervised real-pair loss in ``+real`` modes.
    optimizer: partial optimiser config (``_partial_: true``, :mod:`drdm.models.optim`);
        ``None``: Adam at 1e-4. scheduler: partial LR-scheduler config or ``None``;
        scheduler_interval: ``"epoch"`` or ``"step"``.
    num_classes: label classes incl. background for Dice/HD95/ASD (``None``: from the labels).
    """

    def __init__(
        self,
        net: nn.Module | Mapping,
        mode: str = "unsupervised",
        field_sources: Mapping[str, Any] | None = None,
        similarity: str = "ncc",
        ncc_window: int = 9,
        similarity_weight: float = 1.0,
        smoothness_weight: float = 1.0,
        field_weight: float = 1.0,
        real_weight: float = 1.0,
        optimizer: Any = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # configs (not built objects) are stored so that a checkpoint alone rebuilds the model
        self.save_hyperparameters(
            {
                "net": None if isinstance(net, nn.Module) else to_plain(net),
                "mode": mode,
                "field_sources": {
                    name: to_plain(config)
                    for name, config in (field_sources or {}).items()
                    if isinstance(config, Mapping | DictConfig)
                },
                "similarity": similarity,
                "ncc_window": ncc_window,
                "similarity_weight": similarity_weight,
                "smoothness_weight": smoothness_weight,
                "field_weight": field_weight,
                "real_weight": real_weight,
                "optimizer": to_plain(optimizer) or dict(ADAM, lr=1e-4),
                "scheduler": to_plain(scheduler),
                "scheduler_interval": check_interval(scheduler_interval),
                "num_classes": num_classes,
            },
            logger=False,
        )
        self.net = build(net)
        self.base_mode, self.use_real = parse_mode(mode)
        if similarity not in SIMILARITIES:
            raise ValueError(f"model.similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.field_source = None
        if self.base_mode != "unsupervised":
            config = (field_sources or {}).get(self.base_mode)
            if config is None:
                raise ValueError(
                    f"mode {mode!r} needs model.field_sources.{self.base_mode} (a field source "
                    "config with _target_); none is configured"
                )
            try:
                self.field_source = build(config)
            except InstantiationException as error:
                # surface the source's own message (it names the missing key or file)
                if isinstance(error.__cause__, ValueError | FileNotFoundError):
                    raise error.__cause__ from error
                raise
        self.val_means = torch.nn.ModuleDict({name: WeightedMean() for name in PAIR_METRICS})
        self.test_means = torch.nn.ModuleDict({name: WeightedMean() for name in PAIR_METRICS})
        self.test_rows: list[dict] = []
        self.test_outputs: list[dict] = []

    # ------------------------------------------------------------------ losses
    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.net(moving, fixed)

    def _dissimilarity(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.hparams.similarity == "ncc":
            return -local_ncc(warped, fixed, window=self.hparams.ncc_window).mean()
        return (warped - fixed).pow(2).mean()

    def _image_loss(
        self, moving: torch.Tensor, fixed: torch.Tensor, displacement: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dissimilarity, smoothness) of a predicted field on one pair batch."""
        warped = warp(moving, displacement)
        return self._dissimilarity(warped, fixed), gradient_smoothness(displacement).mean()

    def _real_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict]:
        moving, fixed = _require(batch, "moving"), _require(batch, "fixed")
        displacement = self.net(moving, fixed)
        dissimilarity, smoothness = self._image_loss(moving, fixed, displacement)
        hp = self.hparams
        loss = hp.similarity_weight * dissimilarity + hp.smoothness_weight * smoothness
        return loss, {"real_dissimilarity": dissimilarity, "real_smoothness": smoothness}

    def _synthetic_loss(self, batch: Mapping) -> tuple[torch.Tensor, dict]:
        images = _source_images(batch)
        with torch.no_grad():
            true_field = self.field_source(images).detach()
            pair = make_pair(images, true_field)
        displacement = self.net(pair.moving, pair.fixed)
        field_error = (displacement - pair.displacement).pow(2).sum(1).mean()
        dissimilarity, smoothness = self._image_loss(pair.moving, pair.fixed, displacement)
        hp = self.hparams
        loss = (
            hp.field_weight * field_error
            + hp.similarity_weight * dissimilarity
            + hp.smoothness_weight * smoothness
        )
        logs = {
            # mean |true field| (voxels): compares the scale of the synthetic field families
            "synthetic_field_magnitude": pair.displacement.norm(dim=1).mean(),
            "synthetic_field_error": field_error,
            "synthetic_dissimilarity": dissimilarity,
            "synthetic_smoothness": smoothness,
        }
        return loss, logs

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        logs: dict[str, torch.Tensor] = {}
        if self.base_mode == "unsupervised":
            loss, logs = self._real_loss(batch)
        else:
            loss, logs = self._synthetic_loss(batch)
            if self.use_real:
                real, real_logs = self._real_loss(batch)
                loss = loss + self.hparams.real_weight * real
                logs.update(real_logs)
        batch_size = _batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        moving, fixed = _require(batch, "moving"), _require(batch, "fixed")
        displacement = self.net(moving, fixed)
        metrics = pair_metrics(displacement, batch, num_classes=self.hparams.num_classes)
        return displacement, metrics

    def _log_means(self, stage: str, metrics: dict[str, torch.Tensor]) -> None:
        """Per-pair values into the stage's mean metrics (torchmetrics: exact under DDP)."""
        means = self.val_means if stage == "val" else self.test_means
        for name, values in metrics.items():
            if name not in means:
                continue
            finite = torch.isfinite(values)
            # every rank updates and logs every metric (weight 0 where a batch has no finite
            # value), so the cross-rank reduction runs on all ranks together
            means[name].update(torch.where(finite, values, 0.0).float(), weight=finite.float())
            self.log(f"{stage}/{name}", means[name], batch_size=int(finite.sum().clamp(min=1)))

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        _, metrics = self._evaluate(batch)
        self._log_means("val", metrics)

    def on_test_epoch_start(self) -> None:
        self.test_rows = []
        self.test_outputs = []

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        displacement, metrics = self._evaluate(batch)
        ids = batch.get("id") or [f"pair{batch_idx:04d}_{i}" for i in range(len(displacement))]
        for index, pair_id in enumerate(ids):
            row = {"id": str(pair_id)}
            row.update({name: float(values[index]) for name, values in metrics.items()})
            self.test_rows.append(row)
        self._log_means("test", metrics)
        self.test_outputs.append({"displacement": displacement.detach().cpu(), "id": list(ids)})

    def on_test_epoch_end(self) -> None:
        """Under DDP every rank ends with every pair's row (one per id: the distributed sampler
        may repeat pairs to even out the ranks), in the order of the ranks' batches."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, self.test_rows)
        rows, seen = [], set()
        for rank_rows in gathered:
            for row in rank_rows:
                if row["id"] not in seen:
                    seen.add(row["id"])
                    rows.append(row)
        self.test_rows = rows

    def configure_optimizers(self) -> Any:
        hparams = self.hparams
        return configure(
            self.net.parameters(), hparams.optimizer, hparams.scheduler, hparams.scheduler_interval
        )


def _require(batch: Mapping, key: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(
            f"registration batch has no {key!r} (keys: {sorted(batch)}); use data task=registration"
        )
    return batch[key]


def _source_images(batch: Mapping) -> torch.Tensor:
    """Images for synthetic pairs: ``image`` when present, else the real pair's two images."""
    if "image" in batch:
        return batch["image"]
    return torch.cat([_require(batch, "moving"), _require(batch, "fixed")], dim=0)


def _batch_size(batch: Mapping) -> int:
    for key in ("moving", "image"):
        if key in batch:
            return int(batch[key].shape[0])
    return 1
