"""TorchIO augmentation applied per sample to a collated batch, on the CPU.

Why per sample on the collated batch (and not inside the dataset): the same
:class:`~drdm.data.SubjectDataModule` then serves every strategy unchanged, the strategy lives in
one config group (``augmentation=...``) next to the DRDM batch transform, and the
LightningModule applies it in ``on_before_batch_transfer`` (CPU, training batches only). For the
small 2D images of the few-shot experiments this costs milliseconds per batch; for large 3D
volumes put the same TorchIO transforms in the dataset instead.

Each sample becomes a ``torchio.Subject`` with the image as ``ScalarImage`` and the label as
``LabelMap`` (so spatial transforms use nearest-neighbour for labels and intensity transforms
skip them) and a diagonal affine built from the batch spacing, so millimetre parameters (affine
translation, elastic displacement) mean millimetres. 2D slices get a singleton third axis, which
TorchIO treats as 2D (no rotation out of plane, no displacement along it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torchio as tio


def _as_transform(transforms) -> tio.Transform | None:
    """A ``tio.Compose`` from a transform, a list of them, or a name -> transform mapping."""
    if transforms is None:
        return None
    if isinstance(transforms, tio.Transform):
        return transforms
    if isinstance(transforms, Mapping):
        items = [t for t in transforms.values() if t is not None]
    elif isinstance(transforms, Sequence):
        items = [t for t in transforms if t is not None]
    else:
        raise ValueError(
            "transforms must be a torchio.Transform, a list of them or a name -> transform "
            f"mapping, got {type(transforms).__name__}"
        )
    for item in items:
        if not isinstance(item, tio.Transform):
            raise ValueError(f"expected torchio transforms, got {type(item).__name__}")
    return tio.Compose(items) if items else None


class TorchIOBatchAugmentation:
    """Apply a TorchIO transform to every sample of a batch dict (``image`` and ``label``).

    Args:
        transforms: a ``torchio.Transform``, a list of them, or a mapping name -> transform
            (config-friendly: combinations merge mappings; ``None`` entries are skipped).

    Call with a batch dict holding ``"image"`` float ``[B, C, *S]``, optionally ``"label"`` int
    ``[B, 1, *S]`` and ``"spacing"`` ``[B, ndims]`` (mm); returns a new dict with augmented
    ``image`` and ``label`` (same shapes and dtypes) and the other keys unchanged.
    """

    def __init__(self, transforms) -> None:
        self.transform = _as_transform(transforms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"

    def __call__(self, batch: dict) -> dict:
        if self.transform is None:
            return batch
        if "image" not in batch:
            raise ValueError(f"batch must contain 'image', got keys {sorted(batch)}")
        image = batch["image"]
        if image.ndim not in (4, 5):
            raise ValueError(f"batch['image'] must be [B, C, *S], got {tuple(image.shape)}")
        ndims = image.ndim - 2
        label = batch.get("label")
        spacing = batch.get("spacing")
        images, labels = [], []
        for index in range(image.shape[0]):
            sample_spacing = (
                np.ones(ndims) if spacing is None else spacing[index].double().cpu().numpy()
            )
            subject = self._subject(image[index], None if label is None else label[index])
            affine = np.diag([*sample_spacing, *([1.0] * (3 - ndims)), 1.0])
            for item in subject.get_images(intensity_only=False):
                item.affine = affine
            augmented = self.transform(subject)
            images.append(self._unpad(augmented["image"].data, ndims).to(image.dtype))
            if label is not None:
                labels.append(self._unpad(augmented["label"].data, ndims).to(label.dtype))
        out = dict(batch)
        out["image"] = torch.stack(images).to(image.device)
        if label is not None:
            augmented_label = torch.stack(labels).to(label.device)
            has_label = batch.get("has_label")
            if has_label is not None:
                # samples without a label stay "-1 everywhere" (padding would have written 0s)
                unlabelled = ~has_label.bool().to(label.device)
                augmented_label[unlabelled] = label[unlabelled]
            out["label"] = augmented_label
        return out

    @staticmethod
    def _subject(image: torch.Tensor, label: torch.Tensor | None) -> tio.Subject:
        # TorchIO images are 4D [C, W, H, D]; a 2D slice gets a singleton last axis
        def to_4d(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach().cpu()
            return tensor.unsqueeze(-1) if tensor.ndim == 3 else tensor

        items = {"image": tio.ScalarImage(tensor=to_4d(image).float())}
        if label is not None:
            items["label"] = tio.LabelMap(tensor=to_4d(label).long())
        return tio.Subject(**items)

    @staticmethod
    def _unpad(tensor: torch.Tensor, ndims: int) -> torch.Tensor:
        return tensor[..., 0] if ndims == 2 else tensor
