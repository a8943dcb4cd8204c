"""Data sources: each turns a folder layout into volume-level ``tio.Subject``s and pairs.

A source never preprocesses; it only finds files, checks them early (missing root, empty folder,
image/label geometry) and describes them. Every subject carries:

- ``image``: ``tio.ScalarImage`` (read by :func:`drdm.data.io.read_image`),
- ``label``: optional ``tio.LabelMap``,
- ``id`` (unique per volume), ``group`` (the unit of splitting: a patient / case; volumes of one
  group never land in different splits), ``source_path``, ``original_affine`` (``[4, 4]``) and
  ``original_shape``,
- ``keypoints_world``: optional ``float64 [N, 3]`` landmarks in world mm (kept in world units so
  they stay valid through any resampling, cropping or reorientation).

``SourceData.pairs`` lists registration pairs as ``(moving_id, fixed_id)``.
"""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torchio as tio

from drdm.data.io import (
    check_same_geometry,
    existing_dir,
    nifti_files,
    nifti_stem,
    read_header,
    read_image,
    read_label,
)


@dataclass
class SourceData:
    """What a source provides: volume-level subjects and ``(moving_id, fixed_id)`` pairs."""

    subjects: list[tio.Subject]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    has_labels: bool = False


def make_subject(
    image_path: Path,
    label_path: Path | None,
    subject_id: str,
    group: str,
    keypoints_world: np.ndarray | None = None,
    **metadata: object,
) -> tio.Subject:
    """A volume-level subject read lazily from files; image/label geometry is checked now."""
    if label_path is not None:
        check_same_geometry(image_path, label_path)
    shape, affine = read_header(image_path)
    items: dict[str, object] = {
        "image": tio.ScalarImage(image_path, reader=read_image),
        "id": subject_id,
        "group": group,
        "source_path": str(image_path),
        "original_affine": affine,
        "original_shape": tuple(shape),
        **metadata,
    }
    if label_path is not None:
        items["label"] = tio.LabelMap(label_path, reader=read_label)
    if keypoints_world is not None:
        items["keypoints_world"] = np.asarray(keypoints_world, dtype=np.float64)
    return tio.Subject(items)


class Source:
    """Base class: ``load()`` returns :class:`SourceData`; options go to ``__init__``."""

    def load(self) -> SourceData:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- ACDC


