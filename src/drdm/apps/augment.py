"""The body of ``src/augment.py``: DRDM samples of NIfTI files, with labels, fields and a manifest.

For each input ``X.nii.gz`` (a file, or every NIfTI in a folder except labels) and
``k = 0 .. num_samples-1`` it writes, all with the input's affine and atomically:

* ``image/X_k.nii.gz`` -- the sample (the input warped by the field),
* ``label/X_k.nii.gz`` -- the label warped with nearest neighbour (when ``X_gt.nii.gz`` or
  ``labels/X.nii.gz`` exists beside the input),
* ``field/X_k.nii.gz`` -- the displacement mapping the input to the sample, ITK layout
  (:mod:`drdm.data.displacement_files`),
* one row in ``manifest.csv`` (input, k, t0, seeds, folding ratio, max / mean displacement in mm).

A sample is finished when its files exist and its manifest row is written; a re-run generates
only the unfinished ones, and since every sample draws its field from its own seed, the files
are the same as in an uninterrupted run.

``run.json`` beside the manifest records what the samples depend on: the seed, the checkpoint's
content hash, the generation settings and each input's content hash. A re-run into the folder
that differs in any of them is refused (:class:`ResumeMismatch`) unless ``overwrite=True``, which
first removes the files the earlier manifest lists. The writer never deletes a file it did not
write: only its own leftover temporaries (:func:`drdm.utils.atomic.remove_temporaries`) and, on
``overwrite``, its own earlier outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdm.checkpoints import resolve_checkpoint
from drdm.data.displacement_files import write_displacement_field
from drdm.data.io import (
    check_label_values,
    check_same_geometry,
    load_nifti,
    nifti_files,
    nifti_stem,
    save_nifti_like,
)
from drdm.deform import displacement_to_world
from drdm.generation.manifest import MANIFEST, read_manifest, write_manifest
from drdm.generation.sampler import DRDM, mix_seed
from drdm.utils.atomic import remove_temporaries, write_json_atomic
from drdm.utils.progress import progress_bar

log = logging.getLogger(__name__)

LABEL_SUFFIX = "_gt"
RUN_RECORD = "run.json"
OUTPUT_KINDS = ("image", "label", "field")
# the largest label value accepted: label maps hold class indices, not measurements
MAX_LABEL = 2**15 - 1


class ResumeMismatch(ValueError):
    """``output_dir`` holds samples made with other settings, seed, checkpoint or inputs."""


@dataclass
class InputCase:
    """One input image and its optional label."""

    image: Path
    label: Path | None

    @property
    def stem(self) -> str:
        return nifti_stem(self.image)


def find_label(image: Path) -> Path | None:
    """``X_gt.nii[.gz]`` beside ``X`` or ``labels/X.nii[.gz]``; ``None`` when there is none."""
    stem = nifti_stem(image)
    for folder, name in ((image.parent, stem + LABEL_SUFFIX), (image.parent / "labels", stem)):
        for suffix in (".nii.gz", ".nii"):
            candidate = folder / (name + suffix)
            if candidate.is_file():
                return candidate
    return None


def find_inputs(path: str | Path) -> list[InputCase]:
    """A NIfTI file, or the NIfTI files of a folder (labels ``*_gt`` excluded), with labels.

    Raises:
        FileNotFoundError: ``path`` does not exist or the folder holds no NIfTI image.
    """
    path = Path(path).expanduser()
    if path.is_file():
        images = [path]
    elif path.is_dir():
        images = [p for p in nifti_files(path) if not nifti_stem(p).endswith(LABEL_SUFFIX)]
        if not images:
            raise FileNotFoundError(f"no NIfTI images (*.nii.gz, *.nii) in input folder {path}")
    else:
        raise FileNotFoundError(f"input does not exist: {path}")
    cases = []
    by_stem: dict[str, Path] = {}
    for image in images:
        stem = nifti_stem(image)
        if stem in by_stem:
            raise ValueError(
                f"inputs {by_stem[stem]} and {image} would both write image/{stem}_<k>.nii.gz: "
                "rename one, or give them separate input folders and output_dirs"
            )
        by_stem[stem] = image
        label = find_label(image)
        if label is not None:
            check_same_geometry(image, label)
        cases.append(InputCase(image, label))
    return cases


def check_output_location(cases: Sequence[InputCase], output_dir: Path) -> None:
    """Refuse an ``output_dir`` whose sample folders would be a folder the inputs live in.

    Outputs there would mix with the user's files and be read as inputs by the next run. A
    folder inside an input folder is fine: the writer only adds its own files.
    """
    output_dir = output_dir.resolve()
    written = {output_dir, *(output_dir / kind for kind in OUTPUT_KINDS)}
    for case in cases:
        for source in (case.image, case.label):
            if source is not None and source.resolve().parent in written:
                raise ValueError(
                    f"output_dir {output_dir} would write samples into {source.resolve().parent}, "
                    f"the folder of input {source}: choose an output_dir outside the input folders"
                )


def check_label_map(label: np.ndarray, path: Path) -> None:
    """Refuse a label map that is not integer class indices ``0 .. MAX_LABEL``, naming values."""
    check_label_values(label, None, f"label {path}")
    values = np.unique(label)
    outside = values[(values < 0) | (values > MAX_LABEL)]
    if outside.size:
        raise ValueError(
            f"label {path}: class indices must lie in 0..{MAX_LABEL}, found "
            f"{outside[:8].astype(np.int64).tolist()}"
        )


def check_input_shape(shape: Sequence[int], path: Path, ndims: int, slice_axis: int) -> None:
    """Refuse, from the header alone, an image the model cannot sample (names the file)."""
    shape = [int(n) for n in shape]
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3) or (ndims == 3 and len(shape) != 3):
        raise ValueError(
            f"{path}: a {ndims}D model needs a "
            f"{'3D volume' if ndims == 3 else '2D image or 3D volume'}, got shape {shape}"
        )
    if len(shape) > ndims and not 0 <= slice_axis < len(shape):
        raise ValueError(f"slice_axis must be 0, 1 or 2 for the volume {path}, got {slice_axis}")
    spatial = [n for axis, n in enumerate(shape) if len(shape) == ndims or axis != slice_axis]
    if min(spatial) < 2:
        raise ValueError(
            f"{path}: shape {shape} has an in-plane axis of {min(spatial)} voxel (slice_axis="
            f"{slice_axis}); sampling needs at least 2 voxels along every warped axis"
        )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(
    checkpoint: Path, drdm: DRDM, seed: int, t0, slice_axis: int, use_ema: bool
) -> dict:
    """What every sample of a run depends on, besides its input (the ``run.json`` record)."""
    return {
        "seed": int(seed),
        "checkpoint_sha256": file_sha256(checkpoint),
        "use_ema": bool(use_ema),
        "t0": t0,
        "slice_axis": int(slice_axis),
        "settings": drdm.settings(),
    }


def input_identity(case: InputCase) -> dict:
    """The content hashes of an input's image and label (``run.json``'s ``inputs``)."""
    return {
        "image_sha256": file_sha256(case.image),
        "label_sha256": None if case.label is None else file_sha256(case.label),
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return names


def check_resume(output_dir: Path, record: dict, manifest: dict, targets: Sequence[Path]) -> None:
    """Refuse to add to ``output_dir`` unless it was made by the same run (``record``).

    Raises:
        ResumeMismatch: the folder's ``run.json`` differs from ``record`` (seed, checkpoint,
            settings, an input's content), or the folder holds a manifest or sample files
            without a ``run.json`` (another tool's, or an older drdm's, files).
    """
    how = (
        "write to a new output_dir, or pass overwrite=true to replace the samples listed in "
        f"{output_dir / MANIFEST}"
    )
    path = output_dir / RUN_RECORD
    if not path.is_file():
        existing = [p for p in targets if p.exists()]
        if manifest or existing:
            found = output_dir / MANIFEST if manifest else existing[0]
            raise ResumeMismatch(
                f"{output_dir} already holds {found} but no {RUN_RECORD} saying how it was "
                f"made, so it cannot be resumed safely: {how}"
            )
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ResumeMismatch(f"cannot read {path}: {error}; {how}") from error
    old_inputs, new_inputs = previous.get("inputs") or {}, record["inputs"]
    shared = {stem: old_inputs[stem] for stem in old_inputs if stem in new_inputs}
    differences = _differences(
        {**{k: v for k, v in previous.items() if k != "inputs"}, "inputs": shared},
        {**{k: v for k, v in record.items() if k != "inputs"},
         "inputs": {stem: new_inputs[stem] for stem in shared}},
    )  # fmt: skip
    if differences:
        raise ResumeMismatch(
            f"{output_dir} holds samples of another run; what differs (before -> now):\n  "
            + "\n  ".join(differences)
            + f"\n{how}"
        )


def remove_previous_outputs(output_dir: Path, manifest: dict) -> int:
    """``overwrite``: delete the sample files the old manifest lists (only inside the sample
    folders), then the manifest and run record; returns how many sample files were removed."""
    folders = {(output_dir / kind).resolve() for kind in OUTPUT_KINDS}
    removed = 0
    for row in manifest.values():
        for kind in OUTPUT_KINDS:
            if not row.get(kind):
                continue
            path = (output_dir / row[kind]).resolve()
            if path.parent in folders and path.name.endswith(".nii.gz") and path.is_file():
                path.unlink()
                removed += 1
    for name in (MANIFEST, RUN_RECORD):
        (output_dir / name).unlink(missing_ok=True)
    manifest.clear()
    return removed


def remove_stale_temporaries(
    output_dir: Path, cases: Sequence[InputCase], num_samples: int
) -> list[Path]:
    """Leftover temporaries of this writer's own targets (an interrupted run); nothing else."""
    names = [f"{case.stem}_{k}.nii.gz" for case in cases for k in range(num_samples)]
    removed = remove_temporaries(output_dir, (MANIFEST, RUN_RECORD))
    for kind in OUTPUT_KINDS:
        removed += remove_temporaries(output_dir / kind, names)
    return removed


