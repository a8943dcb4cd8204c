"""DRDM augmentation as a batch transform on the training device.

For a batch of real labelled samples, ``round(ratio * B)`` synthetic samples are appended. Each
one picks a real sample of the batch at random, draws its own start step ``t0`` uniformly from
``t0_range`` and gets a displacement field from the field source (a frozen DRDM: diffuse to
``t0``, recover to 0). The **same** field then warps the image (bilinear, zeros padding) and the
label map (``label_mode="nearest"``: nearest neighbour; ``"onehot"``: one-hot channels warped
bilinearly, then argmax, which gives smoother label boundaries). Warp is a pull-back,
``out(x) = in(x + u(x))``, so each synthetic pair is the original pair moved by a known field.

The field source is any of :mod:`drdm.field_sources.bank`, called as ``source(image [N, C, *S],
t0=[N] long, keys=ids) -> [N, ndims, *S]``: ``DRDMFieldSource`` (the trained DRDM) or
``ForwardDiffusionFieldSource`` (the forward process alone: an ablation that needs no trained
model). The batch's sample ids name the images for the source's bank (``fields_per_image``):
the images here are TorchIO-augmented, so their content never repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from drdm.deform import warp

LABEL_MODES = ("nearest", "onehot")


def _check_t0_range(t0_range: Sequence[int]) -> tuple[int, int]:
    if len(t0_range) != 2 or int(t0_range[0]) > int(t0_range[1]) or int(t0_range[0]) < 0:
        raise ValueError(f"t0_range must be [low, high] with 0 <= low <= high, got {t0_range}")
    return int(t0_range[0]), int(t0_range[1])


class DRDMBatchAugmentation:
    """Append DRDM-deformed copies of real samples to a training batch.

    Args:
        source: a field source (:mod:`drdm.field_sources.bank`), ``source(image, t0=..., keys=...)
            -> displacement``; its ``fields_per_image`` bounds the fields made per sample.
        ratio: synthetic samples per real labelled sample in the batch (0.5: half as many
            synthetic as real are appended; 0 disables).
        t0_range: ``[low, high]`` inclusive range for each sample's start step.
        label_mode: ``"nearest"`` or ``"onehot"`` (one-hot linear warp + argmax).
        num_classes: classes including background for ``"onehot"`` (``None``: the largest label
            in the batch + 1, enough since argmax only needs the labels present).
        t0_per_batch: draw one ``t0`` per batch instead of one per synthetic sample. The DRDM
            source runs one recovery loop per distinct ``t0``, so this divides its cost by the
            number of synthetic samples per batch (used for CPU-sized runs); ``t0`` still covers
            the range across batches.

    Call with a batch dict on the training device (``image`` ``[B, C, *S]``, ``label`` int
    ``[B, 1, *S]``, optional ``has_label`` ``[B]``, ``spacing``); returns a new dict with the
    synthetic samples appended to ``image``, ``label``, ``has_label``, ``spacing`` and a bool
    ``synthetic`` ``[B + N]``. Only labelled samples are used as sources.
    """

    def __init__(
        self,
        source: Callable[..., torch.Tensor],
        ratio: float = 1.0,
        t0_range: Sequence[int] = (40, 56),
        label_mode: str = "nearest",
        num_classes: int | None = None,
        t0_per_batch: bool = False,
    ) -> None:
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or null to infer), got {num_classes}")
        self.source = source
        self.ratio = float(ratio)
        self.t0_range = _check_t0_range(t0_range)
        self.label_mode = label_mode
        self.num_classes = num_classes
        self.t0_per_batch = bool(t0_per_batch)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ratio={self.ratio}, t0_range={self.t0_range}, "
            f"label_mode={self.label_mode!r}, source={type(self.source).__name__})"
        )

    def warp_pair(
        self, image: torch.Tensor, label: torch.Tensor, displacement: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp image ``[N, C, *S]`` and label ``[N, 1, *S]`` with the same field."""
        warped_image = warp(image, displacement, mode="bilinear", padding="zeros")
        if self.label_mode == "nearest":
            warped_label = warp(label.float(), displacement, mode="nearest", padding="zeros")
            return warped_image, warped_label.round().to(label.dtype)
        num_classes = self.num_classes or int(label.max()) + 1
        one_hot = F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
        # outside the image every channel is 0 after zeros padding: argmax gives background
        warped = warp(one_hot, displacement, mode="bilinear", padding="zeros")
        return warped_image, warped.argmax(dim=1, keepdim=True).to(label.dtype)

    def __call__(self, batch: dict) -> dict:
        image, label = batch.get("image"), batch.get("label")
        if image is None or label is None:
            raise ValueError(f"batch needs 'image' and 'label', got keys {sorted(batch)}")
        if label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and label {tuple(label.shape)} shapes do not match"
            )
        has_label = batch.get("has_label")
        if has_label is None:
            has_label = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
        labelled = has_label.nonzero().flatten()
        count = int(round(self.ratio * len(labelled)))
        out = dict(batch)
        out["synthetic"] = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
        if count == 0:
            return out
        picks = labelled[torch.randint(len(labelled), (count,), device=image.device)]
        low, high = self.t0_range
        t0 = torch.randint(low, high + 1, (1 if self.t0_per_batch else count,), device=image.device)
        t0 = t0.expand(count)
        with torch.no_grad():
            displacement = self.source(image[picks], t0=t0, keys=self._keys(batch, picks))
            new_image, new_label = self.warp_pair(image[picks], label[picks], displacement)
        out["image"] = torch.cat([image, new_image.to(image.dtype)])
        out["label"] = torch.cat([label, new_label])
        out["has_label"] = torch.cat([has_label, torch.ones_like(has_label[picks])])
        out["synthetic"] = torch.cat([out["synthetic"], torch.ones_like(out["synthetic"][picks])])
        return append_metadata(out, batch, picks, "drdm")

    def _keys(self, batch: dict, picks: torch.Tensor) -> list[str] | None:
        """The picked samples' ids, which name them in the source's bank."""
        if "id" in batch:
            return [str(batch["id"][index]) for index in picks.tolist()]
        if getattr(self.source, "fields_per_image", 0):
            # augmented images never repeat their content: a content key would never hit
            raise ValueError(
                "the field source banks fields per sample (fields_per_image > 0), which needs "
                f"sample ids: the batch has no 'id' key (keys {sorted(batch)})"
            )
        return None


def append_metadata(out: dict, batch: dict, picks: torch.Tensor, tag: str) -> dict:
    """Copy ``spacing``/``affine``/``id`` of the source samples ``picks`` for appended samples."""
    for key in ("spacing", "affine"):
        if key in batch:
            out[key] = torch.cat([batch[key], batch[key][picks.to(batch[key].device)]])
    if "id" in batch:
        out["id"] = [*batch["id"], *(f"{batch['id'][i]}_{tag}" for i in picks.tolist())]
    return out