def read_acdc_info(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``key: value`` lines) into a dict; ED and ES are required."""
    if not path.is_file():
        raise FileNotFoundError(f"ACDC Info.cfg not found: {path}")
    parser = configparser.ConfigParser()
    try:
        parser.read_string("[info]\n" + path.read_text())
    except configparser.Error as error:
        raise ValueError(f"cannot parse {path}: {error}") from error
    info = {key.upper(): value.strip() for key, value in parser["info"].items()}
    for key in ("ED", "ES"):
        if key not in info or not info[key].isdigit():
            raise ValueError(f"{path} must give an integer '{key}: <frame>' line, got {info}")
    return info


class ACDCSource(Source):
    """ACDC: ``root/{training,testing}/patientXXX/patientXXX_frameYY.nii.gz`` (+ ``_gt``, Info.cfg).

    Args:
        root: the ACDC folder holding ``training`` / ``testing``.
        subsets: which of those folders to read.
        phases: cardiac phases to load, from ``ED`` and ``ES`` (frame numbers from ``Info.cfg``).
        require_labels: refuse a frame without its ``_gt`` file (ACDC labels: 1 RV, 2 myocardium,
            3 LV cavity); when ``False`` such frames load image-only.

    Subject ids are ``patientXXX_ED`` / ``patientXXX_ES``, grouped by patient; ``pairs`` holds the
    within-patient ``ED -> ES`` pair (moving ED, fixed ES) when both phases are loaded.
    """

    def __init__(
        self,
        root: str | Path,
        subsets: Sequence[str] = ("training", "testing"),
        phases: Sequence[str] = ("ED", "ES"),
        require_labels: bool = True,
    ) -> None:
        self.root = root
        self.subsets = list(subsets)
        self.phases = [phase.upper() for phase in phases]
        self.require_labels = require_labels
        unknown = set(self.phases) - {"ED", "ES"}
        if unknown or not self.phases:
            raise ValueError(
                f"ACDC phases must be a non-empty subset of ['ED', 'ES'], got {phases}"
            )

    def load(self) -> SourceData:
        root = existing_dir(self.root, "ACDC root (data.root)")
        patients: list[Path] = []
        for subset in self.subsets:
            folder = root / subset
            if folder.is_dir():
                patients += sorted(p for p in folder.glob("patient*") if p.is_dir())
        if not patients:
            raise FileNotFoundError(
                f"no ACDC patient folders under {root}/{{{','.join(self.subsets)}}}/patient*"
            )
        subjects, pairs = [], []
        for patient_dir in patients:
            info = read_acdc_info(patient_dir / "Info.cfg")
            patient = patient_dir.name
            for phase in self.phases:
                frame = int(info[phase])
                image_path = patient_dir / f"{patient}_frame{frame:02d}.nii.gz"
                if not image_path.is_file():
                    raise FileNotFoundError(f"ACDC {phase} frame {frame} missing: {image_path}")
                label_path = patient_dir / f"{patient}_frame{frame:02d}_gt.nii.gz"
                if not label_path.is_file():
                    if self.require_labels:
                        raise FileNotFoundError(f"ACDC label missing: {label_path}")
                    label_path = None
                subjects.append(
                    make_subject(image_path, label_path, f"{patient}_{phase}", patient, phase=phase)
                )
            if {"ED", "ES"} <= set(self.phases):
                pairs.append((f"{patient}_ED", f"{patient}_ES"))
        has_labels = any("label" in subject for subject in subjects)
        return SourceData(subjects, pairs, has_labels)


# ------------------------------------------------------------------------------------- NIfTI folder


class NiftiFolderSource(Source):
    """Images in ``root/images`` and optional labels in ``root/labels``, matched by file stem.

    Args:
        root: the data folder.
        images: image sub-folder (``"."`` for ``root`` itself).
        labels: label sub-folder, or ``None`` for image-only data. A missing folder is an error.
        image_pattern: glob for image files inside ``images``.
        label_pattern: glob for label files inside ``labels``.
        label_suffix: removed from a label's stem before matching (``"_gt"`` matches
            ``case_gt.nii.gz`` to ``case.nii.gz``).
        require_labels: refuse images without a matching label (otherwise they load image-only).
        group_regex: optional regex whose first group names the patient/case of a stem, so several
            files of one case stay in one split (e.g. ``"^(.*)_frame"``); default: the stem itself.
    """

    def __init__(
        self,
        root: str | Path,
        images: str = "images",
        labels: str | None = "labels",
        image_pattern: str = "*.nii*",
        label_pattern: str = "*.nii*",
        label_suffix: str = "",
        require_labels: bool = False,
        group_regex: str | None = None,
    ) -> None:
        self.root = root
        self.images = images
        self.labels = labels
        self.image_pattern = image_pattern
        self.label_pattern = label_pattern
        self.label_suffix = label_suffix
        self.require_labels = require_labels
        self.group_regex = re.compile(group_regex) if group_regex else None

    def _group(self, stem: str) -> str:
        if self.group_regex is None:
            return stem
        match = self.group_regex.search(stem)
        if match is None:
            raise ValueError(f"group_regex {self.group_regex.pattern!r} does not match '{stem}'")
        return match.group(1) if match.groups() else match.group(0)

    def _label_files(self, root: Path) -> dict[str, Path]:
        if self.labels is None:
            return {}
        folder = existing_dir(root / self.labels, "label folder")
        labels: dict[str, Path] = {}
        for path in nifti_files(folder, [self.label_pattern]):
            stem = nifti_stem(path)
            if self.label_suffix:
                if not stem.endswith(self.label_suffix):
                    continue
                stem = stem[: -len(self.label_suffix)]
            labels[stem] = path
        return labels

    def load(self) -> SourceData:
        root = existing_dir(self.root, "NIfTI folder root (data.root)")
        image_folder = existing_dir(root / self.images, "image folder")
        image_paths = nifti_files(image_folder, [self.image_pattern])
        labels = self._label_files(root)
        label_paths = set(labels.values())
        # labels may share the image folder: a file that is a label is not also an image
        image_paths = [path for path in image_paths if path not in label_paths]
        if not image_paths and label_paths:
            raise ValueError(
                f"every file in {image_folder} matches the label pattern; set label_suffix or "
                "distinct image_pattern / label_pattern"
            )
        if not image_paths:
            raise FileNotFoundError(
                f"no NIfTI images matching '{self.image_pattern}' in {image_folder}"
            )
        subjects = []
        for image_path in image_paths:
            stem = nifti_stem(image_path)
            label_path = labels.get(stem)
            if label_path is None and self.require_labels:
                raise FileNotFoundError(f"no label for {image_path} in {root / str(self.labels)}")
            subjects.append(make_subject(image_path, label_path, stem, self._group(stem)))
        has_labels = any("label" in subject for subject in subjects)
        return SourceData(subjects, [], has_labels)


# ---------------------------------------------------------------------------------------- Learn2Reg


def read_keypoints(path: Path, affine: np.ndarray, unit: str = "voxel") -> np.ndarray:
    """Read a landmark CSV (``x,y,z`` per row, optional header) and return world mm ``[N, 3]``.

    ``unit="voxel"``: rows are 0-based voxel indices of the image with ``affine``; ``"world"``: mm.
    """
    if not path.is_file():
        raise FileNotFoundError(f"keypoint file not found: {path}")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = [item for item in re.split(r"[,\s;]+", line.strip()) if item]
        if not fields:
            continue
        try:
            rows.append([float(item) for item in fields[:3]])
        except ValueError:
            if rows or line_number > 1:
                raise ValueError(f"{path}:{line_number}: not numeric: {line!r}") from None
            continue  # header line
        if len(fields) < 3:
            raise ValueError(f"{path}:{line_number}: expected 3 coordinates, got {line!r}")
    points = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{path}: keypoints must be finite")
    if unit == "world":
        return points
    if unit != "voxel":
        raise ValueError(f"keypoints unit must be 'voxel' or 'world', got {unit!r}")
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (homogeneous @ affine.T)[:, :3]


class Learn2RegSource(Source):
    """A Learn2Reg-style ``dataset.json`` (e.g. LungCT): images, labels, masks, keypoints, pairs.

    Args:
        root: folder holding ``dataset.json`` and ``imagesTr`` (+ ``labelsTr``, ``masksTr``,
            ``keypointsTr``).
        json_name: name of the dataset description.
        entries: list key of the file entries (``"training"``).
        pair_keys: list keys of registration pairs to use (each item ``{"fixed", "moving"}``),
            e.g. ``["training_paired_images", "registration_val"]``.
        use_masks: load ``mask`` entries as an extra label map ``mask`` (for masked losses).
        keypoints_unit: ``"voxel"`` (Learn2Reg convention) or ``"world"``.
        group_regex: regex naming a case from a file stem; the default drops the trailing
            ``_0000`` / ``_0001`` (time point or modality) so both scans of a case share a split.
    """

    def __init__(
        self,
        root: str | Path,
        json_name: str = "dataset.json",
        entries: str = "training",
        pair_keys: Sequence[str] = ("training_paired_images", "registration_val"),
        use_masks: bool = False,
        keypoints_unit: str = "voxel",
        group_regex: str = r"^(.*)_\d{4}$",
    ) -> None:
        self.root = root
        self.json_name = json_name
        self.entries = entries
        self.pair_keys = list(pair_keys)
        self.use_masks = use_masks
        self.keypoints_unit = keypoints_unit
        self.group_regex = re.compile(group_regex)

    def _path(self, root: Path, relative: str, where: str) -> Path:
        path = (root / relative).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{where} lists {relative!r} but {path} does not exist")
        return path

    def load(self) -> SourceData:
        root = existing_dir(self.root, "Learn2Reg root (data.root)")
        json_path = root / self.json_name
        if not json_path.is_file():
            raise FileNotFoundError(f"Learn2Reg description not found: {json_path}")
        try:
            description = json.loads(json_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path} is not valid JSON: {error}") from error
        entries = description.get(self.entries)
        if not entries:
            raise ValueError(f"{json_path}: key '{self.entries}' is missing or empty")
        subjects, ids_by_path = [], {}
        for index, entry in enumerate(entries):
            where = f"{json_path}['{self.entries}'][{index}]"
            if "image" not in entry:
                raise ValueError(f"{where} has no 'image' key")
            image_path = self._path(root, entry["image"], where)
            label_path = self._path(root, entry["label"], where) if entry.get("label") else None
            stem = nifti_stem(image_path)
            match = self.group_regex.search(stem)
            group = (match.group(1) if match.groups() else match.group(0)) if match else stem
            keypoints = None
            if entry.get("keypoints"):
                _, affine = read_header(image_path)
                keypoints_path = self._path(root, entry["keypoints"], where)
                keypoints = read_keypoints(keypoints_path, affine, self.keypoints_unit)
            subject = make_subject(image_path, label_path, stem, group, keypoints)
            if self.use_masks and entry.get("mask"):
                mask_path = self._path(root, entry["mask"], where)
                check_same_geometry(image_path, mask_path)
                subject.add_image(tio.LabelMap(mask_path, reader=read_label), "mask")
            subjects.append(subject)
            ids_by_path[image_path] = stem
        pairs = []
        for key in self.pair_keys:
            for index, pair in enumerate(description.get(key) or []):
                where = f"{json_path}['{key}'][{index}]"
                ids = []
                for role in ("moving", "fixed"):
                    if role not in pair:
                        raise ValueError(f"{where} has no '{role}' key")
                    path = self._path(root, pair[role], where)
                    if path not in ids_by_path:
                        raise ValueError(f"{where}: {pair[role]!r} is not in '{self.entries}'")
                    ids.append(ids_by_path[path])
                pairs.append((ids[0], ids[1]))
        has_labels = any("label" in subject for subject in subjects)
        return SourceData(subjects, list(dict.fromkeys(pairs)), has_labels)
