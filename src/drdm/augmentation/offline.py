"""Offline DRDM augmentation: mix pre-generated image + label pairs (``src/augment.py`` output).

The synthetic pairs are read once from NIfTI files in a folder. An output folder of
``src/augment.py`` is read through its ``manifest.csv`` (``image/``, ``label/``; ``inputs`` may keep
only the samples of some of its inputs, e.g. the labelled training images of a few-shot run).
Any other folder is searched recursively: every file matching ``image_pattern`` is an image and
its label is the file whose name has ``image_token`` replaced by ``label_token``. Images without a
label file are skipped (they cannot supervise a segmentation). Each pair must have the model's
input size (after dropping singleton axes, so a 2D slice may be stored as ``[H, W]`` or
``[H, W, 1]``).

During training ``round(ratio * B)`` pairs drawn at random from this pool are appended to every
batch of ``B`` real samples, on the training device, exactly like the on-the-fly DRDM transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from drdm.augmentation.drdm_batch import append_metadata
from drdm.data.io import load_nifti
from drdm.generation.manifest import MANIFEST, read_manifest


def _load(path: Path) -> np.ndarray:
    array, _ = load_nifti(path)
    array = np.asarray(array)
    # drop trailing singleton axes (2D slices stored as [H, W, 1])
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def manifest_pairs(folder: Path, inputs: Sequence[str] | None) -> list[tuple[Path, Path]]:
    """(image, label) files listed in ``folder/manifest.csv`` (``src/augment.py``), in its order.

    ``inputs``: keep the samples of these input stems only (``None``: all); an input the manifest
    does not list is an error, so a misspelt id cannot silently leave a run without its pairs.
    """
    rows = list(read_manifest(folder / MANIFEST).values())
    if inputs is not None:
        wanted = [str(name) for name in inputs]
        listed = {row["input"] for row in rows}
        missing = [name for name in wanted if name not in listed]
        if missing:
            raise ValueError(
                f"{folder / MANIFEST} has no samples of inputs {missing} "
                f"(it lists {sorted(listed)[:10]})"
            )
        rows = [row for row in rows if row["input"] in set(wanted)]
    return [(folder / row["image"], folder / row["label"]) for row in rows if row.get("label")]


def pattern_pairs(
    folder: Path, image_pattern: str, image_token: str, label_token: str
) -> list[tuple[Path, Path]]:
    """(image, label) files found by name below ``folder``: label = image name with the token
    replaced; images without such a label are skipped."""
    pairs = []
    for image_path in sorted(folder.rglob(image_pattern)):
        label_path = image_path.with_name(image_path.name.replace(image_token, label_token))
        if label_path != image_path and label_path.is_file():
            pairs.append((image_path, label_path))
    return pairs


class OfflineSyntheticPool:
    """Append pre-generated synthetic pairs from ``folder`` to training batches.

    Args:
        folder: output folder of ``src/augment.py`` (read through its ``manifest.csv``), or any
            folder of image / label files (searched recursively by name).
        ratio: synthetic pairs appended per real sample of the batch.
        image_pattern: glob for synthetic image files (folders without ``manifest.csv``).
        image_token, label_token: label file name = image file name with this substitution.
        max_pairs: keep at most this many pairs (in manifest / path order; ``None``: all).
        inputs: keep only the samples generated from these input stems (``manifest.csv``
            folders; ``None``: all).
    """

    def __init__(
        self,
        folder: str | Path,
        ratio: float = 1.0,
        image_pattern: str = "*image*.nii.gz",
        image_token: str = "image",
        label_token: str = "label",
        max_pairs: int | None = None,
        inputs: Sequence[str] | None = None,
    ) -> None:
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        if folder is None or str(folder) in ("", "???", "None"):
            raise ValueError(
                "offline DRDM augmentation needs the output folder of src/augment.py: set "
                "augmentation.batch.offline.folder=path/to/folder"
            )
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"offline augmentation folder not found: {self.folder}")
        self.ratio = float(ratio)
        if (self.folder / MANIFEST).is_file():
            pairs = manifest_pairs(self.folder, inputs)
        elif inputs is not None:
            raise ValueError(
                f"inputs={list(inputs)} needs the manifest.csv of src/augment.py in {self.folder}"
            )
        else:
            pairs = pattern_pairs(self.folder, image_pattern, image_token, label_token)
        if max_pairs is not None:
            pairs = pairs[: int(max_pairs)]
        missing = [path for pair in pairs for path in pair if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files of the pool are missing: {missing[0]}")
        if not pairs:
            raise FileNotFoundError(
                f"no image/label pairs matching {image_pattern!r} (label: {image_token!r} -> "
                f"{label_token!r}) under {self.folder}"
            )
        images, labels = [], []
        for image_path, label_path in pairs:
            image, label = _load(image_path), _load(label_path)
            if image.shape != label.shape:
                raise ValueError(
                    f"{image_path} has shape {image.shape} but its label {label_path} has "
                    f"{label.shape}"
                )
            if images and image.shape != images[0].shape:
                raise ValueError(
                    f"{image_path} has shape {image.shape}, other pairs have {images[0].shape}"
                )
            images.append(image.astype(np.float32))
            labels.append(np.rint(label).astype(np.int64))
        self.paths = pairs
        self.images = torch.from_numpy(np.stack(images))[:, None]  # [N, 1, *S]
        self.labels = torch.from_numpy(np.stack(labels))[:, None]

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder}, pairs={len(self)}, ratio={self.ratio})"

    def __call__(self, batch: dict) -> dict:
        image, label = batch.get("image"), batch.get("label")
        if image is None or label is None:
            raise ValueError(f"batch needs 'image' and 'label', got keys {sorted(batch)}")
        if tuple(self.images.shape[2:]) != tuple(image.shape[2:]):
            raise ValueError(
                f"offline pairs in {self.folder} have size {tuple(self.images.shape[2:])}, "
                f"the batch has {tuple(image.shape[2:])}"
            )
        out = dict(batch)
        out["synthetic"] = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
        count = int(round(self.ratio * image.shape[0]))
        if count == 0:
            return out
        chosen = torch.randint(len(self), (count,))
        # the batch's own metadata (spacing, affine) is reused for the appended pairs
        sources = torch.randint(image.shape[0], (count,))
        out["image"] = torch.cat([image, self.images[chosen].to(image)])
        out["label"] = torch.cat([label, self.labels[chosen].to(label)])
        has_label = batch.get("has_label")
        if has_label is not None:
            out["has_label"] = torch.cat([has_label, torch.ones_like(has_label[sources])])
        out["synthetic"] = torch.cat(
            [out["synthetic"], torch.ones(count, dtype=torch.bool, device=image.device)]
        )
        return append_metadata(out, batch, sources, "offline")
