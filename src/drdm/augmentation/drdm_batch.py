"""DRDM augmentation as a batch transform on the training device.

For a batch of real labelled samples, ``round(ratio * B)`` synthetic samples are appended. Each
one picks a real sample of the batch at random, draws its own start step ``t0`` uniformly from
``t0_range`` and gets a displacement field from the field source (a frozen DRDM: diffuse to
``t0``, recover to 0). The **same** field then warps the image (bilinear, zeros padding) and the
label map (``label_mode="nearest"``: nearest neighbour; ``"onehot"``: one-hot channels warped
bilinearly, then argmax, which gives smoother label boundaries). Warp is a pull-back,
``out(x) = in(x + u(x))``, so each synthetic pair is the original pair moved by a known field.

Field sources, ``source(image [N, C, *S], t0 LongTensor[N]) -> displacement [N, ndims, *S]``:

* :class:`DRDMField` — the trained DRDM (``drdm.generation.DRDM``), loaded from a checkpoint;
* :class:`ForwardDiffusionField` — the forward process alone (``drdm.deform.RandomDeformation``
  at ``t0``, no recovery): an ablation, and a source that needs no trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from drdm.deform import warp

LABEL_MODES = ("nearest", "onehot")


def _check_t0_range(t0_range: Sequence[int]) -> tuple[int, int]:
    if len(t0_range) != 2 or int(t0_range[0]) > int(t0_range[1]) or int(t0_range[0]) < 0:
        raise ValueError(f"t0_range must be [low, high] with 0 <= low <= high, got {t0_range}")
    return int(t0_range[0]), int(t0_range[1])


class DRDMField:
    """Fields from a frozen, trained DRDM, one generation per distinct ``t0`` in the batch.

    Args:
        checkpoint: a DRDM checkpoint readable by ``drdm.generation.DRDM.load``.
        generate_kwargs: extra keyword arguments for ``DRDM.generate``.
        load_kwargs: extra keyword arguments for ``DRDM.load`` (e.g. ``start_step: t0`` starts
            the recovery chain at ``t0 - 1`` instead of ``T - 1``: fewer network calls).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        generate_kwargs: dict | None = None,
        load_kwargs: dict | None = None,
    ) -> None:
        if checkpoint is None or str(checkpoint) in ("", "???", "None"):
            raise ValueError(
                "the drdm augmentation needs a trained DRDM checkpoint: set "
                "drdm_checkpoint=path/to/drdm.ckpt (or "
                "augmentation.batch.drdm.source.checkpoint=path/to/drdm.ckpt)"
            )
        from drdm.pretrained import resolve_checkpoint

        # "default": the packaged model (drdm.pretrained)
        self.checkpoint = resolve_checkpoint(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"DRDM checkpoint not found: {self.checkpoint}")
        self.generate_kwargs = dict(generate_kwargs or {})
        self.load_kwargs = dict(load_kwargs or {})
        self._drdm = None

    def _model(self, device: torch.device):
        if self._drdm is None:
            from drdm.generation import DRDM  # imported lazily: only this source needs it

            self._drdm = DRDM.load(self.checkpoint, **self.load_kwargs)
        return self._drdm.to(device)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        drdm = self._model(image.device)
        ndims = image.ndim - 2
        fields = torch.empty(image.shape[0], ndims, *image.shape[2:], device=image.device)
        # DRDM.generate takes one t0 per call (per sample index, shared by its inputs): samples
        # sharing a t0 share one batched recovery loop
        for start in t0.unique().tolist():
            chosen = (t0 == start).nonzero().flatten()
            # generate() seeds each field from (seed, input, k): a fresh seed from the global RNG
            # gives new fields every call while seed_everything keeps runs reproducible
            seed = int(torch.randint(0, 2**62, (1,)).item())
            result = drdm.generate(
                image[chosen], num_samples=1, t0=int(start), seed=seed, **self.generate_kwargs
            )
            field = (
                result.displacement if hasattr(result, "displacement") else result["displacement"]
            )
            fields[chosen] = field.reshape(len(chosen), ndims, *image.shape[2:]).to(fields)
        return fields


class ForwardDiffusionField:
    """The forward process only: ``RandomDeformation`` field at step ``t0`` (no recovery).

    Args:
        schedule: a ``drdm.deform.RandomDeformation`` (or its Hydra config) — same schedule as
            the DRDM it stands in for.
    """

    def __init__(self, schedule) -> None:
        from drdm.utils import build

        self.schedule = build(schedule)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        diffused, _ = self.schedule.to(image.device)(tuple(image.shape[2:]), t0.to(image.device))
        return diffused