def _outputs(output_dir: Path, stem: str, k: int, labelled: bool) -> dict[str, Path | None]:
    name = f"{stem}_{k}.nii.gz"
    return {
        "image": output_dir / "image" / name,
        "label": output_dir / "label" / name if labelled else None,
        "field": output_dir / "field" / name,
    }


def _finished(paths: dict[str, Path | None], row: dict | None) -> bool:
    return row is not None and all(p is None or p.is_file() for p in paths.values())


def _array_mode(array: np.ndarray) -> np.ndarray:
    """Squeeze a trailing singleton 4th axis (shapes are checked by :func:`check_input_shape`)."""
    return array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array


def sample_blocks(num_samples: int, samples_per_call: int) -> list[list[int]]:
    """Fixed groups of sample indices ``k`` that go through the network together.

    The recovery chain amplifies float rounding, and convolution kernels round differently for
    different batch compositions, so a sample is only reproducible bit for bit when it is
    generated with the same companions. Blocks ``[0, n), [n, 2n), ...`` are the unit of work:
    a resumed run regenerates a whole block and writes only its missing samples.
    """
    n = max(1, int(samples_per_call))
    return [list(range(start, min(start + n, num_samples))) for start in range(0, num_samples, n)]


def pending_samples(
    case: InputCase, output_dir: Path, manifest: dict[tuple[str, int], dict], num_samples: int
) -> set[int]:
    """The ``k`` of ``case`` whose files or manifest row are missing."""
    labelled = case.label is not None
    return {
        k
        for k in range(num_samples)
        if not _finished(_outputs(output_dir, case.stem, k, labelled), manifest.get((case.stem, k)))
    }


