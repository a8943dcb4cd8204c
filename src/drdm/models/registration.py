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

Validation and test evaluate real pairs with :func:`drdm.metrics.registration.pair_metrics`
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
from drdm.metrics.registration import gradient_smoothness, local_ncc
from drdm.synthesis.pairs import make_pair
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
    lr: Adam learning rate.
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
        lr: float = 1e-4,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "field_sources"])
        # configs (not built objects) are stored so that a checkpoint alone rebuilds the model
        if not isinstance(net, nn.Module):
            self.hparams["net"] = to_plain(net)
        self.hparams["field_sources"] = {
            name: to_plain(config)
            for name, config in (field_sources or {}).items()
            if isinstance(config, Mapping | DictConfig)
        }
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
        from drdm.metrics.registration import pair_metrics

        moving, fixed = _require(batch, "moving"), _require(batch, "fixed")
        displacement = self.net(moving, fixed)
        metrics = pair_metrics(displacement, batch, num_classes=self.hparams.num_classes)
        return displacement, metrics

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        _, metrics = self._evaluate(batch)
        for name, values in metrics.items():
            finite = values[torch.isfinite(values)]
            if finite.numel():
                self.log(f"val/{name}", finite.mean(), batch_size=finite.numel(), sync_dist=True)

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
        for name, values in metrics.items():
            finite = values[torch.isfinite(values)]
            if finite.numel():
                self.log(f"test/{name}", finite.mean(), batch_size=finite.numel())
        self.test_outputs.append({"displacement": displacement.detach().cpu(), "id": list(ids)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


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
