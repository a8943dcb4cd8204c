"""SegmentationModule: a U-Net trained with Dice + cross-entropy, optionally DRDM-augmented.

Training batches pass through the configured augmentation strategy
(:class:`drdm.augmentation.AugmentationStrategy`): its TorchIO part runs per sample on the CPU in
``on_before_batch_transfer``, its batch part (DRDM on-the-fly generation, offline synthetic pool)
runs on the training device in ``on_after_batch_transfer``. Validation and test batches are never
augmented.

Validation/test metrics (background excluded, per class with the data config's class names, and
their mean): Dice, sensitivity, precision, HD95 in mm (spacing from the batch), logged as
``{stage}/{metric}_{class}`` and ``{stage}/{metric}_mean``, e.g. ``test/dice_mean``. After the
test epoch the values (and per-sample rows) are also written to ``test_metrics.json`` in the
trainer's ``default_root_dir`` so sweeps can be aggregated without a logger. A figure of images,
ground truth and predictions is saved every ``figure_every_n_epochs`` validation epochs as
``figures/predictions_epochNNN.png`` in the ``default_root_dir`` and sent to the image-capable
loggers (wandb, TensorBoard).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from drdm.losses import soft_dice_loss
from drdm.metrics.collection import METRIC_NAMES, SegmentationScores
from drdm.models.optim import ADAMW, check_interval, configure
from drdm.utils.atomic import save_figure_atomic, write_json_atomic
from drdm.utils.figures import log_image, prediction_figure
from drdm.utils.instantiate import build, to_plain


class SegmentationModule(L.LightningModule):
    """Args:
    net: ``net(image [B, C, *S]) -> logits [B, num_classes, *S]`` (e.g. ``SegmentationUNet``).
    class_names: all class names, background first (``num_classes = len(class_names)``).
    augmentation: an ``AugmentationStrategy`` (``None``: no augmentation).
    optimizer: partial optimiser config (``_partial_: true``, :mod:`drdm.models.optim`);
        ``None``: AdamW at 1e-3, weight decay 1e-5. scheduler: partial LR-scheduler config or
        ``None``; scheduler_interval: ``"epoch"`` or ``"step"``.
    dice_weight, ce_weight: loss = dice_weight * soft Dice loss + ce_weight * cross-entropy.
    hd95: compute HD95 in validation/test (CPU distance transforms).
    figure_every_n_epochs: log a prediction figure every N validation epochs (0: never).
    figure_samples: samples shown in the figure.
    results_file: JSON written after testing, relative to ``trainer.default_root_dir``
        (``None``: not written).
    """

    def __init__(
        self,
        net: nn.Module | Mapping,
        class_names: Sequence[str],
        augmentation=None,
        optimizer: Any = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        hd95: bool = True,
        figure_every_n_epochs: int = 5,
        figure_samples: int = 4,
        results_file: str | None = "test_metrics.json",
    ) -> None:
        super().__init__()
        class_names = [str(name) for name in to_plain(class_names)]
        if len(class_names) < 2:
            raise ValueError(
                f"model.class_names must list background and at least one class, got {class_names}"
            )
        # configs (not built objects) are kept in the checkpoint so it alone rebuilds the model
        self.save_hyperparameters(
            {
                "net": to_plain(net) if isinstance(net, Mapping) else None,
                "augmentation": to_plain(augmentation)
                if isinstance(augmentation, Mapping)
                else None,
                "class_names": class_names,
                "optimizer": to_plain(optimizer) or dict(ADAMW, lr=1e-3, weight_decay=1e-5),
                "scheduler": to_plain(scheduler),
                "scheduler_interval": check_interval(scheduler_interval),
                "dice_weight": dice_weight,
                "ce_weight": ce_weight,
                "hd95": hd95,
                "figure_every_n_epochs": figure_every_n_epochs,
                "figure_samples": figure_samples,
                "results_file": results_file,
            }
        )
        self.class_names = class_names
        self.net = _build_net(net, len(class_names))
        self.augmentation = build(augmentation) if augmentation is not None else None
        self.augmentation_name = getattr(self.augmentation, "name", "none")
        self.val_scores = SegmentationScores(class_names, hd95=hd95)
        self.test_scores = SegmentationScores(class_names, hd95=hd95)
        self.test_ids: list[str] = []
        self._figure_batch: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    # ------------------------------------------------------------------ augmentation hooks
    def _augmenting(self) -> bool:
        return self.augmentation is not None and self._trainer is not None and self.trainer.training

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.augmentation.cpu(batch) if self._augmenting() else batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.augmentation.device(batch) if self._augmenting() else batch

    # ------------------------------------------------------------------ steps
    def _labelled(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, Mapping]:
        """Image, label and the batch restricted to samples that carry a label."""
        for key in ("image", "label"):
            if key not in batch:
                raise ValueError(
                    f"segmentation batches need '{key}' (data.task=segmentation); got keys "
                    f"{sorted(batch)}"
                )
        has_label = batch.get("has_label")
        if has_label is None:
            return batch["image"], batch["label"], batch
        keep = has_label.bool()
        subset = {
            key: value[keep]
            if isinstance(value, torch.Tensor) and len(value) == len(keep)
            else value
            for key, value in batch.items()
        }
        if "id" in batch:
            subset["id"] = [i for i, k in zip(batch["id"], keep.tolist()) if k]
        return batch["image"][keep], batch["label"][keep], subset

    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        dice = soft_dice_loss(logits, label)
        cross_entropy = F.cross_entropy(logits, label[:, 0])
        loss = self.hparams.dice_weight * dice + self.hparams.ce_weight * cross_entropy
        return loss, {"dice_loss": dice, "ce_loss": cross_entropy}

    def training_step(self, batch: Mapping, batch_idx: int):
        image, label, subset = self._labelled(batch)
        if image.shape[0] == 0:
            return None  # no labelled sample in this batch: nothing to learn from
        loss, parts = self._loss(self.net(image), label)
        batch_size = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if "synthetic" in subset:
            self.log(
                "train/synthetic_fraction",
                subset["synthetic"].float().mean(),
                batch_size=batch_size,
            )
        return loss

    def _evaluate(self, batch: Mapping, stage: str, scores: SegmentationScores):
        image, label, subset = self._labelled(batch)
        if image.shape[0] == 0:
            return None
        logits = self.net(image)
        loss, _ = self._loss(logits, label)
        self.log(f"{stage}/loss", loss, batch_size=image.shape[0], sync_dist=True)
        prediction = logits.argmax(dim=1, keepdim=True)
        scores.update(prediction, label, subset.get("spacing"))
        return prediction, subset

    def validation_step(self, batch: Mapping, batch_idx: int):
        result = self._evaluate(batch, "val", self.val_scores)
        if result is not None and batch_idx == 0:
            prediction, subset = result
            count = self.hparams.figure_samples
            self._figure_batch = {
                "image": subset["image"][:count].detach().cpu(),
                "label": subset["label"][:count].detach().cpu(),
                "prediction": prediction[:count].detach().cpu(),
            }

    def test_step(self, batch: Mapping, batch_idx: int):
        result = self._evaluate(batch, "test", self.test_scores)
        if result is not None:
            _, subset = result
            count = subset["image"].shape[0]
            self.test_ids.extend(subset.get("id", [f"{batch_idx}_{i}" for i in range(count)]))

    def _log_scores(self, stage: str, scores: SegmentationScores) -> dict[str, float]:
        values = {key: float(value) for key, value in scores.compute().items()}
        for key, value in values.items():
            metric, class_name = key.split("/")
            self.log(f"{stage}/{metric}_{class_name}", value, prog_bar=key == "dice/mean")
        return values

    def on_validation_epoch_end(self) -> None:
        if self.val_scores.update_count:
            self._log_scores("val", self.val_scores)
        self.val_scores.reset()
        every = self.hparams.figure_every_n_epochs
        if (
            every
            and self._figure_batch is not None
            and not self.trainer.sanity_checking
            and (self.current_epoch + 1) % every == 0
            # one figure per run under DDP, from rank 0's first validation batch
            and self.trainer.is_global_zero
        ):
            self._log_figure()
        self._figure_batch = None

    def on_test_epoch_start(self) -> None:
        self.test_scores.reset()
        self.test_ids = []

    def on_test_epoch_end(self) -> None:
        if not self.test_scores.update_count:
            return
        values = self._log_scores("test", self.test_scores)
        if self.hparams.results_file and self.trainer.is_global_zero:
            self._write_results(values)

    # ------------------------------------------------------------------ outputs
    def _write_results(self, values: dict[str, float]) -> None:
        per_sample = self.test_scores.per_sample()
        rows = []
        for index, sample_id in enumerate(self.test_ids):
            row = {"id": sample_id}
            for metric in METRIC_NAMES:
                if metric == "hd95" and not self.hparams.hd95:
                    continue
                for class_name, value in zip(self.class_names[1:], per_sample[metric][index]):
                    row[f"{metric}_{class_name}"] = _finite_or_none(float(value))
            rows.append(row)
        document = {
            "augmentation": self.augmentation_name,
            "class_names": self.class_names[1:],
            "metrics": {key.replace("/", "_"): _finite_or_none(v) for key, v in values.items()},
            "num_test_samples": len(rows),
            "per_sample": rows,
        }
        path = Path(self.trainer.default_root_dir) / self.hparams.results_file
        write_json_atomic(path, document)

    def _log_figure(self) -> None:
        """Save the prediction figure as a PNG beside the run and hand it to the loggers."""
        import matplotlib.pyplot as plt  # figures only (drdm.utils.figures set the backend)

        figure = prediction_figure(**self._figure_batch, class_names=self.class_names)
        name = f"predictions_epoch{self.current_epoch + 1:03d}.png"
        path = Path(self.trainer.default_root_dir) / "figures" / name
        save_figure_atomic(figure, path, dpi=80)
        plt.close(figure)
        log_image(self.loggers, "val/predictions", path, self.global_step)

    def configure_optimizers(self) -> Any:
        hparams = self.hparams
        return configure(
            self.parameters(), hparams.optimizer, hparams.scheduler, hparams.scheduler_interval
        )


def _build_net(net: nn.Module | Mapping, num_classes: int) -> nn.Module:
    """Build the net from its config, filling ``num_classes`` from the class names."""
    if isinstance(net, Mapping):
        configured = net.get("num_classes")
        if configured is not None and int(configured) != num_classes:
            raise ValueError(
                f"model.net.num_classes={configured} but model.class_names has {num_classes} "
                "entries (background included); leave net.num_classes null to infer it"
            )
        net = build(net, num_classes=num_classes)
    net_classes = getattr(net, "num_classes", None)
    if net_classes is not None and net_classes != num_classes:
        raise ValueError(
            f"the net predicts {net_classes} classes but class_names has {num_classes} entries"
        )
    return net


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined values are written as null."""
    return value if value == value and abs(value) != float("inf") else None
