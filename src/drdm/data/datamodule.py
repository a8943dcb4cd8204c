"""``SubjectDataModule``: one LightningDataModule over TorchIO subjects for every task.

``setup()`` runs once: the source lists and checks its files, groups are split (train/val/test,
by seed or explicit ids), every volume is loaded, validated (finite voxels, label values within
``class_names``), preprocessed, cut into slices in 2D mode and brought to ``image_size``. The
results stay in memory, so loader workers only augment and collate.

Tasks:

- ``drdm``: every training image (labels are passed through when the source has them);
- ``segmentation``: the ``n_labelled`` (or ``labelled_ids``) training groups keep their labels, the
  other training samples are image-only (``label`` -1, ``has_label`` False); val/test keep labels;
- ``registration``: batches of ``moving`` / ``fixed`` pairs built within each split
  (:mod:`drdm.data.pairs`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torchio as tio
from omegaconf import DictConfig, ListConfig, OmegaConf

from drdm.data.batch import collate_pairs, collate_subjects
from drdm.data.io import check_label_values
from drdm.data.pairs import PAIR_MODES, PairDataset, build_pairs
from drdm.data.preprocessing import PreprocessingConfig, preprocess_volume, size_transform
from drdm.data.shuffle import EpochShuffle
from drdm.data.slicing import extract_slices
from drdm.data.sources import Source, SourceData
from drdm.data.splits import SPLITS, select_labelled, split_groups

TASKS = ("drdm", "segmentation", "registration")


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig -> plain Python containers (other values unchanged)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_options(options: Mapping, known: Sequence[str], key: str) -> dict:
    options = dict(_plain(options) or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {key} keys {unknown}; known: {sorted(known)}")
    return options


class SubjectDataModule(L.LightningDataModule):
    """DataModule for DRDM training, few-shot segmentation and registration.

    Args:
        source: a :class:`~drdm.data.sources.Source` (Hydra: ``_target_`` + its arguments).
        ndims: 2 (slices) or 3 (volumes).
        image_size: model input size, ``ndims`` ints (tensor axis order).
        task: ``drdm``, ``segmentation`` or ``registration``.
        class_names: names of the label values (index = value); labels outside are refused.
        root: the data folder (read by the source config as ``${..root}``; kept for logging).
        slice_axis: 2D mode: voxel axis (after reorientation) across which slices are taken.
        skip_empty_slices: 2D mode: drop slices without foreground (label > 0, else image > min).
        min_foreground_fraction: 2D mode: slices with at most this foreground fraction are empty.
        split: ``{ratios: [train, val, test], train_ids, val_ids, test_ids}`` (ids are groups).
        n_labelled: segmentation: training groups that keep labels (``None`` = all).
        labelled_ids: segmentation: explicit labelled training groups (wins over ``n_labelled``).
        preprocessing: :class:`~drdm.data.preprocessing.PreprocessingConfig` keys.
        augmentation: training-only random transforms: a TorchIO transform, or
            ``{flip_axes: [...], flip_probability: p}`` (axes in tensor order of the sample).
            Flips do not change the recorded affine.
        pairs: registration: ``{mode: source|within|across, max_pairs, transform}``; ``transform``
            is the hook of :class:`~drdm.data.pairs.PairDataset`.
        patch: ``{enabled, samples_per_volume, max_length, sampler: uniform|label,
            label_probabilities, num_workers}``: train on random ``image_size`` patches of larger
            volumes through ``tio.Queue`` (val/test are centre-cropped/padded to ``image_size``).
        batch_size, num_workers, pin_memory: loader settings; ``eval_batch_size`` defaults to
            ``batch_size``.
        train_repeats: each training sample appears this many times per epoch, every copy with
            its own random transforms (few-shot: fill batches from one or two labelled samples).
        persistent_workers: keep the training loader's workers across epochs (faster epochs
            with workers); off by default because a resumed run cannot reproduce the random
            state such workers carry over (random transforms in workers would then differ).
        seed: seed of the split, the few-shot selection and the pair subset.
    """

    def __init__(
        self,
        source: Source,
        ndims: int = 2,
        image_size: Sequence[int] = (64, 64),
        task: str = "drdm",
        class_names: Sequence[str] | None = None,
        root: str | None = None,
        slice_axis: int = 2,
        skip_empty_slices: bool = False,
        min_foreground_fraction: float = 0.0,
        split: Mapping | None = None,
        n_labelled: int | None = None,
        labelled_ids: Sequence[str] | None = None,
        preprocessing: Mapping | PreprocessingConfig | None = None,
        augmentation: Mapping | tio.Transform | None = None,
        pairs: Mapping | None = None,
        patch: Mapping | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        train_repeats: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(source, Source):
            raise ValueError(f"data.source must be a drdm.data Source, got {type(source).__name__}")
        if ndims not in (2, 3):
            raise ValueError(f"data.ndims must be 2 or 3, got {ndims}")
        if task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {task!r}")
        self.source = source
        self.ndims = int(ndims)
        self.image_size = [int(s) for s in _plain(image_size)]
        if len(self.image_size) != self.ndims or min(self.image_size) < 1:
            raise ValueError(f"data.image_size {self.image_size} must be {ndims} positive ints")
        self.task = task
        self.class_names = list(_plain(class_names)) if class_names is not None else None
        self.root = root
        self.slice_axis = int(slice_axis)
        self.skip_empty_slices = bool(skip_empty_slices)
        self.min_foreground_fraction = float(min_foreground_fraction)
        self.split_options = _check_options(
            split, ("ratios", "train_ids", "val_ids", "test_ids"), "split"
        )
        self.n_labelled = n_labelled
        self.labelled_ids = _plain(labelled_ids)
        self.preprocessing = PreprocessingConfig.from_mapping(_plain(preprocessing))
        self.augmentation = self._build_augmentation(augmentation)
        self.pair_options = _check_options(
            pairs, ("mode", "max_pairs", "transform", "max_pairs_eval"), "pairs"
        )
        self.pair_options.setdefault("mode", "across")
        if self.pair_options["mode"] not in PAIR_MODES:
            raise ValueError(f"pairs.mode must be one of {PAIR_MODES}")
        self.patch = _check_options(
            patch,
            (
                "enabled",
                "samples_per_volume",
                "max_length",
                "sampler",
                "label_probabilities",
                "num_workers",
            ),
            "patch",
        )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        if int(train_repeats) < 1:
            raise ValueError(f"data.train_repeats must be >= 1, got {train_repeats}")
        self.train_repeats = int(train_repeats)
        self.seed = int(seed)
        self.source_data: SourceData | None = None
        self.splits: dict[str, list[str]] = {}
        self.labelled_groups: list[str] = []
        self.samples: dict[str, list[tio.Subject]] = {}
        self.pair_indices: dict[str, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------------------- properties

    @property
    def num_classes(self) -> int | None:
        """Number of label classes (``len(class_names)``), or ``None`` when undeclared."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def has_labels(self) -> bool:
        """Whether the source provides label maps (so batches carry ``label``)."""
        return bool(self.source_data and self.source_data.has_labels)

    def _build_augmentation(self, augmentation: Any) -> tio.Transform | None:
        if augmentation is None or isinstance(augmentation, tio.Transform):
            return augmentation
        options = _check_options(augmentation, ("flip_axes", "flip_probability"), "augmentation")
        axes = tuple(int(a) for a in options.get("flip_axes") or ())
        if not axes:
            return None
        if max(axes) >= self.ndims:
            raise ValueError(f"augmentation.flip_axes {axes} must be < ndims={self.ndims}")
        return tio.RandomFlip(
            axes=axes, flip_probability=float(options.get("flip_probability", 0.5))
        )

    # ------------------------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Load, check, split and preprocess everything once (later calls return immediately)."""
        if self.samples:
            return
        data = self.source.load()
        if not data.subjects:
            raise ValueError(f"{type(self.source).__name__} found no subjects")
        ids = [str(subject["id"]) for subject in data.subjects]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate subject ids {duplicates[:10]}")
        if self.task == "segmentation" and not data.has_labels:
            raise ValueError(
                f"task=segmentation needs labels but {type(self.source).__name__} has none"
            )
        self.source_data = data
        self.splits = split_groups(
            [subject["group"] for subject in data.subjects],
            ratios=self.split_options.get("ratios", (0.7, 0.15, 0.15)),
            seed=self.seed,
            train_ids=self.split_options.get("train_ids"),
            val_ids=self.split_options.get("val_ids"),
            test_ids=self.split_options.get("test_ids"),
        )
        labelled = [
            g
            for g in self.splits["train"]
            if any("label" in s for s in data.subjects if s["group"] == g)
        ]
        if self.task == "segmentation":
            self.labelled_groups = select_labelled(
                labelled, self.n_labelled, self.seed, self.labelled_ids
            )
        else:
            self.labelled_groups = labelled
        group_split = {g: name for name, groups in self.splits.items() for g in groups}
        samples: dict[str, list[tio.Subject]] = {name: [] for name in SPLITS}
        for subject in data.subjects:
            # explicit id lists may leave groups out of every split: those are not used
            name = group_split.get(str(subject["group"]))
            if name is not None:
                samples[name] += self._prepare(subject, training=name == "train")
        for name in SPLITS:
            if not samples[name]:
                raise ValueError(
                    f"split '{name}' has no samples after preprocessing/slicing "
                    f"(groups {self.splits[name][:5]}); check skip_empty_slices or the split"
                )
        self.samples = samples
        if self.task == "registration":
            self._setup_pairs()

    def _check_labels(self, subject: tio.Subject) -> None:
        for key in ("label", "mask"):
            if key in subject:
                image = subject[key]
                where = f"{key} {image.path}" if image.path else f"{key} of '{subject['id']}'"
                classes = self.num_classes if key == "label" else None
                check_label_values(image.data.numpy(), classes, where)

    def _prepare(self, subject: tio.Subject, training: bool) -> list[tio.Subject]:
        """One source volume -> its model samples (volume or slices), preprocessed and sized."""
        subject.load()
        self._check_labels(subject)
        slice_axis = self.slice_axis if self.ndims == 2 else None
        volume = preprocess_volume(subject, self.preprocessing, slice_axis)
        if self.ndims == 2:
            items = extract_slices(
                volume, self.slice_axis, self.skip_empty_slices, self.min_foreground_fraction
            )
            for image in volume.get_images(intensity_only=False):
                if image.path is not None:
                    image.unload()  # the slices hold copies; the source can re-read the file
        else:
            items = [volume]
        patch_mode = bool(self.patch.get("enabled")) and training
        if patch_mode:
            target = (*self.image_size, 1) if self.ndims == 2 else tuple(self.image_size)
            sizer = tio.CropOrPad(
                target, only_pad=True, padding_mode=self.preprocessing.pad_value, copy=False
            )
        else:
            sizer = size_transform(self.preprocessing, self.image_size, self.ndims)
        if sizer is not None:
            items = [sizer(item) for item in items]
        keep_label = self.task != "segmentation" or not training
        if not keep_label and str(subject["group"]) not in set(self.labelled_groups):
            for item in items:
                if "label" in item:
                    item.remove_image("label")
        return items

    def _setup_pairs(self) -> None:
        source_pairs = self.source_data.pairs if self.source_data else []
        mode = self.pair_options["mode"]
        for index, name in enumerate(SPLITS):
            max_pairs = self.pair_options.get("max_pairs" if name == "train" else "max_pairs_eval")
            pairs = build_pairs(
                self.samples[name], mode, source_pairs, max_pairs, self.seed + index
            )
            if not pairs:
                raise ValueError(
                    f"pairs.mode={mode!r} gives no registration pairs in split '{name}' "
                    f"({len(self.samples[name])} samples)"
                )
            self.pair_indices[name] = pairs

    # ------------------------------------------------------------------------------- loaders

    def _loader(
        self, dataset: Any, collate: Callable, shuffle: bool, batch_size: int, workers: int
    ):
        options: dict[str, Any] = {"persistent_workers": workers > 0}
        if shuffle:
            # the order (and the workers' seeds) follow (seed, epoch): a resumed run repeats
            # them; workers then start every epoch, since persistent ones would carry their
            # random state from one epoch to the next where a resumed run cannot follow
            sampler = EpochShuffle(dataset, self.shuffle_seed(), self._current_epoch())
            options = {
                "sampler": sampler,
                "generator": sampler.worker_generator,
                "persistent_workers": workers > 0 and self.persistent_workers,
            }
        return tio.SubjectsLoader(
            dataset,
            collate_fn=collate,
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory,
            **options,
        )

    def shuffle_seed(self) -> int:
        """The training shuffle's seed: the run's global seed (``PL_GLOBAL_SEED``, which
        ``lightning.seed_everything`` sets and Lightning's DDP sampler uses too), else ``seed``."""
        return int(os.environ.get("PL_GLOBAL_SEED", self.seed))

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _patch_queue(self, dataset: tio.SubjectsDataset) -> tio.Queue:
        options = self.patch
        patch_size = (*self.image_size, 1) if self.ndims == 2 else tuple(self.image_size)
        if options.get("sampler", "uniform") == "label":
            probabilities = options.get("label_probabilities")
            if probabilities is not None:
                probabilities = {int(k): float(v) for k, v in dict(probabilities).items()}
            sampler = tio.LabelSampler(patch_size, "label", probabilities)
        elif options.get("sampler", "uniform") == "uniform":
            sampler = tio.UniformSampler(patch_size)
        else:
            raise ValueError(
                f"patch.sampler must be 'uniform' or 'label', got {options['sampler']}"
            )
        return tio.Queue(
            dataset,
            max_length=int(options.get("max_length", 64)),
            samples_per_volume=int(options.get("samples_per_volume", 8)),
            sampler=sampler,
            num_workers=int(options.get("num_workers", 0)),
            shuffle_subjects=True,
            shuffle_patches=True,
        )

    def dataloader(self, split: str, shuffle: bool | None = None) -> torch.utils.data.DataLoader:
        """Loader for ``split`` (``train``, ``val`` or ``test``) following the batch contract."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        training = split == "train"
        shuffle = training if shuffle is None else shuffle
        batch_size = self.batch_size if training else self.eval_batch_size
        if self.task == "registration":
            transform = self.pair_options.get("transform")
            dataset = PairDataset(
                self.samples[split], self.pair_indices[split], self.ndims, transform
            )
            collate = functools.partial(collate_pairs, include_label=self.has_labels)
            return self._loader(dataset, collate, shuffle, batch_size, self.num_workers)
        collate = functools.partial(
            collate_subjects, ndims=self.ndims, include_label=self.has_labels
        )
        augmentation = self.augmentation if training else None
        subjects = self.samples[split] * (self.train_repeats if training else 1)
        dataset = tio.SubjectsDataset(subjects, transform=augmentation)
        if training and self.patch.get("enabled"):
            # the queue shuffles and loads in its own workers; the outer loader must not
            return self._loader(self._patch_queue(dataset), collate, False, batch_size, 0)
        return self._loader(dataset, collate, shuffle, batch_size, self.num_workers)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("test")

    # ------------------------------------------------------------------------------- summaries

    def subjects(self, split: str) -> list[tio.Subject]:
        """The preprocessed samples of ``split`` (TorchIO subjects, model size)."""
        self.setup()
        return self.samples[split]

    def summary(self) -> dict[str, Any]:
        """Counts for logging: groups and samples per split, labelled groups, pairs."""
        self.setup()
        summary: dict[str, Any] = {
            "source": type(self.source).__name__,
            "ndims": self.ndims,
            "image_size": self.image_size,
            "task": self.task,
            "labelled_groups": len(self.labelled_groups),
        }
        for name in SPLITS:
            summary[f"{name}_groups"] = len(self.splits[name])
            summary[f"{name}_samples"] = len(self.samples[name])
            if name in self.pair_indices:
                summary[f"{name}_pairs"] = len(self.pair_indices[name])
        summary["intensity_range"] = [
            float(np.min([s["image"].data.min() for s in self.samples["train"]])),
            float(np.max([s["image"].data.max() for s in self.samples["train"]])),
        ]
        return summary