def augment_case(
    drdm: DRDM,
    case: InputCase,
    output_dir: Path,
    manifest: dict[tuple[str, int], dict],
    num_samples: int,
    seed: int,
    t0=None,
    slice_axis: int = 2,
    progress=None,
    pending: set[int] | None = None,
    before_write=None,
) -> int:
    """Generate the unfinished samples of one input, block by block (:func:`sample_blocks`),
    writing each block's files before the next is generated; returns how many were written.

    ``progress``: a tqdm-style bar, advanced by one per written sample; ``pending``: the
    unfinished ``k`` when the caller already found them (:func:`pending_samples`);
    ``before_write``: called before each sample's files are written (the run record)."""
    stem = case.stem
    labelled = case.label is not None
    if pending is None:
        pending = pending_samples(case, output_dir, manifest, num_samples)
    if not pending:
        log.info("%s: all %d samples already done", stem, num_samples)
        return 0
    if t0 is not None and not np.isscalar(t0) and len(t0) != num_samples:
        raise ValueError(f"t0 has {len(t0)} values but num_samples is {num_samples}")
    image, affine = load_nifti(case.image, dtype=np.float32)
    image = _array_mode(image)
    label = None
    label_dtype = None
    if labelled:
        label_array, _ = load_nifti(case.label, dtype=np.float32)
        check_label_map(label_array, case.label)
        label = np.rint(_array_mode(label_array)).astype(np.int64)
        label_dtype = nib.load(str(case.label)).get_data_dtype()  # written back the same way
    # one seed per input name: results do not depend on the other inputs or their order
    input_seed = mix_seed(seed, zlib.crc32(stem.encode()))
    # network rows per sample: the slices of a stack for a 2D model, else one image
    rows = image.shape[slice_axis] if image.ndim > drdm.ndims else 1
    image_tensor = torch.from_numpy(image)
    label_tensor = None if label is None else torch.from_numpy(label)

    def write(result, row: int, k: int) -> None:
        """Sample ``k`` (row ``row`` of ``result``): image, label, field, then its manifest row."""
        paths = _outputs(output_dir, stem, k, labelled)
        if before_write is not None:
            before_write()
        field = result.displacement[row].cpu().double()  # [n, *S] voxels along the array axes
        # outputs copy the input's header geometry verbatim (sform/qform, codes, pixdim)
        sample = result.image[row, 0].cpu().numpy().astype(np.float32)
        save_nifti_like(paths["image"], sample, case.image)
        if labelled:
            warped_label = result.label[row, 0].cpu().numpy()
            save_nifti_like(paths["label"], warped_label.astype(label_dtype), case.image)
        write_displacement_field(paths["field"], field.numpy(), affine, like=case.image)
        world = displacement_to_world(field[None], torch.as_tensor(affine))[0]
        length = world.square().sum(0).sqrt()
        manifest[(stem, k)] = {
            "input": stem,
            "k": k,
            "t0": int(result.t0[row]),
            "seed": seed,
            "sample_seed": mix_seed(input_seed, 0, k),
            "folding_ratio": f"{float(result.folding_ratio[row]):.6g}",
            "repaired_ratio": f"{float(result.repaired_ratio[row]):.6g}",
            "max_displacement_mm": f"{float(length.max()):.6g}",
            "mean_displacement_mm": f"{float(length.mean()):.6g}",
            "image": str(paths["image"].relative_to(output_dir)),
            "label": str(paths["label"].relative_to(output_dir)) if labelled else "",
            "field": str(paths["field"].relative_to(output_dir)),
        }
        # the row is what marks the sample finished: written only after its files
        write_manifest(output_dir / MANIFEST, manifest)

    written = 0
    for block in sample_blocks(num_samples, drdm.images_per_call // rows):
        if pending.isdisjoint(block):
            continue
        started = time.perf_counter()
        t0_values = None
        if t0 is not None:
            t0_values = [int(t0)] * len(block) if np.isscalar(t0) else [int(t0[k]) for k in block]
        result = drdm.generate(
            image_tensor,
            label_tensor,
            num_samples=num_samples,
            t0=t0_values,
            seed=input_seed,
            sample_indices=block,
            slice_axis=slice_axis,
        )
        done = [k for k in block if k in pending]
        for row, k in enumerate(block):
            if k in pending:
                write(result, row, k)
                written += 1
                if progress is not None:
                    progress.update(1)
        log.info(
            "%s: samples %s written in %.1f s (%d of %d pending for this input)",
            stem,
            ", ".join(map(str, done)),
            time.perf_counter() - started,
            written,
            len(pending),
        )
    return written


def _plain_int(value, name: str) -> int:
    """``value`` as an int, or a ``ValueError`` naming the setting ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return number


def validate_case(case: InputCase, drdm: DRDM, slice_axis: int) -> None:
    """Every check of one input that needs no generation: shapes, finite voxels, label values."""
    for path in (case.image, case.label):
        if path is not None:
            check_input_shape(nib.load(str(path)).shape, path, drdm.ndims, slice_axis)
    load_nifti(case.image, dtype=np.float32)  # refuses NaN / infinite voxels, naming the file
    if case.label is not None:
        check_label_map(load_nifti(case.label, dtype=np.float32)[0], case.label)


def augment(
    ckpt_path: str | Path,
    input: str | Path,
    output_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    t0=None,
    slice_axis: int = 2,
    device: str = "auto",
    use_ema: bool = True,
    drdm_options: dict | None = None,
    drdm_defaults: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, int]:
    """Generate samples for every input; returns ``{"inputs": n, "generated": m, "skipped": s}``.

    ``drdm_options``: :class:`DRDM` settings (``None``: unset); ``drdm_defaults``: settings used
    where neither they nor the checkpoint set one (``DRDM.load``'s ``fallback``; ``None``: the
    shipped default, :data:`drdm.generation.SHIPPED_DEFAULTS`, as on every other route).
    ``progress``: a bar over the pending samples (ETA, current input) on stderr. ``overwrite``:
    replace the samples of another run in ``output_dir`` (the files its manifest lists) instead
    of refusing.

    Every input is checked (names, shapes, label values, the output location, a resumed run's
    identity) before the first sample is generated; folders and ``run.json`` are only created
    when the first sample is written.

    Raises:
        ResumeMismatch: ``output_dir`` holds another run's samples and ``overwrite`` is false.
        ValueError / FileNotFoundError: bad settings or inputs (the message names which).
    """
    num_samples = _plain_int(num_samples, "num_samples")
    seed = _plain_int(seed, "seed")
    slice_axis = _plain_int(slice_axis, "slice_axis")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= slice_axis <= 2:
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a voxel axis), got {slice_axis}")
    if t0 is not None:
        t0 = (
            [_plain_int(v, "t0") for v in t0]
            if isinstance(t0, list | tuple)
            else _plain_int(t0, "t0")
        )
    cases = find_inputs(input)
    output_dir = Path(output_dir).expanduser()
    check_output_location(cases, output_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = resolve_checkpoint(ckpt_path)
    drdm = DRDM.load(checkpoint, use_ema=use_ema, fallback=drdm_defaults, **(drdm_options or {}))
    drdm = drdm.to(device)
    for case in cases:
        validate_case(case, drdm, slice_axis)

    record = run_identity(checkpoint, drdm, seed, t0, slice_axis, use_ema)
    record["inputs"] = {case.stem: input_identity(case) for case in cases}
    manifest = read_manifest(output_dir / MANIFEST)
    if overwrite:
        removed = remove_previous_outputs(output_dir, manifest)
        if removed:
            log.info("overwrite: removed %d sample files of the previous run", removed)
    targets = [
        path
        for case in cases
        for k in range(num_samples)
        for path in _outputs(output_dir, case.stem, k, case.label is not None).values()
        if path is not None
    ]
    if not overwrite:
        check_resume(output_dir, record, manifest, targets)
    previous = output_dir / RUN_RECORD
    if previous.is_file():  # keep the record of inputs this call does not name
        record["inputs"] = {**json.loads(previous.read_text())["inputs"], **record["inputs"]}
    remove_stale_temporaries(output_dir, cases, num_samples)

    recorded = []

    def write_record() -> None:
        if not recorded:
            write_json_atomic(previous, record)
            recorded.append(True)

    pending = [pending_samples(case, output_dir, manifest, num_samples) for case in cases]
    generated = 0
    with progress_bar(sum(map(len, pending)), "sample", enabled=progress) as bar:
        for case, unfinished in zip(cases, pending, strict=True):
            bar.set_postfix_str(case.stem)
            generated += augment_case(
                drdm,
                case,
                output_dir,
                manifest,
                num_samples,
                seed,
                t0,
                slice_axis,
                bar,
                unfinished,
                write_record,
            )
    total = len(cases) * num_samples
    log.info(
        "%d inputs: %d samples generated, %d already done", len(cases), generated, total - generated
    )
    return {"inputs": len(cases), "generated": generated, "skipped": total - generated}


def summary_lines(output_dir, summary: dict) -> list[str]:
    """What ``src/augment.py`` prints when it is done: counts, where each output is, next steps."""
    output = Path(output_dir)
    lines = [
        f"{summary['inputs']} inputs: {summary['generated']} samples generated, "
        f"{summary['skipped']} already done -> {output}",
        f"  samples: {output / 'image'}/<input>_<k>.nii.gz (the input's geometry)",
        f"  fields:  {output / 'field'}/ (ITK displacement fields, mm: "
        "sitk.DisplacementFieldTransform reads them)",
    ]
    if (output / "label").is_dir():
        lines.append(f"  labels:  {output / 'label'}/ (warped by the same fields, nearest)")
    lines += [
        f"  manifest: {output / 'manifest.csv'} (one row per sample: t0, seeds, folding, "
        "displacement in mm); run record: run.json (a re-run resumes, or refuses other settings)",
        "  next: look at a sample with nibabel or ITK-SNAP; train a few-shot segmentation on "
        "such pairs with src/train.py experiment=default_fewshot augmentation=drdm_offline "
        f"augmentation.batch.offline.folder={output}",
    ]
    return lines