class DRDMBatchAugmentation:
    """Append DRDM-deformed copies of real samples to a training batch.

    Args:
        source: field source ``source(image, t0) -> displacement`` (:class:`DRDMField`, ...).
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
        fields_per_sample: ``None``: a new field for every synthetic sample. An int ``K``: each
            real sample (by its batch ``id``) gets at most ``K`` generated fields, kept on the
            device; once it has ``K``, later picks reuse one of them at random. Like an offline
            pool of K synthetic pairs per labelled image, but made lazily on the device; it
            bounds the generation cost (``K`` x labelled samples fields per run) on slow
            hardware. Needs ``id`` in the batch. Memory: ``K x samples x ndims x S`` floats.

    Call with a batch dict on the training device (``image`` ``[B, C, *S]``, ``label`` int
    ``[B, 1, *S]``, optional ``has_label`` ``[B]``, ``spacing``); returns a new dict with the
    synthetic samples appended to ``image``, ``label``, ``has_label``, ``spacing`` and a bool
    ``synthetic`` ``[B + N]``. Only labelled samples are used as sources.
    """

    def __init__(
        self,
        source: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ratio: float = 1.0,
        t0_range: Sequence[int] = (40, 56),
        label_mode: str = "nearest",
        num_classes: int | None = None,
        t0_per_batch: bool = False,
        fields_per_sample: int | None = None,
    ) -> None:
        if fields_per_sample is not None and int(fields_per_sample) < 1:
            raise ValueError(f"fields_per_sample must be >= 1 or null, got {fields_per_sample}")
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
        self.fields_per_sample = None if fields_per_sample is None else int(fields_per_sample)
        self._field_cache: dict[str, list[torch.Tensor]] = {}

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
            if self.fields_per_sample is None:
                displacement = self.source(image[picks], t0)
            else:
                displacement = self._pooled_fields(image, picks, t0, batch)
            new_image, new_label = self.warp_pair(image[picks], label[picks], displacement)
        out["image"] = torch.cat([image, new_image.to(image.dtype)])
        out["label"] = torch.cat([label, new_label])
        out["has_label"] = torch.cat([has_label, torch.ones_like(has_label[picks])])
        out["synthetic"] = torch.cat([out["synthetic"], torch.ones_like(out["synthetic"][picks])])
        return append_metadata(out, batch, picks, "drdm")

    def _pooled_fields(
        self, image: torch.Tensor, picks: torch.Tensor, t0: torch.Tensor, batch: dict
    ) -> torch.Tensor:
        """Fields ``[N, ndims, *S]`` for ``picks``: new ones until a sample has K, then reused."""
        if "id" not in batch:
            raise ValueError(
                "fields_per_sample needs sample ids: the batch has no 'id' key "
                f"(keys {sorted(batch)})"
            )
        ids = [str(batch["id"][index]) for index in picks.tolist()]
        fresh = [
            row
            for row, sample_id in enumerate(ids)
            if len(self._field_cache.get(sample_id, [])) < self.fields_per_sample
        ]
        displacement = torch.empty(
            len(ids), image.ndim - 2, *image.shape[2:], device=image.device, dtype=image.dtype
        )
        if fresh:
            rows = torch.tensor(fresh, device=image.device)
            generated = self.source(image[picks[rows]], t0[rows]).to(displacement)
            displacement[rows] = generated
            for row, field in zip(fresh, generated):
                pool = self._field_cache.setdefault(ids[row], [])
                # one sample picked twice in a batch may get two fresh fields: keep at most K
                if len(pool) < self.fields_per_sample:
                    pool.append(field)
        for row, sample_id in enumerate(ids):
            if row not in fresh:
                pool = self._field_cache[sample_id]
                displacement[row] = pool[int(torch.randint(len(pool), (1,)))].to(displacement)
        return displacement


def append_metadata(out: dict, batch: dict, picks: torch.Tensor, tag: str) -> dict:
    """Copy ``spacing``/``affine``/``id`` of the source samples ``picks`` for appended samples."""
    for key in ("spacing", "affine"):
        if key in batch:
            out[key] = torch.cat([batch[key], batch[key][picks.to(batch[key].device)]])
    if "id" in batch:
        out["id"] = [*batch["id"], *(f"{batch['id'][i]}_{tag}" for i in picks.tolist())]
    return out
